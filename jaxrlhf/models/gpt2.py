"""GPT-2 (Radford et al. 2019): learned positions, pre-LayerNorm blocks, GELU MLP, tied embeddings.

    h₀ = wte[x] + wpe[pos]
    hₗ' = hₗ + attn(ln_1(hₗ));   hₗ₊₁ = hₗ' + mlp(ln_2(hₗ'))      mlp(x) = c_proj(gelu(c_fc(x)))
    out = ln_f(h_L)        (the LM head, in heads.py, is out · wteᵀ)

Attribute names follow Hugging Face's GPT2Model so that checkpoint conversion (hf.py) is a table.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.layers import (
    LayerNorm,
    attend_with_cache,
    dense,
    dropout,
    embedding,
    fold_rng,
    jnp_dtype,
    make_blocks,
    scan_blocks,
)


class GPT2Attention(nnx.Module):
    """Multi-head causal self-attention with a fused q/k/v projection c_attn [D, 3D]."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        D = config.hidden_size
        self.c_attn = dense(config, D, 3 * D, bias=True, rngs=rngs, name="c_attn")
        self.c_proj = dense(config, D, D, bias=True, rngs=rngs, name="c_proj")
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.dropout = config.dropout

    def __call__(self, x, mask, layer_cache, cache_index, dropout_rng):
        B, T, _D = x.shape
        q, k, v = jnp.split(self.c_attn(x), 3, axis=-1)  # 3 × [B, T, D]
        q, k, v = (a.reshape(B, T, self.num_heads, self.head_dim) for a in (q, k, v))
        out, layer_cache = attend_with_cache(
            q,
            k,
            v,
            mask,
            layer_cache,
            cache_index,
            dropout_rate=self.dropout,
            dropout_rng=fold_rng(dropout_rng, 0),
        )  # [B, T, D]
        out = dropout(self.c_proj(out), self.dropout, fold_rng(dropout_rng, 1))
        return out, layer_cache


class GPT2MLP(nnx.Module):
    """c_proj(gelu(c_fc(x))), GELU in the tanh approximation for "gelu_new" (as HF)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        D, F = config.hidden_size, config.intermediate_size
        self.c_fc = dense(config, D, F, bias=True, rngs=rngs, name="c_fc")
        self.c_proj = dense(config, F, D, bias=True, rngs=rngs, name="c_proj")
        self.approximate = config.hidden_act != "gelu"
        self.dropout = config.dropout

    def __call__(self, x, dropout_rng):
        h = jax.nn.gelu(self.c_fc(x), approximate=self.approximate)  # [B, T, F]
        return dropout(self.c_proj(h), self.dropout, dropout_rng)  # [B, T, D]


class GPT2Block(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        dtype = jnp_dtype(config)
        self.ln_1 = LayerNorm(config.hidden_size, eps=config.norm_eps, dtype=dtype)
        self.attn = GPT2Attention(config, rngs=rngs)
        self.ln_2 = LayerNorm(config.hidden_size, eps=config.norm_eps, dtype=dtype)
        self.mlp = GPT2MLP(config, rngs=rngs)

    def __call__(self, x, mask, layer_cache, cache_index, dropout_rng):
        a, layer_cache = self.attn(
            self.ln_1(x), mask, layer_cache, cache_index, fold_rng(dropout_rng, 0)
        )
        x = x + a  # [B, T, D]
        x = x + self.mlp(self.ln_2(x), fold_rng(dropout_rng, 1))  # [B, T, D]
        return x, layer_cache


class GPT2Model(nnx.Module):
    """The GPT-2 trunk: token ids → final-LayerNorm hidden states [B, T, D]."""

    BLOCKS = "h"  # the attribute holding the blocks (CausalLM.unstack_layers, models.hf)

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.wte = embedding(config, config.vocab_size, config.hidden_size, rngs=rngs)
        self.wpe = embedding(config, config.max_position_embeddings, config.hidden_size, rngs=rngs)
        # One GPT2Block whose parameters are stacked [L, ...] (layers.stack_blocks), scanned over;
        # or, with config.scan_layers off, a list of L blocks (layers.make_blocks).
        self.h = make_blocks(lambda: GPT2Block(config, rngs=rngs), config)
        self.ln_f = LayerNorm(config.hidden_size, eps=config.norm_eps, dtype=jnp_dtype(config))

    def token_embedding(self):
        """The [V, D] token embedding matrix (the tied LM head)."""
        return self.wte.embedding[...]

    def __call__(
        self, input_ids, positions, mask, *, cache=None, cache_index=0, dropout_rng=None, remat=None
    ):
        """Args: input_ids, positions [B, T]; mask [B, T, S] bool (layers.causal_mask);
        cache: a layers.KVCache or None. remat: recompute each block in the backward pass (None:
        config.remat when there is no cache, so never while decoding). Returns (hidden [B, T, D],
        new cache or None)."""
        x = self.wte(input_ids) + self.wpe(positions)  # [B, T, D]
        x = dropout(x, self.config.dropout, fold_rng(dropout_rng, 0))
        if remat is None:
            remat = self.config.remat and cache is None
        x, cache = scan_blocks(
            self.h, x, mask, cache=cache, cache_index=cache_index, dropout_rng=dropout_rng,
            rng_offset=1, remat=remat,
        )  # fmt: skip
        x = self.ln_f(x)  # [B, T, D]
        return x, cache


def hf_weight_names(config: ModelConfig) -> list[tuple[str, tuple, bool]]:
    """(HF tensor name, path in our trunk's state, transpose?) for every trunk parameter.

    A name with ``{i}`` is one HF tensor per layer i, all stacked into one parameter [L, ...] of our
    scanned blocks. HF's GPT-2 uses Conv1D layers whose weight is already [in, out] like our
    kernels: no transposes.
    """
    del config  # every GPT-2 has the same tensors
    names = [
        ("transformer.wte.weight", ("wte", "embedding"), False),
        ("transformer.wpe.weight", ("wpe", "embedding"), False),
        ("transformer.ln_f.weight", ("ln_f", "weight"), False),
        ("transformer.ln_f.bias", ("ln_f", "bias"), False),
    ]
    p = "transformer.h.{i}."
    for ln in ("ln_1", "ln_2"):
        names += [
            (p + f"{ln}.weight", ("h", ln, "weight"), False),
            (p + f"{ln}.bias", ("h", ln, "bias"), False),
        ]
    for sub, layer in (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj")):
        names += [
            (p + f"{sub}.{layer}.weight", ("h", sub, layer, "kernel"), False),
            (p + f"{sub}.{layer}.bias", ("h", sub, layer, "bias"), False),
        ]
    return names


HF_TRUNK_PREFIX = "transformer."
