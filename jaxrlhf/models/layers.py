"""Pieces shared by the GPT-2 and Llama families: norms, dropout, RoPE, masks, attention, KV cache.

Everything here is either a pure function on arrays or a tiny NNX module whose forward pass reads its
parameters and nothing else (no mutable state), so a model can be used functionally:
``graphdef, state = nnx.split(model)`` outside ``jax.jit`` and ``nnx.merge(graphdef, state)`` inside.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.lora import LoRALinear, is_target

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def jnp_dtype(config: ModelConfig):
    """The parameter dtype of a config."""
    return DTYPES[config.dtype]


def compute_dtype(config: ModelConfig):
    """The activation / matmul dtype of a config (the parameter dtype unless set)."""
    return DTYPES[config.compute_dtype or config.dtype]


def dense(
    config: ModelConfig, d_in: int, d_out: int, *, bias: bool, rngs: nnx.Rngs, name: str
) -> nnx.Linear:
    """A Linear layer, kernel [d_in, d_out] ~ N(0, initializer_range²), zero bias; parameters in
    the parameter dtype, inputs and kernel cast to the compute dtype for the matmul. ``name`` is
    the projection's Hugging Face name: a LoRA target of the config (``config.lora_targets``) is a
    ``lora.LoRALinear``, the same layer plus an adapter."""
    kw = {
        "use_bias": bias,
        "kernel_init": nnx.initializers.normal(config.initializer_range),
        "dtype": compute_dtype(config),
        "param_dtype": jnp_dtype(config),
        "rngs": rngs,
    }
    if is_target(config, name):
        return LoRALinear(d_in, d_out, rank=config.lora_rank, alpha=config.lora_alpha, **kw)
    return nnx.Linear(d_in, d_out, **kw)


def embedding(config: ModelConfig, num: int, dim: int, *, rngs: nnx.Rngs) -> nnx.Embed:
    """An embedding table [num, dim] ~ N(0, initializer_range²); looked-up rows in compute dtype."""
    return nnx.Embed(
        num,
        dim,
        embedding_init=nnx.initializers.normal(config.initializer_range),
        dtype=compute_dtype(config),
        param_dtype=jnp_dtype(config),
        rngs=rngs,
    )


def make_blocks(make_block, config: ModelConfig) -> nnx.Module:
    """The trunk's ``config.num_layers`` blocks in the layout ``config.scan_layers`` asks for: one
    stacked module (:func:`stack_blocks`, scanned) or a list of L blocks (run in a Python loop). The
    two hold the same weights (the blocks are made in the same order) and give the same results."""
    if config.scan_layers:
        return stack_blocks(make_block, config.num_layers)
    return nnx.List([make_block() for _ in range(config.num_layers)])


def stack_blocks(make_block, num_layers: int) -> nnx.Module:
    """``num_layers`` blocks as one module of the same class whose every parameter has a leading
    layer axis [L, ...]: what :func:`scan_blocks` scans over.

    The blocks are made one after another (``make_block()`` L times, drawing from the same rngs in
    the same order as a Python list of blocks would) and their parameters stacked, so a model has
    the same weights whether its layers are stacked or not. Under ``nnx.eval_shape`` (loading a
    checkpoint) nothing is allocated.
    """
    blocks = [make_block() for _ in range(num_layers)]
    return stack_list(nnx.List(blocks))


def stack_list(blocks: nnx.List) -> nnx.Module:
    """A list of L blocks of one class as one stacked module, parameters [L, ...] (the inverse of
    :func:`unstack_blocks`)."""
    graphdef, _ = nnx.split(blocks[0])
    states = [nnx.state(block) for block in blocks]
    return nnx.merge(graphdef, jax.tree.map(lambda *layers: jnp.stack(layers), *states))


SAVE_MATMULS = jax.checkpoint_policies.dots_saveable
"""What the scan keeps for the backward pass without remat: every matrix product's output; the
elementwise work between them (casts, norms, softmax, SwiGLU) is recomputed from those. XLA's fusion
did the same to an unrolled loop; a scan's body is cut off from it, and saving every intermediate
cost 1.02 GiB per Qwen2.5-0.5B layer (8 devices, 2 × 512 tokens) against 0.38 GiB with this policy
(``benchmarks/bench_memory.py --num-layers 4`` and ``8``)."""


def unstack_blocks(stacked: nnx.Module) -> nnx.List:
    """The inverse of :func:`stack_blocks`: the L blocks of a stacked module as a list, block l
    holding slice l of every parameter. :func:`scan_blocks` runs a list as a Python loop."""
    graphdef, params = nnx.split(stacked)
    num_layers = jax.tree.leaves(params)[0].shape[0]
    layer_params = [jax.tree.map(lambda p, l=l: p[l], params) for l in range(num_layers)]
    return nnx.List([nnx.merge(graphdef, p) for p in layer_params])


def scan_blocks(blocks: nnx.Module, x, *args, cache=None, cache_index=0, dropout_rng=None,
                rng_offset: int = 0, remat: bool = False):  # fmt: skip
    """x through the L blocks in order: ``jax.lax.scan`` over their stacked parameters.

        xₗ₊₁, cacheₗ = block(params[l])(xₗ, *args, cacheₗ, cache_index, fold_rng(dropout_rng, l + offset))

    One block is traced and compiled whatever the depth, and over a device mesh GSPMD gathers one
    layer's weights at a time. The body is under ``jax.checkpoint``: with ``remat`` its policy is
    ``nothing_saveable``, so the backward pass keeps only each block's input xₗ ([B, T, D] per layer)
    and recomputes the block's inside, one layer at a time (activation checkpointing); without, it
    keeps the matrix products' outputs (:data:`SAVE_MATMULS`).
    ``cache`` (a :class:`KVCache`) is scanned with the parameters: layer l reads and writes its own
    slice. ``blocks`` may also be a list (``ModelConfig.scan_layers`` off, or
    :func:`unstack_blocks`): then a Python loop runs them, with the cache in either of its forms
    (:meth:`KVCache.per_layer`); that is how generate decodes.
    Returns (x_L, new cache or None), the cache in the form it came in.
    """
    if isinstance(blocks, nnx.List):
        return _loop_blocks(blocks, x, *args, cache=cache, cache_index=cache_index,
                            dropout_rng=dropout_rng, rng_offset=rng_offset, remat=remat)  # fmt: skip
    graphdef, params = nnx.split(blocks)
    stacked = None if cache is None else cache.stacked()
    layer_caches = None if cache is None else (stacked.keys, stacked.values)

    def body(x, layer):
        layer_params, layer_cache, index = layer
        block = nnx.merge(graphdef, layer_params)
        return block(x, *args, layer_cache, cache_index, fold_rng(dropout_rng, index + rng_offset))

    policy = jax.checkpoint_policies.nothing_saveable if remat else SAVE_MATMULS
    body = jax.checkpoint(body, prevent_cse=False, policy=policy)
    layers = jnp.arange(jax.tree.leaves(params)[0].shape[0])  # [L]: every parameter's leading axis
    x, layer_caches = jax.lax.scan(body, x, (params, layer_caches, layers))
    if cache is not None:
        stacked = KVCache(keys=layer_caches[0], values=layer_caches[1])
        cache = stacked if cache.is_stacked else stacked.per_layer()
    return x, cache


def _loop_blocks(blocks: nnx.List, x, *args, cache, cache_index, dropout_rng, rng_offset, remat):
    """scan_blocks over a list of blocks: layer l in a Python loop, its cache (per layer) updated in
    place. With ``remat`` each block is under ``jax.checkpoint`` (``nothing_saveable``); without,
    XLA sees the whole unrolled graph and fuses and schedules across layers."""
    layer_caches = None if cache is None else cache.per_layer()
    keys, values = [], []
    for l, block in enumerate(blocks):
        layer_cache = None if cache is None else (layer_caches.keys[l], layer_caches.values[l])
        rng = fold_rng(dropout_rng, l + rng_offset)
        if remat:
            x, layer_cache = _remat_block(block, x, args, layer_cache, cache_index, rng)
        else:
            x, layer_cache = block(x, *args, layer_cache, cache_index, rng)
        if cache is not None:
            keys.append(layer_cache[0])
            values.append(layer_cache[1])
    if cache is not None:
        per_layer = KVCache(keys=tuple(keys), values=tuple(values))
        cache = per_layer.stacked() if cache.is_stacked else per_layer
    return x, cache


def _remat_block(block, x, args, layer_cache, cache_index, rng):
    """One block's forward under ``jax.checkpoint``: the backward pass keeps its input alone."""
    graphdef, params = nnx.split(block)

    def run(params, x, args, layer_cache, cache_index, rng):
        return nnx.merge(graphdef, params)(x, *args, layer_cache, cache_index, rng)

    run = jax.checkpoint(run, prevent_cse=False, policy=jax.checkpoint_policies.nothing_saveable)
    return run(params, x, args, layer_cache, cache_index, rng)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x, weight, bias, eps: float):
    """y = x̂ · w + b,  x̂ = (x − μ) · r,  μ = mean(x),  r = 1/√(var(x) + ε); statistics in float32.

    Its backward is written out (``jax.custom_vjp``) rather than derived by autodiff: with g = dy · w,

        dx = r · (g − mean(g) − x̂ · mean(g · x̂)),   dw = Σ dy · x̂,   db = Σ dy

    (sums over every axis but the last). Autodiff's version computes the same values, but XLA's CPU
    backend fused its ~40 elementwise ops into the strided copies that transpose dx for the weight
    gradients: 24% of a 3.5M-parameter GPT-2's gradient (profiled), 5% with this form, which cut
    that gradient from 232 to 185 ms. x: [..., D]; weight, bias: [D].
    """
    return _layer_norm_forward(x, weight, bias, eps)[0]


def _layer_norm_forward(x, weight, bias, eps):
    x32 = x.astype(jnp.float32)
    centred = x32 - x32.mean(-1, keepdims=True)  # [..., D]
    r = jax.lax.rsqrt(jnp.square(centred).mean(-1, keepdims=True) + eps)  # [..., 1]
    normed = centred * r  # x̂ [..., D]
    y = normed * weight.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(x.dtype), (normed, r, weight)


def _layer_norm_backward(eps, residuals, dy):
    del eps
    normed, r, weight = residuals
    dy32 = dy.astype(jnp.float32)
    g = dy32 * weight.astype(jnp.float32)  # [..., D]
    dx = r * (g - g.mean(-1, keepdims=True) - normed * (g * normed).mean(-1, keepdims=True))
    rows = tuple(range(dy.ndim - 1))
    dw = jnp.sum(dy32 * normed, axis=rows).astype(weight.dtype)  # [D]
    db = jnp.sum(dy32, axis=rows).astype(weight.dtype)  # [D]
    return dx.astype(dy.dtype), dw, db


layer_norm.defvjp(_layer_norm_forward, _layer_norm_backward)


class LayerNorm(nnx.Module):
    """y = (x − mean(x)) / √(var(x) + ε) · weight + bias, statistics in float32 (GPT-2)."""

    def __init__(self, dim: int, *, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype))
        self.eps = eps

    def __call__(self, x):  # [..., D]
        return layer_norm(x, self.weight[...], self.bias[...], self.eps)


class RMSNorm(nnx.Module):
    """y = weight · x / √(mean(x²) + ε), statistics in float32 (Llama; Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, *, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x):  # [..., D]
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * y.astype(x.dtype)


def dropout(x, rate: float, rng):
    """Inverted dropout: keep each entry with probability 1 − rate and scale by 1 / (1 − rate).

    The identity when ``rate == 0`` or ``rng is None`` (rollout, evaluation, and the default RL setup).
    """
    if rate == 0.0 or rng is None:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def fold_rng(rng, *indices: int):
    """A distinct dropout key per (layer, site); None stays None."""
    if rng is None:
        return None
    for i in indices:
        rng = jax.random.fold_in(rng, i)
    return rng


# ----------------------------------------------------------------------------- positions & masks


def positions_from_mask(attention_mask):
    """Position of each token = number of real tokens before it: cumsum(mask) − 1, clipped at 0.

    With left padding this gives a padded row the same positions (hence the same logits) as the
    unpadded row.
    """
    mask = attention_mask.astype(jnp.int32)  # [B, T]
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)  # [B, T]


def causal_mask(kv_mask, num_queries: int, cache_index=0):
    """Which key slot each query may attend to.

    Query i sits at slot ``cache_index + i``; it sees key slot j iff j ≤ cache_index + i and
    kv_mask[j] = 1.
    Args:
      kv_mask: [B, S] 1 for real keys (the prompt's attention mask, then ones for generated tokens).
      num_queries: T, the number of new tokens.
      cache_index: slot of the first new token (0 without a cache).
    Returns: [B, T, S] bool.
    """
    S = kv_mask.shape[-1]
    query_slot = cache_index + jnp.arange(num_queries)  # [T]
    key_slot = jnp.arange(S)  # [S]
    causal = key_slot[None, :] <= query_slot[:, None]  # [T, S]
    return causal[None] & kv_mask.astype(bool)[:, None, :]  # [B, T, S]


# ----------------------------------------------------------------------------- RoPE


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies ωᵢ = θ^(−2i/d), i < d/2, with the config's rope scaling (Su et al. 2021).

    linear:  ωᵢ / factor (positions interpolated by ``factor``).
    llama3:  wavelengths λᵢ = 2π/ωᵢ longer than L/low_freq_factor are divided by ``factor``, shorter than
             L/high_freq_factor kept, and in between interpolated with
             s = (L/λᵢ − low) / (high − low):  ωᵢ' = (1 − s) ωᵢ / factor + s ωᵢ,
             where L = original_max_position_embeddings (Llama 3.1 report).
    """
    d = config.head_dim
    inv_freq = 1.0 / (
        np.float32(config.rope_theta) ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d)
    )  # [d/2]
    scaling = config.rope_scaling_dict
    if scaling is None:
        return inv_freq.astype(np.float32)
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return (inv_freq / factor).astype(np.float32)
    # llama3
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(positions, inv_freq):
    """cos and sin of the rotation angles pos · ωᵢ, each [B, T, d] (the d/2 angles repeated twice)."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, d/2]
    angles = jnp.concatenate([angles, angles], axis=-1)  # [B, T, d]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
    """Rotate each (xᵢ, xᵢ₊d/2) pair by its angle: x·cos + rotate_half(x)·sin (HF's half-split layout).

    x: [B, T, H, d]; cos, sin: [B, T, d].
    """
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)  # [B, T, H, d]
    cos = cos[:, :, None, :].astype(x.dtype)  # [B, T, 1, d]
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


# ----------------------------------------------------------------------------- attention & KV cache


@struct.dataclass
class KVCache:
    """Keys and values of every layer for a preallocated window of S slots (used by generate).

    Two forms of the same numbers: **stacked** on a leading layer axis like the blocks' parameters
    (keys, values [L, B, K, S, d]; what :func:`scan_blocks` scans and what prefill returns) and
    **per layer** (tuples of L arrays [B, K, S, d]; :meth:`per_layer`). The decode loop carries the
    per-layer form: each step writes one slot of each layer's array in place, where the stacked form
    was sliced out and stacked back, a copy of the whole cache at every step (with the per-step
    slices of stacked weights, the 26M GPT-2 decoded at 0.53× the speed: bench_rollout).
    Heads come before slots so that attention over the cache is a plain batched matrix product: no
    per-step transpose (copy) of the whole cache.
    """

    keys: jax.Array | tuple  # [L, B, K, S, d], or L × [B, K, S, d]
    values: jax.Array | tuple  # the same

    @classmethod
    def zeros(cls, config: ModelConfig, batch: int, length: int) -> KVCache:
        shape = (config.num_layers, batch, config.num_kv_heads, length, config.head_dim)
        zeros = jnp.zeros(shape, compute_dtype(config))
        return cls(keys=zeros, values=zeros)

    @property
    def is_stacked(self) -> bool:
        return not isinstance(self.keys, tuple)

    def stacked(self) -> KVCache:
        """The stacked form, keys and values [L, B, K, S, d]."""
        if self.is_stacked:
            return self
        return KVCache(keys=jnp.stack(self.keys), values=jnp.stack(self.values))

    def per_layer(self) -> KVCache:
        """The per-layer form, keys and values tuples of L arrays [B, K, S, d]."""
        if not self.is_stacked:
            return self
        return KVCache(keys=tuple(self.keys), values=tuple(self.values))

    @property
    def length(self) -> int:
        """S, the number of slots."""
        return jax.tree.leaves(self.keys)[0].shape[-2]

    def repeat(self, times: int) -> KVCache:
        """Each batch row repeated ``times`` times in place (B → B·times): the cache of one prompt
        shared by its group of responses."""
        if times == 1:
            return self
        return jax.tree.map(lambda x: jnp.repeat(x, times, axis=-4), self)  # the B axis

    def grow(self, length: int) -> KVCache:
        """The same cache with ``length`` ≥ S slots: the new slots (S … length − 1) are zeros.

        generate grows its cache in buckets as the response gets longer, so that a decode step
        attends over the slots filled so far (rounded up to the bucket) rather than the whole
        response's worth: one copy per bucket instead of reading empty slots at every step.
        """
        extra = length - self.length
        if extra < 0:
            raise ValueError(f"cannot grow a cache of {self.length} slots to {length}")

        def pad(x):  # [..., S, d] → [..., length, d]
            return jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, extra), (0, 0)])

        return jax.tree.map(pad, self)


def write_cache(cache_kv, new, cache_index):
    """Write new keys (or values) [B, K, T, d] into the cache [B, K, S, d] at slots cache_index…+T."""
    return jax.lax.dynamic_update_slice(
        cache_kv, new.astype(cache_kv.dtype), (0, 0, cache_index, 0)
    )


def attention(q, k, v, mask, *, dropout_rate: float = 0.0, dropout_rng=None):
    """Scaled dot-product attention with grouped-query heads (Vaswani et al. 2017; Ainslie et al. 2023).

    softmax(q kᵀ / √d + mask) v, where each of the K key/value heads serves G = H/K query heads.
    Scores and softmax are in float32; masked scores get the most negative float, so a row with no
    visible key (a padding query) gives finite, ignored output instead of NaN.
    Args:
      q: [B, T, H, d] queries; k, v: [B, K, S, d] keys/values; mask: [B, T, S] bool.
    Returns: [B, T, H·d].
    """
    B, T, H, d = q.shape
    K = k.shape[1]
    q = q.reshape(B, T, K, H // K, d).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, d]
    scores = jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(d)  # [B, K, G, T, S]
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)  # [B, K, G, T, S]
    probs = dropout(probs, dropout_rate, dropout_rng)
    out = jnp.einsum("bkgts,bksd->bkgtd", probs.astype(v.dtype), v)  # [B, K, G, T, d]
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, H * d)


def attend_with_cache(
    q, k, v, mask, layer_cache, cache_index, *, dropout_rate=0.0, dropout_rng=None
):
    """Attention over the new keys alone (layer_cache None) or over the cache after writing them in.

    q: [B, T, H, d]; k, v: [B, T, K, d]. Returns (output [B, T, H·d], new layer cache or None).
    """
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, d]
    if layer_cache is not None:
        k = write_cache(layer_cache[0], k, cache_index)  # [B, K, S, d]
        v = write_cache(layer_cache[1], v, cache_index)
        layer_cache = (k, v)
    out = attention(q, k, v, mask, dropout_rate=dropout_rate, dropout_rng=dropout_rng)
    return out, layer_cache
