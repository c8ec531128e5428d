"""KL between the policy and the frozen reference, and the KL-shaped per-token rewards.

The reward model alone can be fooled; PPO for RLHF therefore pays a per-token penalty β·KLₜ for
drifting from the reference policy π_ref (the model before RL). KL(π‖π_ref) is estimated from the
policy's own samples (Schulman 2020, "Approximating KL divergence").
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxrlhf.rl._checks import (
    MAX_LOG_RATIO,
    check_same_shape,
    last_valid_index,
    zero_masked,
)

KL_KINDS = ("k1", "k2", "k3")


def kl_estimate(
    logprobs: jnp.ndarray, ref_logprobs: jnp.ndarray, *, kind: str = "k1"
) -> jnp.ndarray:
    """Per-token estimators of KL(π‖π_ref) from tokens sampled from π.

    With ℓ = log π(a|s) − log π_ref(a|s) and a ~ π:
      k1 = ℓ                    unbiased, can be negative, high variance
      k2 = ½ ℓ²                 biased, ≥ 0, low variance (exact to second order)
      k3 = e^{−ℓ} − 1 + ℓ       unbiased, ≥ 0, low variance (ℓ clamped to ±20 first)
    All three agree to first order near ℓ = 0 in expectation (Schulman 2020).

    Args:
      logprobs, ref_logprobs: [..., T].  kind: "k1" | "k2" | "k3".
    Returns:
      [..., T] per-token estimates.
    """
    check_same_shape(logprobs, ref_logprobs)
    log_ratio = logprobs.astype(jnp.float32) - ref_logprobs.astype(jnp.float32)  # [..., T]
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":  # log ratio clamped before exp (MAX_LOG_RATIO)
        log_ratio = jnp.clip(log_ratio, -MAX_LOG_RATIO, MAX_LOG_RATIO)
        return jnp.expm1(-log_ratio) + log_ratio
    raise ValueError(f"kind={kind!r}: expected one of {KL_KINDS}")


def kl_penalized_rewards(
    scores: jnp.ndarray,
    logprobs: jnp.ndarray,
    ref_logprobs: jnp.ndarray,
    mask: jnp.ndarray,
    *,
    kl_coef: float,
    kind: str = "k1",
) -> jnp.ndarray:
    """Per-token rewards of RLHF: a KL penalty at every token, the reward model's score at the end.

    rₜ = −β · KLₜ + 1[t = t_last] · score        (Ziegler et al. 2019, arXiv:1909.08593)

    KLₜ is paid at policy tokens only and t_last is the last policy token (the index of the last 1
    of ``mask``): tokens a tool or environment inserted (holes in the mask) are not sampled from π,
    so they are no actions and carry no KL; on the sequence with the holes removed this is the
    single-turn reward.

    Args:
      scores: [...] the reward model's score of each sequence.
      logprobs, ref_logprobs: [..., T] log π and log π_ref of the sampled tokens.
      mask: [..., T] policy tokens (holes allowed).
      kl_coef: β ≥ 0.  kind: the KL estimator (see ``kl_estimate``).
    Returns:
      [..., T] rewards, 0 at masked positions.
    """
    check_same_shape(logprobs, ref_logprobs, mask)
    if scores.shape != mask.shape[:-1]:
        raise ValueError(
            f"scores {scores.shape} must have the shape of mask {mask.shape} minus time"
        )
    kl = kl_estimate(zero_masked(logprobs, mask), zero_masked(ref_logprobs, mask), kind=kind)
    last = last_valid_index(mask)  # [...]
    at_last = jnp.arange(mask.shape[-1]) == last[..., None]  # [..., T]
    rewards = -kl_coef * kl + jnp.where(at_last, scores[..., None].astype(jnp.float32), 0.0)
    return zero_masked(rewards, mask)


def kl_loss(
    logprobs: jnp.ndarray, ref_logprobs: jnp.ndarray, mask: jnp.ndarray, *, kind: str = "k3"
) -> jnp.ndarray:
    """KL to the reference as a per-token loss term, GRPO style (Shao et al. 2024, arXiv:2402.03300).

    KLₜ = e^{−ℓₜ} − 1 + ℓₜ,   ℓₜ = log π_θ(yₜ) − log π_ref(yₜ)      (k3; see ``kl_estimate``)
    L = L_policy + β · aggregate(KLₜ)

    Instead of shaping the rewards (``kl_penalized_rewards``), GRPO adds the estimator to the loss
    and differentiates it: ∂k3/∂log π_θ = 1 − e^{−ℓ} (π_ref is a constant). The sampled tokens come
    from π_old, not π_θ, so this is the k3 estimate at the rollout policy's samples, as in GRPO.

    Args:
      logprobs: [..., T] log π_θ (differentiated).  ref_logprobs: [..., T] log π_ref (constants).
      mask: [..., T] policy tokens (holes allowed: environment tokens carry no KL).
      kind: "k1" | "k2" | "k3".
    Returns:
      [..., T] per-token KL, 0 at masked positions; reduce it with ``aggregate``.
    """
    check_same_shape(logprobs, ref_logprobs, mask)
    ref_logprobs = jax.lax.stop_gradient(zero_masked(ref_logprobs, mask))
    kl = kl_estimate(zero_masked(logprobs, mask), ref_logprobs, kind=kind)  # [..., T]
    return zero_masked(kl, mask)


class AdaptiveKLState(NamedTuple):
    """State of the adaptive KL controller: the current coefficient β."""

    kl_coef: jnp.ndarray


def adaptive_kl_update(
    state: AdaptiveKLState, current_kl, n_steps, *, target: float, horizon: float
) -> AdaptiveKLState:
    """Adaptive KL coefficient (Ziegler et al. 2019, §2.2): steer the KL towards a target.

    e = clip(KL / KL_target − 1, −0.2, 0.2);   β ← β · (1 + e · n_steps / horizon)

    Args:
      state: current β.  current_kl: measured KL (per sequence).  n_steps: samples in this batch.
      target: KL_target.  horizon: how many samples it takes to adapt.
    """
    error = jnp.clip(jnp.asarray(current_kl, jnp.float32) / target - 1.0, -0.2, 0.2)
    return AdaptiveKLState(kl_coef=state.kl_coef * (1.0 + error * n_steps / horizon))
