"""The chunked LM-head log-probs and entropy (models/lm_head.py) against the readable reference on
full logits (rl.token_logprobs, rl.token_entropy): values and gradients, every chunking."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf import rl
from jaxrlhf.models.lm_head import default_chunk, head_logprobs


def problem(seed=0, B=3, T=7, D=16, V=37, dtype=jnp.float32):
    k = jax.random.split(jax.random.PRNGKey(seed), 3)
    hidden = jax.random.normal(k[0], (B, T, D), dtype)
    weight = (0.5 * jax.random.normal(k[1], (V, D))).astype(dtype)
    tokens = jax.random.randint(k[2], (B, T), 0, V)
    mask = (jnp.arange(T)[None] < jnp.array([[7], [4], [1]])).astype(jnp.float32)
    return hidden, weight, tokens, mask


def reference(hidden, weight, tokens, temperature):
    logits = jnp.einsum("btd,vd->btv", hidden, weight, preferred_element_type=jnp.float32)
    return (
        rl.token_logprobs(logits, tokens, temperature=temperature),
        rl.token_entropy(logits, temperature=temperature),
    )


def loss(fn, mask, ent_coef=0.1):
    """A PPO-shaped scalar: Σ w·logπ − c·Σ H over the mask, with fixed weights w."""

    def f(hidden, weight):
        logprobs, entropy = fn(hidden, weight)
        w = jnp.linspace(-1.0, 2.0, logprobs.size).reshape(logprobs.shape)
        return jnp.sum(mask * (w * logprobs - ent_coef * entropy))

    return f


# 21 tokens: one chunk, chunks that divide it, chunks that do not (a padded last chunk), 1 token
@pytest.mark.parametrize("chunk", [None, 21, 7, 5, 1])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_and_gradients_equal_the_full_logits(chunk, temperature):
    hidden, weight, tokens, mask = problem()
    ours = lambda h, w: head_logprobs(
        h, w, tokens, temperature=temperature, logits_chunk_size=chunk, entropy=True,
        entropy_grad=True,
    )  # fmt: skip
    full = lambda h, w: reference(h, w, tokens, temperature)
    for a, b in zip(ours(hidden, weight), full(hidden, weight)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    g_ours = jax.grad(loss(ours, mask), argnums=(0, 1))(hidden, weight)
    g_full = jax.grad(loss(full, mask), argnums=(0, 1))(hidden, weight)
    for a, b in zip(g_ours, g_full):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(g_full[0][2, 1:]).max()) == 0.0  # masked positions get no gradient


def test_without_entropy_grad_the_entropy_is_a_constant():
    hidden, weight, tokens, mask = problem(1)
    lp_only = loss(lambda h, w: (head_logprobs(h, w, tokens)[0], 0.0), mask)
    no_grad = loss(
        lambda h, w: head_logprobs(h, w, tokens, logits_chunk_size=4, entropy=True),
        mask,
    )
    a = jax.grad(lp_only, argnums=(0, 1))(hidden, weight)
    b = jax.grad(no_grad, argnums=(0, 1))(hidden, weight)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)
    _, ent = head_logprobs(hidden, weight, tokens, logits_chunk_size=4, entropy=True)
    np.testing.assert_allclose(ent, reference(hidden, weight, tokens, 1.0)[1], rtol=1e-5)


def test_bfloat16_within_its_tolerance():
    hidden, weight, tokens, _ = problem(2, dtype=jnp.bfloat16)
    ours = head_logprobs(hidden, weight, tokens, logits_chunk_size=4, entropy=True)
    full = reference(hidden.astype(jnp.float32), weight.astype(jnp.float32), tokens, 1.0)
    for a, b in zip(ours, full):
        assert a.dtype == jnp.float32
        np.testing.assert_allclose(a, b, rtol=0.05, atol=0.1)  # bf16 inputs: ~3 significant digits


def test_the_chunk_must_fit_the_tokens():
    hidden, weight, tokens, _ = problem()
    for bad in (0, -3, 22):
        with pytest.raises(ValueError, match=rf"logits_chunk_size = {bad}: must be in \[1, 21\]"):
            head_logprobs(hidden, weight, tokens, logits_chunk_size=bad)
    with pytest.raises(ValueError, match="do not match"):
        head_logprobs(hidden, weight[:, :8], tokens)


def test_default_chunk_bounds_the_logits_bytes():
    assert default_chunk(1000, 1024) == 1000  # small vocabulary: one chunk
    c = default_chunk(4096, 151936)  # Qwen2.5's vocabulary
    assert c == 110 and c * 151936 * 4 <= 64 * 2**20 < (c + 1) * 151936 * 4
    assert default_chunk(10, 10**9) == 1


def test_no_full_logits_buffer_in_the_compiled_gradient():
    """XLA's own accounting of the jitted gradient: with chunks of 8 of 512 tokens the temporaries
    stay far below one [512, V] float32 buffer, which the full-logits version needs several of."""
    B, T, D, V = 4, 128, 32, 8192
    hidden = jax.ShapeDtypeStruct((B, T, D), jnp.float32)
    weight = jax.ShapeDtypeStruct((V, D), jnp.float32)
    tokens = jnp.zeros((B, T), jnp.int32)
    mask = jnp.ones((B, T))

    def temp_bytes(fn):
        grad = jax.jit(jax.grad(loss(fn, mask), argnums=(0, 1)))
        return grad.lower(hidden, weight).compile().memory_analysis().temp_size_in_bytes

    full_logits = B * T * V * 4
    chunked = temp_bytes(
        lambda h, w: head_logprobs(h, w, tokens, logits_chunk_size=8, entropy=True)
    )
    full = temp_bytes(lambda h, w: reference(h, w, tokens, 1.0))
    assert full >= 2 * full_logits
    assert chunked < full_logits / 4
