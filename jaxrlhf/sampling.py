"""One decode step's draw: filter the logits, draw a token by Gumbel-max, record its log-probability.

    z̃ = filter(z / τ)                          (top-k, then top-p; identity if off)
    a = argmax(z̃ + g),  g ~ Gumbel(0, 1)       (= jax.random.categorical(key, z̃))
    log p̃(a) = z̃[a] − log Σ_v exp z̃[v]

The pieces ``jaxrlhf.rollout``'s decode loop is made of (all re-exported there): ``filter_logits``,
``gumbel_noise`` (the noise of a block of steps, drawn at once), ``first_argmax`` (jnp.argmax as two
cheap reductions) and ``sample_token`` (one token per row and its log-prob).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from jaxrlhf.rl import token_logprobs


def filter_logits(logits, *, top_k: int | None = None, top_p=None):
    """Keep the top_k largest logits, then the smallest set of most likely tokens whose probability
    mass reaches top_p (nucleus sampling, Holtzman et al. 2019); the rest become −∞.

    A token is kept by top_p iff the mass of the tokens strictly more likely than it is < top_p, so
    the most likely token is always kept. logits: [B, V] (already divided by the temperature).
    """
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [B, 1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V] descending
        probs = jax.nn.softmax(sorted_logits, axis=-1)  # [B, V]
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # [B, V]
        keep = mass_before < top_p  # [B, V]
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def gumbel_noise(rng, steps, shape):
    """The Gumbel noise of ``jax.random.categorical(fold_in(rng, t), ·)`` for each t in ``steps``.

    categorical(key, z) = argmax(z + g), g = jax.random.gumbel(key, z.shape): drawing g for a block
    of steps in one vectorised call gives the same bits as one call per step, without a small
    random-bits loop in every decode step. steps: [K] int → [K, *shape] float32.
    """
    return jax.vmap(lambda t: jax.random.gumbel(jax.random.fold_in(rng, t), shape))(steps)


def first_argmax(x):
    """argmax over the last axis (the first index of the maximum), as a max and a min reduction:
    what ``jnp.argmax`` returns, but XLA's CPU backend runs argmax's (value, index) reduction ~4×
    slower than these two on [32, 1024] logits, once per decode step. NaN rows give the last index.
    x: [..., V] → int32 [...]."""
    V = x.shape[-1]
    top = jnp.max(x, axis=-1, keepdims=True)  # [..., 1]
    first = jnp.min(jnp.where(x == top, jnp.arange(V, dtype=jnp.int32), V), axis=-1)  # [...]
    return jnp.minimum(first, V - 1)


def sample_token(logits, rng, *, temperature, top_k, top_p, greedy: bool, noise=None):
    """One token per row and its log-probability under the distribution it was drawn from.

    sampled:  a ~ p̃ = softmax(z̃),  z̃ = filter(z / τ),   logprob = log p̃(a) = z̃[a] − log Σ_v exp z̃[v]
    greedy:   a = argmax z,                             logprob = log softmax(z / τ)[a]  (unfiltered)

    The draw is Gumbel-max, a = argmax(z̃ + g) with g ~ Gumbel(0, 1): the token
    ``jax.random.categorical(rng, z̃)`` draws (its noise, ``first_argmax`` for its argmax).
    Args:
      logits: [B, V] raw logits z of the next token.
      rng: a jax.random key (unused when greedy or when ``noise`` is given).
      temperature: τ > 0.  top_k, top_p: the filter (None: off).
      noise: [B, V] Gumbel noise g drawn beforehand (``gumbel_noise``); the token is then the one
        ``jax.random.categorical`` would draw with the key that noise came from.
    Returns:
      (tokens [B] int32, logprobs [B] float32).
    """
    chex.assert_rank(logits, 2)
    scaled = logits.astype(jnp.float32) / temperature  # [B, V]
    if greedy:
        token = first_argmax(logits).astype(jnp.int32)  # [B]
        sampled_from = scaled  # [B, V]
    else:
        sampled_from = filter_logits(scaled, top_k=top_k, top_p=top_p)  # [B, V]
        if noise is None:  # categorical(rng, ·)'s own noise
            noise = jax.random.gumbel(rng, sampled_from.shape)  # [B, V]
        token = first_argmax(sampled_from + noise).astype(jnp.int32)  # [B]
    # τ is already applied: token_logprobs at temperature 1 is log softmax(z̃)[a].
    logprob = token_logprobs(sampled_from[:, None], token[:, None])[:, 0]  # [B]
    return token, logprob
