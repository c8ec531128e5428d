"""Hugging Face checkpoints ↔ our NNX models: safetensors only, offline, no torch at run time.

    from_pretrained(dir, head=...)  config.json → ModelConfig;  model.safetensors (or shards) → params
    save_pretrained(model, dir)     the directory transformers' AutoModelFor*.from_pretrained reads
                                    (+ generation_config.json: generate() stops at EOS)

The per-family tables ``hf_weight_names`` (gpt2.py, llama.py) say which HF tensor fills which of our
parameters and whether it is transposed (torch Linear is [out, in], our kernels are [in, out]).
Heads: ``lm_head.weight`` (untied LM head), ``score.weight`` (+ our ``score.bias``) for reward and value
models (HF ``*ForSequenceClassification``), ``v_head.summary.*`` (trl's value head name) for the
ActorCritic's value head.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from safetensors.flax import save_file

from jaxrlhf.logging import note
from jaxrlhf.models import gpt2, llama
from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.heads import ActorCritic, CausalLM, RewardModel, ValueModel, scalar_head
from jaxrlhf.models.hf_read import (  # noqa: F401 (LazyTensor, read_safetensors: re-exported)
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    LazyTensor,
    TensorSource,
    read_safetensors,
)
from jaxrlhf.models.layers import jnp_dtype
from jaxrlhf.models.lora import merge_lora
from jaxrlhf.models.sharding import host_model, logical_axes, param_shardings, partition_spec

HEADS = {"lm": CausalLM, "actor_critic": ActorCritic, "value": ValueModel, "reward": RewardModel}
FAMILY_MODULES = {"gpt2": gpt2, "llama": llama}
VALUE_HEAD_NAMES = ("v_head.summary.weight", "v_head.summary.bias")  # trl's value head
SCORE_BIAS_KEY = "jaxrlhf_score_bias"  # config.json key recording a non-zero score bias


# ----------------------------------------------------------------------------- reading


def _param(module, path: tuple) -> nnx.Param:
    """The nnx.Param at ``path`` (attribute names) under ``module``."""
    obj = module
    for p in path:
        obj = getattr(obj, p)
    return obj


def _assign(param: nnx.Param, tensor: TensorSource, *, dtype, mesh=None, path="", source=""):
    """Set ``param`` from an HF tensor (``TensorSource``); ``source`` (the checkpoint directory) names
    where a mis-shaped tensor came from.

    With a device ``mesh`` the tensors are LazyTensors and each device's block is read straight from
    the file(s) into the parameter's sharding (``models.sharding``): no process holds the whole
    tensor, and a stacked parameter's block reads only its layers' slices.
    """
    if tensor.shape != tuple(param.shape):
        expected = tuple(param.shape)[1:] if tensor.stacked else tuple(param.shape)
        raise CheckpointError(
            f"{source}: tensor {tensor.name!r} has shape {tensor.hf_shape}, expected "
            f"{expected[::-1] if tensor.transpose else expected}"
        )
    if mesh is None:
        param.set_value(jnp.asarray(tensor.read()).astype(dtype))
        return
    names = logical_axes(path, len(tensor.shape))
    sharding = NamedSharding(mesh, partition_spec(names, tensor.shape, mesh))
    param.set_value(
        jax.make_array_from_callback(
            tensor.shape, sharding, lambda index: tensor.read(index).astype(dtype)
        )
    )


def _normalise_names(tensors: dict, config: ModelConfig) -> dict:
    """Accept old GPT-2 checkpoints saved without the ``transformer.`` prefix."""
    if (
        config.family == "gpt2"
        and "wte.weight" in tensors
        and "transformer.wte.weight" not in tensors
    ):
        return {
            (k if k.startswith(("lm_head.", "score.", "v_head.")) else "transformer." + k): v
            for k, v in tensors.items()
        }
    return tensors


def trunk_params(trunk, config: ModelConfig):
    """(HF name, our nnx.Param, its path, layers, transpose?) for every trunk parameter, in either
    block layout (``ModelConfig.scan_layers``): a per-layer name (``{i}`` in the family's table) is
    one stacked parameter [L, ...] (``layers`` = L), or L parameters of a list of blocks (the name
    formatted with each i, ``layers`` None)."""
    for name, our_path, transpose in FAMILY_MODULES[config.family].hf_weight_names(config):
        if "{i}" not in name:
            yield name, _param(trunk, our_path), "/".join(our_path), None, transpose
        elif config.scan_layers:
            path = "/".join(our_path)
            yield name, _param(trunk, our_path), path, config.num_layers, transpose
        else:
            blocks, in_block = getattr(trunk, our_path[0]), our_path[1:]
            for i, block in enumerate(blocks):
                path = "/".join((our_path[0], str(i), *in_block))
                yield name.format(i=i), _param(block, in_block), path, None, transpose


def load_trunk(trunk, tensors: dict, config: ModelConfig, path: str, mesh=None) -> None:
    """Fill a GPT2Model / LlamaModel from HF tensors, checking names and shapes; the per-layer
    tensors are stacked into the scanned blocks' parameters, or set block by block."""
    dtype = jnp_dtype(config)
    for name, param, our_path, layers, transpose in trunk_params(trunk, config):
        _assign(
            param,
            TensorSource(tensors, name, transpose=transpose, source=path, layers=layers),
            dtype=dtype,
            mesh=mesh,
            path=our_path,
            source=path,
        )


def _load_scalar_head(head: nnx.Linear, tensors: dict, weight: str, bias: str, dtype, path: str):
    kernel = TensorSource(tensors, weight, transpose=True, source=path)
    _assign(head.kernel, kernel, dtype=dtype, source=path)
    if bias in tensors:
        _assign(head.bias, TensorSource(tensors, bias, transpose=False, source=path), dtype=dtype,
                source=path)  # fmt: skip


def from_pretrained(
    path: str | os.PathLike,
    *,
    head: str = "lm",
    seed: int = 0,
    mesh=None,
    allow_new_head: bool = False,
    **config_overrides,
) -> CausalLM | ActorCritic | ValueModel | RewardModel:
    """Load a local Hugging Face checkpoint directory (config.json + safetensors) as one of our models.

    Args:
      path: directory with config.json and model.safetensors (or model.safetensors.index.json).
      head: "lm" → CausalLM (logits = model(input_ids, attention_mask)); "actor_critic" →
        ActorCritic; "value" → ValueModel (separate critic); "reward" → RewardModel. A value head
        absent from the checkpoint (a plain LM) is freshly initialised from ``seed``: PPO trains it.
      allow_new_head: a reward model's score head is what it is for, so a checkpoint without
        ``score.weight`` (a language model, not a ``train-rm`` output) is an error unless this is
        True; then the score head is freshly initialised from ``seed`` like a value head.
      mesh: a device mesh (``models.sharding.make_mesh``): every parameter is created directly in
        its sharding, each device's block read from the safetensors file on its own, so no process
        ever holds a whole copy of the model.
      config_overrides: ModelConfig fields to change, e.g. dtype="bfloat16" or dropout=0.1.
    Raises CheckpointError (a ValueError) naming the directory and the missing/mis-shaped tensor,
    the refused (pickle) or unreadable (truncated) file, or a missing config.json, and ValueError
    naming an unsupported model_type.
    """
    path = _check_checkpoint_dir(path, head)
    config = ModelConfig.from_hf(path, **config_overrides)
    tensors = _normalise_names(read_safetensors(path, lazy=mesh is not None), config)
    if head == "reward" and "score.weight" not in tensors and not allow_new_head:
        raise CheckpointError(
            f"{path} has no reward head: tensor 'score.weight' is missing (a language model, not a "
            "reward model); train one with `jaxrlhf train-rm`, or pass allow_new_head=True to "
            "start from a randomly initialised head"
        )
    # Build the model abstractly (shapes only, no random init of weights we overwrite anyway).
    model = nnx.eval_shape(lambda: HEADS[head](config, rngs=nnx.Rngs(seed)))
    lm = model.lm if isinstance(model, ActorCritic) else model
    load_trunk(lm.model, tensors, config, path, mesh)
    if isinstance(lm, CausalLM) and lm.lm_head is not None:
        _load_lm_head(lm, tensors, jnp_dtype(config), mesh, path)
    if isinstance(model, (ActorCritic, RewardModel, ValueModel)):
        _load_or_init_scalar_head(model, tensors, seed, mesh, path)
    _check_all_loaded(model)
    if mesh is not None:  # the small heads, initialised or read whole, to their place too
        state = nnx.state(model)
        nnx.update(model, jax.device_put(state, param_shardings(state, mesh)))
    return model


def _check_checkpoint_dir(path: str | os.PathLike, head: str) -> str:
    """``path`` as a string, after checking ``head`` and that it is a directory with config.json."""
    if head not in HEADS:
        raise ValueError(f"head must be one of {sorted(HEADS)}, got {head!r}")
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise CheckpointError(f"{path}: no config.json (not a Hugging Face checkpoint directory)")
    return path


def _load_lm_head(lm: CausalLM, tensors: dict, dtype, mesh, path: str) -> None:
    """The untied LM head from ``lm_head.weight`` (HF [V, D], ours [D, V])."""
    _assign(
        lm.lm_head.kernel,
        TensorSource(tensors, "lm_head.weight", transpose=True, source=path),
        dtype=dtype,
        mesh=mesh,
        path="lm_head/kernel",
        source=path,
    )


def _load_or_init_scalar_head(model, tensors: dict, seed: int, mesh, path: str) -> None:
    """The value head (trl's ``v_head.summary.*``) or score head (``score.*``) of ``model``: a fresh
    head N(0, 1/(D+1)) with zero bias from ``seed``, overwritten by the checkpoint's if it has one."""
    config = model.config
    target = model.score if isinstance(model, RewardModel) else model.value_head
    names = VALUE_HEAD_NAMES if isinstance(model, ActorCritic) else ("score.weight", "score.bias")
    fresh = scalar_head(config, std=1.0 / math.sqrt(config.hidden_size + 1), rngs=nnx.Rngs(seed))
    target.kernel.set_value(fresh.kernel[...])
    target.bias.set_value(fresh.bias[...])
    if names[0] in tensors:
        head_tensors = {k: tensors[k] for k in names if k in tensors}
        if mesh is not None:  # a [1, D] head: small, read whole
            head_tensors = {k: v.read() for k, v in head_tensors.items()}
        _load_scalar_head(target, head_tensors, *names, jnp_dtype(config), path)


def _check_all_loaded(model) -> None:
    """Every parameter was set (none is still an abstract ShapeDtypeStruct from eval_shape)."""
    unset = [
        jax.tree_util.keystr(p)
        for p, v in jax.tree_util.tree_leaves_with_path(nnx.state(model))
        if isinstance(v, jax.ShapeDtypeStruct)
    ]
    if unset:  # a bug in the tables above, not in the checkpoint
        raise RuntimeError(f"parameters left unloaded: {unset}")


# ----------------------------------------------------------------------------- writing


def hf_tensors(model) -> tuple[dict[str, jnp.ndarray], str]:
    """The HF tensors of a model and the HF architecture kind ("CausalLM" / "SequenceClassification")."""
    if not isinstance(model, tuple(HEADS.values())):
        raise TypeError(f"cannot export {type(model).__name__}; expected one of {list(HEADS)}")
    model = merge_lora(model)  # W + (α / r) A B: transformers reads a plain model
    config = model.config
    lm = model.lm if isinstance(model, ActorCritic) else model
    tensors = {}
    for name, param, _, layers, transpose in trunk_params(lm.model, config):
        value = param[...]  # [L, ...] for a stacked per-layer name
        for i, layer in enumerate(value) if layers else [(None, value)]:
            tensors[name.format(i=i)] = layer.T if transpose else layer
    if isinstance(model, (CausalLM, ActorCritic)):
        if lm.lm_head is not None:
            tensors["lm_head.weight"] = lm.lm_head.kernel[...].T
        if isinstance(model, ActorCritic):
            tensors[VALUE_HEAD_NAMES[0]] = model.value_head.kernel[...].T  # [1, D]
            tensors[VALUE_HEAD_NAMES[1]] = model.value_head.bias[...]  # [1]
        return tensors, "CausalLM"
    head = model.score if isinstance(model, RewardModel) else model.value_head
    tensors["score.weight"] = head.kernel[...].T  # [1, D]
    if float(jnp.abs(head.bias[...]).max()) != 0.0:
        tensors["score.bias"] = head.bias[
            ...
        ]  # [1] (not read by transformers; see save_pretrained)
    return tensors, "SequenceClassification"


def save_pretrained(model, path: str | os.PathLike, *, tokenizer=None, pad_token_id=None) -> None:
    """Write ``model`` as a Hugging Face checkpoint directory, atomically.

    CausalLM / ActorCritic → ``*ForCausalLM`` (GPT2LMHeadModel); the ActorCritic's value head is saved
    under trl's names ``v_head.summary.*`` (transformers ignores them, ``from_pretrained(head=
    "actor_critic")`` reads them back). RewardModel / ValueModel → ``*ForSequenceClassification``
    with num_labels=1: transformers reads the "score" head at the last token that is not
    ``pad_token_id`` (ours reads the last token with attention_mask 1 — the same position when the pad
    token is used only for padding), so a pad token id is required (argument, tokenizer, or
    config.pad_token_id). transformers' score head has no bias: a non-zero score bias is written as
    an extra ``score.bias`` tensor (read back by us, ignored by transformers) and as config.json's
    ``jaxrlhf_score_bias``, the amount to add to transformers' scores (a one-line note says so).

    Special token ids: config.json carries ``pad/bos/eos_token_id`` — ``pad_token_id`` if given,
    else the tokenizer's, else the model config's (those read from an HF checkpoint's config.json).
    A causal LM also gets a ``generation_config.json`` with the same ids, so transformers'
    ``generate()`` stops at EOS with no extra arguments.

    Files are written to a temporary directory next to ``path`` and renamed into place, so a crash
    never leaves a half-written checkpoint over a good one. Files of an existing ``path`` that we do
    not write (e.g. tokenizer files) are kept; old weight files are replaced.

    A model sharded over a device mesh is gathered first. In a multi-process run every process must
    call this (the gather is a collective); process 0 writes the files.
    """
    path = os.path.abspath(os.fspath(path))
    model = host_model(model)
    if jax.process_index() != 0:
        return
    tensors, architecture = hf_tensors(model)
    model = merge_lora(model)
    config = model.config.replace(**special_token_ids(model.config, tokenizer, pad_token_id))
    hf_config = config.to_hf(architecture=architecture)
    generation = None
    if architecture == "SequenceClassification":
        _check_score_export(model, config, tensors, hf_config, path)
    else:
        generation = {name: getattr(config, name) for name in SPECIAL_TOKEN_IDS}
    _write_checkpoint(path, tensors, hf_config, tokenizer, generation)


SPECIAL_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def special_token_ids(config: ModelConfig, tokenizer=None, pad_token_id=None) -> dict[str, int]:
    """The special token ids an export carries: the model config's, replaced by the tokenizer's
    where it has them, and ``pad_token_id`` (when given) over both. Ids that are None everywhere
    are left out."""
    ids = {name: getattr(config, name) for name in SPECIAL_TOKEN_IDS}
    for name in SPECIAL_TOKEN_IDS:
        value = getattr(tokenizer, name, None) if tokenizer is not None else None
        if value is not None:
            if not 0 <= int(value) < config.vocab_size:
                raise ValueError(
                    f"tokenizer.{name}={value} is outside the model's vocabulary "
                    f"[0, {config.vocab_size}): is it the tokenizer of another model?"
                )
            ids[name] = int(value)
    if pad_token_id is not None:
        ids["pad_token_id"] = int(pad_token_id)
    return {name: value for name, value in ids.items() if value is not None}


def _check_score_export(model, config, tensors: dict, hf_config: dict, path: str) -> None:
    """A *ForSequenceClassification export needs a pad token id; warn where transformers' scores
    will differ from ours, and record a non-zero score bias in ``hf_config``."""
    if config.pad_token_id is None:
        raise ValueError(
            f"saving a {type(model).__name__} needs a pad token id (HF reads the score at the last "
            "non-pad token): pass pad_token_id= or tokenizer=, or set config.pad_token_id"
        )
    if config.eos_token_id is not None and config.eos_token_id == config.pad_token_id:
        warnings.warn(
            "pad_token_id == eos_token_id: transformers will read the score before a final EOS, "
            "jaxrlhf at it; use a distinct pad token for identical scores",
            stacklevel=3,  # the caller of save_pretrained
        )
    if "score.bias" not in tensors:
        return
    bias = float(np.asarray(tensors["score.bias"], np.float32)[0])
    hf_config[SCORE_BIAS_KEY] = bias
    if not isinstance(model, RewardModel):
        return
    if not math.isfinite(bias):  # every score will be non-finite: a broken model, not information
        warnings.warn(
            f"the reward head has bias {bias}: every score of this reward model is {bias}",
            stacklevel=3,  # the caller of save_pretrained
        )
        return
    note(
        f"{path}: reward head bias {bias:g} saved as score.bias and config.json "
        f"{SCORE_BIAS_KEY}; transformers has no score bias: add it to its scores"
    )


def _write_checkpoint(
    path: str, tensors: dict, hf_config: dict, tokenizer, generation: dict | None = None
) -> None:
    """Write weights, config.json, generation_config.json (``generation``: its token ids, None for
    none) and tokenizer to a temporary directory next to ``path``, keep the other files of an
    existing ``path``, and rename it into place."""
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        save_file(
            {k: jnp.asarray(v) for k, v in tensors.items()},
            os.path.join(tmp, WEIGHTS_NAME),
            metadata={"format": "pt"},
        )
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2, sort_keys=True)
        if generation is not None:
            from transformers import GenerationConfig  # no torch import

            GenerationConfig(**generation).save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if os.path.isdir(path):
            _keep_other_files(path, tmp)
        _swap_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _is_weight_file(name: str) -> bool:
    return name.endswith((".safetensors", ".bin", ".pt", ".pth", ".index.json"))


def _keep_other_files(old: str, new: str) -> None:
    """Copy files of the old checkpoint that the new one does not have (tokenizer, README…)."""
    for name in os.listdir(old):
        if _is_weight_file(name) or os.path.exists(os.path.join(new, name)):
            continue
        src = os.path.join(old, name)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(new, name))
        else:
            shutil.copy2(src, os.path.join(new, name))


def _swap_into_place(tmp: str, path: str) -> None:
    """Rename tmp → path; an existing path is moved aside first and deleted only afterwards."""
    if os.path.lexists(path) and not os.path.isdir(path):
        raise FileExistsError(f"{path} exists and is not a directory")
    if not os.path.exists(path):
        os.rename(tmp, path)
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=os.path.dirname(path))
    os.rmdir(old)
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)  # put the good checkpoint back
        raise
    shutil.rmtree(old, ignore_errors=True)


def num_params(model) -> int:
    """Number of parameters (scalars) of a model."""
    return sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
