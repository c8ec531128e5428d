"""The rollout/trainer mismatch: truncated importance sampling and its diagnostics.

A fast rollout engine (another kernel, another precision, a KV cache) and the trainer do not give
the same log-probs for the same tokens, so the "on-policy" samples are slightly off-policy for the
policy the trainer differentiates. Truncated importance sampling reweights each token by the
ratio of the two, capped (Yao et al. 2025, "Your efficient RL framework secretly brings you
off-policy RL training"; Ionides 2008 for the truncation).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrlhf.rl._checks import MAX_LOG_RATIO, check_same_shape, zero_masked
from jaxrlhf.rl.stats import masked_mean


def _log_ratio(train_logprobs, rollout_logprobs, mask):
    """log π_train − log π_rollout at valid tokens (0 where masked), constants, clamped."""
    check_same_shape(train_logprobs, rollout_logprobs, mask)
    diff = zero_masked(
        train_logprobs.astype(jnp.float32) - rollout_logprobs.astype(jnp.float32), mask
    )  # [..., T]
    return jax.lax.stop_gradient(diff)


def tis_weights(
    train_logprobs: jnp.ndarray, rollout_logprobs: jnp.ndarray, mask: jnp.ndarray, *, cap: float
) -> jnp.ndarray:
    """Truncated importance-sampling weights for the rollout/trainer mismatch.

    wₜ = min(π_train(yₜ) / π_rollout(yₜ), C) = min(exp(clamp(log π_train − log π_rollout)), C)

    π_train is the trainer's log-prob of the sampled token under the *rollout-time* parameters
    (the ``old_logprobs`` a trainer recomputes), π_rollout the sampler's own. The weights are
    constants (stop-gradient); pass them as ``weights`` to ``clipped_surrogate`` /
    ``ppo_policy_loss``. The cap C bounds the variance a rare token with π_rollout ≪ π_train adds.

    Args:
      train_logprobs, rollout_logprobs: [..., T].  mask: [..., T].  cap: C > 0 (e.g. 2).
    Returns:
      [..., T] weights in (0, C], 0 at masked positions.
    """
    if isinstance(cap, int | float) and not cap > 0:
        raise ValueError(f"cap={cap}: must be > 0")
    log_ratio = _log_ratio(train_logprobs, rollout_logprobs, mask)  # [..., T]
    ratio = jnp.exp(jnp.clip(log_ratio, -MAX_LOG_RATIO, MAX_LOG_RATIO))
    return zero_masked(jnp.minimum(ratio, cap), mask)


def logprob_mismatch(
    train_logprobs: jnp.ndarray, rollout_logprobs: jnp.ndarray, mask: jnp.ndarray
) -> dict[str, jnp.ndarray]:
    """How far the rollout engine's log-probs are from the trainer's (diagnostics, no gradient).

    mean_abs_diff = mean_m |log π_train − log π_rollout|
    max_ratio     = max_m exp(clamp(log π_train − log π_rollout))     (0 when no token is valid)

    Args:
      train_logprobs, rollout_logprobs: [..., T].  mask: [..., T].
    Returns:
      {"mean_abs_diff": scalar, "max_ratio": scalar}.
    """
    log_ratio = _log_ratio(train_logprobs, rollout_logprobs, mask)  # [..., T]
    ratio = zero_masked(jnp.exp(jnp.clip(log_ratio, -MAX_LOG_RATIO, MAX_LOG_RATIO)), mask)
    return {
        "mean_abs_diff": masked_mean(jnp.abs(log_ratio), mask),
        "max_ratio": jnp.max(ratio),
    }
