"""Returns and advantages: discounted return, reward-to-go, TD error and GAE.

Conventions: the last axis is time; ``mask`` marks the valid response tokens of each row as one
contiguous run (1s, then 0s after EOS/padding). The episode ends after the last valid token, so the
value of the state after it is 0. Results are 0 at masked positions, and nothing stored at masked
positions can change a result or a gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrlhf.rl._checks import check_same_shape, zero_masked


def _reverse_scan(step, xs_time_last, init):
    """Run ``carry, y = step(carry, x)`` backwards over the last axis; returns ys, time last."""
    xs = jax.tree.map(lambda x: jnp.moveaxis(x, -1, 0), xs_time_last)  # [T, ...]
    _, ys = jax.lax.scan(step, init, xs, reverse=True)
    return jnp.moveaxis(ys, 0, -1)  # [..., T]


def discounted_return(rewards: jnp.ndarray, mask: jnp.ndarray, *, gamma: float) -> jnp.ndarray:
    """Discounted return of a trajectory.

    R(τ) = Σₜ γᵗ rₜ        (sum over the valid tokens, t counted from the first response token)

    Args:
      rewards: [..., T] per-token rewards.
      mask: [..., T] valid tokens.
      gamma: discount γ ∈ [0, 1].
    Returns:
      [...] the return of each trajectory.
    """
    check_same_shape(rewards, mask)
    rewards = zero_masked(rewards.astype(jnp.float32), mask)  # [..., T]
    discounts = gamma ** jnp.arange(rewards.shape[-1], dtype=jnp.float32)  # [T]
    return jnp.sum(rewards * discounts, axis=-1)


def reward_to_go(rewards: jnp.ndarray, mask: jnp.ndarray, *, gamma: float) -> jnp.ndarray:
    """Reward-to-go: the discounted return from step t on, ignoring rewards already collected.

    Gₜ = Σ_{k≥t} γ^{k−t} r_k = rₜ + γ Gₜ₊₁,   G after the last valid token = 0.

    Args:
      rewards: [..., T]; mask: [..., T]; gamma: γ.
    Returns:
      [..., T] Gₜ, 0 at masked positions. ``reward_to_go(...)[..., 0] == discounted_return(...)``.
    """
    check_same_shape(rewards, mask)
    rewards = zero_masked(rewards.astype(jnp.float32), mask)

    def step(next_return, reward):
        ret = reward + gamma * next_return
        return ret, ret

    init = jnp.zeros(rewards.shape[:-1], jnp.float32)
    return zero_masked(_reverse_scan(step, rewards, init), mask)


def _next_values(values: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """V(sₜ₊₁), with 0 after the last valid token (terminal state)."""
    values = zero_masked(values.astype(jnp.float32), mask)  # [..., T]
    pad = jnp.zeros(values.shape[:-1] + (1,), jnp.float32)
    next_mask = jnp.concatenate([mask[..., 1:], pad.astype(mask.dtype)], axis=-1)
    return zero_masked(jnp.concatenate([values[..., 1:], pad], axis=-1), next_mask)


def td_error(
    rewards: jnp.ndarray, values: jnp.ndarray, mask: jnp.ndarray, *, gamma: float
) -> jnp.ndarray:
    """One-step temporal-difference error.

    δₜ = rₜ + γ V(sₜ₊₁) − V(sₜ),   V(s after the last valid token) = 0.

    Args:
      rewards, values, mask: [..., T]; gamma: γ.
    Returns:
      [..., T] δₜ, 0 at masked positions.
    """
    check_same_shape(rewards, values, mask)
    rewards = zero_masked(rewards.astype(jnp.float32), mask)
    values_t = zero_masked(values.astype(jnp.float32), mask)
    delta = rewards + gamma * _next_values(values, mask) - values_t  # [..., T]
    return zero_masked(delta, mask)


def gae(
    rewards: jnp.ndarray,
    values: jnp.ndarray,
    mask: jnp.ndarray,
    *,
    gamma: float,
    lam: float,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Generalized advantage estimation (Schulman et al. 2016, arXiv:1506.02438).

    δₜ = rₜ + γ V(sₜ₊₁) − V(sₜ)
    Âₜ = δₜ + γλ Âₜ₊₁ = Σ_{l≥0} (γλ)ˡ δₜ₊ₗ
    Rₜ = Âₜ + V(sₜ)        (the value-function target)

    λ = 0 gives the TD error (low variance, biased by V); λ = 1 gives Gₜ − V(sₜ), the Monte Carlo
    advantage (unbiased, high variance). Computed by a reverse ``lax.scan`` over time.

    Args:
      rewards: [..., T] per-token rewards.
      values: [..., T] critic values V(sₜ).
      mask: [..., T] valid tokens (one contiguous run from t = 0).
      gamma: discount γ.  lam: GAE λ.
    Returns:
      (advantages [..., T], returns [..., T]), both 0 at masked positions.
    """
    delta = td_error(rewards, values, mask, gamma=gamma)  # [..., T]

    def step(next_advantage, delta_t):
        advantage = delta_t + gamma * lam * next_advantage
        return advantage, advantage

    init = jnp.zeros(delta.shape[:-1], jnp.float32)
    advantages = zero_masked(_reverse_scan(step, delta, init), mask)  # [..., T]
    returns = zero_masked(advantages + zero_masked(values.astype(jnp.float32), mask), mask)
    return advantages, returns
