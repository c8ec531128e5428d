"""The Llama family (Touvron et al. 2023) — also Qwen2/2.5 and Mistral-style configs.

    h₀ = embed_tokens[x]
    hₗ' = hₗ + o_proj(attn(RoPE(q), RoPE(k), v))   with q, k, v projections of RMSNorm(hₗ)
    hₗ₊₁ = hₗ' + down_proj(silu(gate_proj(n)) ⊙ up_proj(n)),   n = RMSNorm(hₗ')      (SwiGLU)
    out = norm(h_L)

Grouped-query attention: K = num_kv_heads key/value heads, each shared by H/K query heads. Qwen2 adds
biases to q/k/v (attention_bias). Rotary embeddings follow the config's rope_theta and rope scaling
(layers.rope_inv_freq). Attribute names follow Hugging Face's LlamaModel.
"""

from __future__ import annotations

import jax
from flax import nnx

from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.layers import (
    RMSNorm,
    apply_rope,
    attend_with_cache,
    dense,
    embedding,
    jnp_dtype,
    make_blocks,
    rope_cos_sin,
    rope_inv_freq,
    scan_blocks,
)


class LlamaAttention(nnx.Module):
    """Causal self-attention with RoPE on q and k, and grouped-query key/value heads."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        D, H, K, d = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        bias = config.attention_bias
        self.q_proj = dense(config, D, H * d, bias=bias, rngs=rngs, name="q_proj")
        self.k_proj = dense(config, D, K * d, bias=bias, rngs=rngs, name="k_proj")
        self.v_proj = dense(config, D, K * d, bias=bias, rngs=rngs, name="v_proj")
        out_bias = config.attention_out_bias
        self.o_proj = dense(config, H * d, D, bias=out_bias, rngs=rngs, name="o_proj")
        self.num_heads, self.num_kv_heads, self.head_dim = H, K, d
        self.dropout = config.dropout

    def __call__(self, x, cos, sin, mask, layer_cache, cache_index, dropout_rng):
        B, T, _ = x.shape
        q = self.q_proj(x).reshape(B, T, self.num_heads, self.head_dim)  # [B, T, H, d]
        k = self.k_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim)  # [B, T, K, d]
        v = self.v_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim)  # [B, T, K, d]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out, layer_cache = attend_with_cache(
            q,
            k,
            v,
            mask,
            layer_cache,
            cache_index,
            dropout_rate=self.dropout,
            dropout_rng=dropout_rng,
        )  # [B, T, H·d]
        return self.o_proj(out), layer_cache  # [B, T, D]


class LlamaMLP(nnx.Module):
    """SwiGLU (Shazeer 2020): down_proj(silu(gate_proj(x)) ⊙ up_proj(x))."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        D, F, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = dense(config, D, F, bias=bias, rngs=rngs, name="gate_proj")
        self.up_proj = dense(config, D, F, bias=bias, rngs=rngs, name="up_proj")
        self.down_proj = dense(config, F, D, bias=bias, rngs=rngs, name="down_proj")

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))  # [B, T, D]


class LlamaBlock(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        dtype = jnp_dtype(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.norm_eps, dtype=dtype)
        self.self_attn = LlamaAttention(config, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(
            config.hidden_size, eps=config.norm_eps, dtype=dtype
        )
        self.mlp = LlamaMLP(config, rngs=rngs)

    def __call__(self, x, cos, sin, mask, layer_cache, cache_index, dropout_rng):
        a, layer_cache = self.self_attn(
            self.input_layernorm(x), cos, sin, mask, layer_cache, cache_index, dropout_rng
        )
        x = x + a  # [B, T, D]
        x = x + self.mlp(self.post_attention_layernorm(x))  # [B, T, D]
        return x, layer_cache


class LlamaModel(nnx.Module):
    """The Llama trunk: token ids → final-RMSNorm hidden states [B, T, D]."""

    BLOCKS = "layers"  # the attribute holding the blocks (CausalLM.unstack_layers, models.hf)

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = embedding(config, config.vocab_size, config.hidden_size, rngs=rngs)
        # One LlamaBlock whose parameters are stacked [L, ...] (layers.stack_blocks), scanned over;
        # or, with config.scan_layers off, a list of L blocks (layers.make_blocks).
        self.layers = make_blocks(lambda: LlamaBlock(config, rngs=rngs), config)
        self.norm = RMSNorm(config.hidden_size, eps=config.norm_eps, dtype=jnp_dtype(config))

    def token_embedding(self):
        """The [V, D] token embedding matrix (the LM head when tie_word_embeddings)."""
        return self.embed_tokens.embedding[...]

    def __call__(
        self, input_ids, positions, mask, *, cache=None, cache_index=0, dropout_rng=None, remat=None
    ):
        """Args: input_ids, positions [B, T]; mask [B, T, S] bool (layers.causal_mask);
        cache: a layers.KVCache or None. remat: recompute each block in the backward pass (None:
        config.remat when there is no cache, so never while decoding). Returns (hidden [B, T, D],
        new cache or None)."""
        x = self.embed_tokens(input_ids)  # [B, T, D]
        # The inverse frequencies are a constant of the config (numpy), not a parameter.
        cos, sin = rope_cos_sin(positions, rope_inv_freq(self.config))  # [B, T, d] each
        if remat is None:
            remat = self.config.remat and cache is None
        x, cache = scan_blocks(
            self.layers, x, cos, sin, mask, cache=cache, cache_index=cache_index,
            dropout_rng=dropout_rng, remat=remat,
        )  # fmt: skip
        x = self.norm(x)  # [B, T, D]
        return x, cache


def hf_weight_names(config: ModelConfig) -> list[tuple[str, tuple, bool]]:
    """(HF tensor name, path in our trunk's state, transpose?) for every trunk parameter.

    A name with ``{i}`` is one HF tensor per layer i, all stacked into one parameter [L, ...] of our
    scanned blocks. torch.nn.Linear stores weight as [out, in]; our kernels are [in, out]: transpose.
    """
    names = [
        ("model.embed_tokens.weight", ("embed_tokens", "embedding"), False),
        ("model.norm.weight", ("norm", "weight"), False),
    ]
    p = "model.layers.{i}."
    for norm in ("input_layernorm", "post_attention_layernorm"):
        names.append((p + f"{norm}.weight", ("layers", norm, "weight"), False))
    projections = [
        ("self_attn", "q_proj", config.attention_bias),
        ("self_attn", "k_proj", config.attention_bias),
        ("self_attn", "v_proj", config.attention_bias),
        ("self_attn", "o_proj", config.attention_out_bias),
        ("mlp", "gate_proj", config.mlp_bias),
        ("mlp", "up_proj", config.mlp_bias),
        ("mlp", "down_proj", config.mlp_bias),
    ]
    for sub, layer, bias in projections:
        names.append((p + f"{sub}.{layer}.weight", ("layers", sub, layer, "kernel"), True))
        if bias:
            names.append((p + f"{sub}.{layer}.bias", ("layers", sub, layer, "bias"), False))
    return names


HF_TRUNK_PREFIX = "model."
