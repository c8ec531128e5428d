"""PEFT adapter directories ↔ our LoRA models (``models.lora``), offline, no torch at run time.

    save_adapter(model, dir)    adapter_config.json + adapter_model.safetensors, PEFT's names:
                                base_model.model.<HF module>.lora_A.weight [r, d_in], lora_B [d_out, r]
    load_adapter(base, dir)     the base with that adapter on it (rank, α, targets from the config)

The module names come from the family's Hugging Face name table (``hf.trunk_params``), so an adapter
has the names ``peft.PeftModel.from_pretrained(base, dir)`` looks for. ``jaxrlhf_base.json`` beside
them records the shape of the base, checked when loading (peft's own adapters have none).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.flax import load_file, save_file

from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.heads import ActorCritic, CausalLM
from jaxrlhf.models.hf import _swap_into_place, trunk_params
from jaxrlhf.models.lora import (
    ADAPTER_BASE,
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PEFT_PREFIX,
    LoRALinear,
    has_lora,
    with_lora,
)
from jaxrlhf.models.sharding import host_model


def _adapter_modules(lm: CausalLM):
    """(HF module name, with ``{i}`` when one stacked module serves every layer; the LoRALinear;
    stacked?) for every adapted projection of a CausalLM, from the family's name table."""
    for name, _, our_path, layers, _ in trunk_params(lm.model, lm.config):
        if not name.endswith(".weight") or not our_path.endswith("/kernel"):
            continue
        module = lm.model
        for key in our_path.split("/")[:-1]:  # "layers/0/self_attn/q_proj" in a list of blocks
            module = module[int(key)] if key.isdigit() else getattr(module, key)
        if isinstance(module, LoRALinear):
            yield name[: -len(".weight")], module, layers is not None


def _adapter_names(lm: CausalLM):
    """(PEFT name stem of one projection, its LoRALinear, layer index in a stack or None)."""
    for stem, module, stacked in _adapter_modules(lm):
        if stacked:
            for i in range(lm.config.num_layers):
                yield PEFT_PREFIX + stem.format(i=i), module, i
        else:
            yield PEFT_PREFIX + stem, module, None


def _policy_lm(model) -> CausalLM:
    lm = model.lm if isinstance(model, ActorCritic) else model
    if not isinstance(lm, CausalLM):
        raise TypeError(
            f"a PEFT adapter here is a policy's (a CausalLM), not a {type(model).__name__}'s "
            "(give a reward model or a separate critic fresh adapters with lora_rank instead)"
        )
    return lm


def save_adapter(model, path: str | os.PathLike, *, base_model: str | None = None) -> None:
    """Write the adapters of a LoRA model as a PEFT adapter directory, atomically:
    ``adapter_config.json`` + ``adapter_model.safetensors`` with PEFT's names
    (``base_model.model.<HF module>.lora_A.weight`` [r, d_in], ``….lora_B.weight`` [d_out, r]), so
    ``peft.PeftModel.from_pretrained(base, path)`` gives this model's logits. ``base_model``:
    recorded as ``base_model_name_or_path``."""
    lm = _policy_lm(host_model(model))
    if not has_lora(lm):
        raise ValueError("the model has no LoRA adapters to save (train with lora_rank ≥ 1)")
    if jax.process_index() != 0:
        return
    tensors = {}
    for stem, module, i in _adapter_names(lm):
        a, b = module.lora_a[...], module.lora_b[...]
        a, b = (a, b) if i is None else (a[i], b[i])
        tensors[stem + ".lora_A.weight"] = a.T  # [r, d_in]
        tensors[stem + ".lora_B.weight"] = b.T  # [d_out, r]
    config = lm.config
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": config.lora_rank,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(config.lora_targets),
        "bias": "none",
        "fan_in_fan_out": config.family == "gpt2",  # GPT-2's Conv1D stores weights [in, out]
        "use_rslora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "base_model_name_or_path": base_model,
    }
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=os.path.dirname(path))
    try:
        save_file({k: jnp.asarray(v) for k, v in tensors.items()},
                  os.path.join(tmp, ADAPTER_WEIGHTS), metadata={"format": "pt"})  # fmt: skip
        with open(os.path.join(tmp, ADAPTER_CONFIG), "w") as f:
            json.dump(adapter_config, f, indent=2, sort_keys=True)
        with open(os.path.join(tmp, ADAPTER_BASE), "w") as f:  # (peft warns on unknown keys)
            json.dump(_base_signature(config), f, indent=2, sort_keys=True)
        _swap_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _base_signature(config: ModelConfig) -> dict:
    """The shape of the base an adapter was made for (written with it, checked when loading)."""
    names = ("hf_model_type", "vocab_size", "hidden_size", "num_layers", "num_heads",
             "num_kv_heads", "intermediate_size")  # fmt: skip
    return {name: getattr(config, name) for name in names}


def load_adapter(model, path: str | os.PathLike):
    """``model`` (a base CausalLM or ActorCritic, no adapters) with the PEFT LoRA adapter of
    ``path`` on it: rank, α and target modules from its ``adapter_config.json``, A and B from its
    safetensors. An adapter made for another base (another shape or missing tensors) is refused
    with the file and the tensor that do not fit."""
    path = os.fspath(path)
    adapter_config, config_file, weights_file = _read_adapter_config(path)
    _check_base(path, _policy_lm(model).config)
    targets = adapter_config.get("target_modules")
    targets = None if targets in (None, "all-linear") else tuple(sorted(targets))
    try:
        adapted = with_lora(model, rank=int(adapter_config["r"]),
                            alpha=float(adapter_config["lora_alpha"]), targets=targets)  # fmt: skip
    except (KeyError, ValueError) as err:
        raise ValueError(f"{config_file}: {err}") from None
    tensors = {k.replace(".default.", "."): v for k, v in load_file(weights_file).items()}
    layers: dict[int, tuple] = {}  # id(param) → (param, [(layer index or None, value)])
    for stem, module, i in _adapter_names(_policy_lm(adapted)):
        for kind, param in (("lora_A", module.lora_a), ("lora_B", module.lora_b)):
            key = f"{stem}.{kind}.weight"
            if key not in tensors:
                raise ValueError(f"{weights_file}: no tensor {key!r} (an adapter for another "
                                 "base model, or other target modules)")  # fmt: skip
            value = np.asarray(tensors[key].astype(jnp.float32)).T  # ours: [d_in, r], [r, d_out]
            want = tuple(param.shape if i is None else param.shape[1:])
            if value.shape != want:
                raise ValueError(f"{weights_file}: {key!r} is {value.T.shape}, this base needs "
                                 f"{want[::-1]} (an adapter for another base model)")  # fmt: skip
            layers.setdefault(id(param), (param, []))[1].append((i, value))
    for param, values in layers.values():
        stacked = values[0][0] is not None
        param.set_value(jnp.asarray(np.stack([v for _, v in sorted(values)]) if stacked
                                    else values[0][1]))  # fmt: skip
    return adapted


def _read_adapter_config(path: str) -> tuple[dict, str, str]:
    """(adapter_config.json's dict, its path, the weights' path) of a plain-LoRA PEFT adapter."""
    config_file = os.path.join(path, ADAPTER_CONFIG)
    weights_file = os.path.join(path, ADAPTER_WEIGHTS)
    for file in (config_file, weights_file):
        if not os.path.isfile(file):
            raise FileNotFoundError(f"adapter: {file} not found (a PEFT adapter directory has "
                                    f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")  # fmt: skip
    with open(config_file) as f:
        adapter_config = json.load(f)
    if adapter_config.get("peft_type") != "LORA":
        raise ValueError(f"{config_file}: peft_type {adapter_config.get('peft_type')!r}, not LORA")
    for key, plain in (("use_rslora", False), ("use_dora", False), ("bias", "none")):
        if adapter_config.get(key, plain) != plain:
            raise ValueError(f"{config_file}: {key}={adapter_config[key]!r} is not supported "
                             f"(only plain LoRA: {key}={plain!r})")  # fmt: skip
    return adapter_config, config_file, weights_file


def _check_base(path: str, config: ModelConfig) -> None:
    """Refuse an adapter whose ``jaxrlhf_base.json`` names another base shape (peft's own
    adapters have no such file: their tensors' shapes are checked instead)."""
    base_file = os.path.join(path, ADAPTER_BASE)
    if not os.path.isfile(base_file):
        return
    with open(base_file) as f:
        signature = json.load(f)
    ours = _base_signature(config)
    differs = {k: (v, ours.get(k)) for k, v in signature.items() if ours.get(k) != v}
    if differs:
        raise ValueError(
            f"{base_file}: the adapter was made for another base model ("
            + ", ".join(f"{k} {a}, this model {b}" for k, (a, b) in differs.items())
            + ")"
        )
