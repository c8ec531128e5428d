"""Shared helpers for the model tests: tiny random Hugging Face checkpoints built once per process.

The checkpoints are made with transformers + torch (test-only dependencies) in a temporary directory;
every parameter, including biases and norm weights, is randomised so that a mis-mapped tensor shows.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile

import jax
import numpy as np
from flax import nnx

VOCAB = 97
PAD, BOS, EOS = 0, 1, 2

# name -> (transformers config class name, kwargs)
TINY_CONFIGS = {
    "gpt2": (
        "GPT2Config",
        {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64},
    ),
    "llama": (
        "LlamaConfig",
        {
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 64,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False,
        },
    ),
    "qwen2": (
        "Qwen2Config",
        {
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "max_position_embeddings": 64,
            "tie_word_embeddings": True,
            "rope_theta": 1000000.0,
        },
    ),
    "llama_rope_llama3": (
        "LlamaConfig",
        {
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "max_position_embeddings": 64,
            "tie_word_embeddings": True,
            "rope_theta": 500.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 4.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 2.0,
                "original_max_position_embeddings": 16,
            },
        },
    ),
    "llama_rope_linear": (
        "LlamaConfig",
        {
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 64,
            "rope_theta": 100.0,
            "rope_scaling": {"rope_type": "linear", "factor": 3.0},
        },
    ),
}


def randomise_(torch_model, seed: int) -> None:
    """Overwrite every parameter with N(0, 0.3²) (norm weights around 1) so nothing is trivially 0/1."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in torch_model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.3
            p.copy_(
                1.0 + noise
                if ("ln" in name or "norm" in name) and name.endswith("weight")
                else noise
            )


def make_hf_model(name: str, *, seed: int = 0, kind: str = "causal"):
    """A tiny random transformers model (torch, eval mode) of one of TINY_CONFIGS."""
    import torch
    import transformers

    cls_name, kwargs = TINY_CONFIGS[name]
    config = getattr(transformers, cls_name)(
        vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, **kwargs
    )
    torch.manual_seed(seed)
    if kind == "causal":
        model = transformers.AutoModelForCausalLM.from_config(config)
    else:
        config.num_labels = 1
        model = transformers.AutoModelForSequenceClassification.from_config(config)
    randomise_(model, seed)
    return model.eval()


@functools.cache
def checkpoint_root() -> str:
    root = tempfile.mkdtemp(prefix="jaxrlhf-hf-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


@functools.cache
def hf_checkpoint(name: str, kind: str = "causal") -> str:
    """Path of a saved tiny checkpoint (built once per test process)."""
    path = f"{checkpoint_root()}/{name}-{kind}"
    make_hf_model(name, kind=kind).save_pretrained(path, safe_serialization=True)
    return path


@functools.cache
def hf_model(name: str, kind: str = "causal"):
    """The transformers model stored at hf_checkpoint(name, kind), loaded back (eval mode)."""
    import transformers

    auto = (
        transformers.AutoModelForCausalLM
        if kind == "causal"
        else transformers.AutoModelForSequenceClassification
    )
    return auto.from_pretrained(hf_checkpoint(name, kind)).eval()


def left_padded_batch(seed: int = 0, lengths=(7, 4, 1, 5), width: int = 7):
    """A left-padded batch of random token ids (no pad/bos/eos ids inside): (ids, mask) int32 [B, W]."""
    rng = np.random.default_rng(seed)
    ids = np.full((len(lengths), width), PAD, np.int32)
    mask = np.zeros((len(lengths), width), np.int32)
    for b, n in enumerate(lengths):
        ids[b, width - n :] = rng.integers(3, VOCAB, n)
        mask[b, width - n :] = 1
    return ids, mask


def torch_logits(model, ids, mask) -> np.ndarray:
    """transformers' logits on a left-padded batch, positions cumsum(mask) − 1 as in generate."""
    import torch

    ids_t = torch.tensor(np.asarray(ids), dtype=torch.long)
    mask_t = torch.tensor(np.asarray(mask), dtype=torch.long)
    positions = (mask_t.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=ids_t, attention_mask=mask_t, position_ids=positions)
    return out.logits.float().numpy()


@functools.partial(jax.jit, static_argnames=("graphdef", "method"))
def _jit_apply(graphdef, state, args, kwargs, method):
    model = nnx.merge(graphdef, state)
    return getattr(model, method)(*args, **kwargs)


def jit_apply(model, *args, method: str = "__call__", **kwargs):
    """``getattr(model, method)(*args, **kwargs)`` compiled once per (graphdef, shapes): far faster on
    CPU than eager NNX calls, and the way trainers call the models (split outside, merge inside)."""
    graphdef, state = nnx.split(model)
    return _jit_apply(graphdef, state, args, kwargs, method)


def padded_batch(
    rows: list[list[int]], *, left: bool, pad: int = PAD
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of token ids padded with ``pad`` to the longest: (ids, mask) int32 [B, W]."""
    width = max(map(len, rows))
    ids = np.full((len(rows), width), pad, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for b, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[b, span], mask[b, span] = row, 1
    return ids, mask


def hf_scores(path, rows: list[list[int]]) -> np.ndarray:
    """transformers' reward scores of right-padded rows (default positions, no extra argument)."""
    import torch
    import transformers

    hf = transformers.AutoModelForSequenceClassification.from_pretrained(path).eval()
    ids, mask = padded_batch(rows, left=False)
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask)).logits
    return logits[:, 0].numpy()
