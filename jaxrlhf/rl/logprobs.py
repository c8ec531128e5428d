"""Log-probabilities of the policy: the LM as π(aₜ | sₜ).

A language model is a policy: the state sₜ is the prompt plus the tokens generated so far, the action
aₜ is the next token, and π(aₜ|sₜ) is the softmax of the logits. Everything PPO needs from the model
is in these three functions.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from jaxrlhf.rl._checks import check_same_shape, zero_masked


def _check_logits(logits: jnp.ndarray, tokens: jnp.ndarray | None = None) -> None:
    chex.assert_rank(logits, {i for i in range(2, 9)})
    if tokens is not None and logits.shape[:-1] != tokens.shape:
        raise ValueError(
            f"logits {logits.shape} must be tokens {tokens.shape} plus a vocabulary axis: "
            "logits[..., t, :] predicts tokens[..., t]"
        )


def token_logprobs(
    logits: jnp.ndarray, tokens: jnp.ndarray, *, temperature: float = 1.0
) -> jnp.ndarray:
    """Per-token log-probabilities log π(aₜ|sₜ) under the temperature-scaled softmax.

    log π(aₜ|sₜ) = zₜ[aₜ]/τ − log Σ_v exp(zₜ[v]/τ)        (z: logits, τ: temperature)

    The sampling temperature must be the same here as at rollout time, or the importance ratio of
    PPO compares two different distributions.

    Args:
      logits: [..., T, V] unnormalised scores; ``logits[..., t, :]`` predicts ``tokens[..., t]``.
      tokens: [..., T] integer token ids (the actions).
      temperature: τ > 0.
    Returns:
      [..., T] float32 log-probabilities.
    """
    _check_logits(logits, tokens)
    scaled = logits.astype(jnp.float32) / temperature  # [..., T, V]
    picked = jnp.take_along_axis(scaled, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(scaled, axis=-1)  # [..., T]


def trajectory_logprob(logprobs: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """The θ-dependent part of the log-probability of a trajectory.

    log P(τ|θ) = log p(s₀) + Σₜ log π_θ(aₜ|sₜ) + Σₜ log P(sₜ₊₁|sₜ,aₜ)

    The initial-state and transition terms do not depend on θ (for an LM the transition is
    deterministic: append the token), so ∇_θ log P(τ|θ) = ∇_θ Σₜ log π_θ(aₜ|sₜ), the value returned.

    Args:
      logprobs: [..., T] per-token log π(aₜ|sₜ).
      mask: [..., T] 1 at valid response tokens.
    Returns:
      [...] Σₜ maskₜ · log π(aₜ|sₜ).
    """
    check_same_shape(logprobs, mask)
    return jnp.sum(zero_masked(logprobs, mask), axis=-1)


def token_entropy(logits: jnp.ndarray, *, temperature: float = 1.0) -> jnp.ndarray:
    """Entropy of the policy at each position.

    H(π(·|sₜ)) = −Σ_v π(v|sₜ) log π(v|sₜ),   π = softmax(zₜ/τ)

    Args:
      logits: [..., T, V].
      temperature: τ > 0.
    Returns:
      [..., T] entropies in nats.
    """
    _check_logits(logits)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)  # [..., T, V]
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)  # [..., T]
