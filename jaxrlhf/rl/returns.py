"""Returns and advantages: discounted return, reward-to-go, TD error and GAE.

Conventions: the last axis is time; ``mask`` marks the policy's own tokens (its actions). It may have
holes: in a multi-turn episode a tool or environment inserts tokens between two runs of policy
tokens (mask 0 there), and padding follows the last run. Those tokens are part of the *state*, not
actions: log P(τ|θ) = log p(s₀) + Σₜ log π_θ(aₜ|sₜ) + Σₜ log P(sₜ₊₁|sₜ,aₜ), and only the middle sum
depends on θ. So the time steps are the masked-in tokens, in order, and what lies between two of
them is one transition: every function here gives, at policy tokens, what it gives on the sequence
with the holes removed (0 elsewhere). "Next step" below means the next *policy* token; the episode
ends after the last one, so the value of the state after it is 0. Nothing stored at masked
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


def _discounted_suffix_sum(x: jnp.ndarray, mask: jnp.ndarray, discount: float) -> jnp.ndarray:
    """yₜ = xₜ + d · y_next(t) at policy tokens (next(t): the next policy token; y = 0 after the last).

    The carry passes through masked positions unchanged, so d is applied once per policy step. ``x``
    must be 0 where masked; the result is 0 there.
    """

    def step(next_y, x_and_valid):
        x_t, valid = x_and_valid
        y = x_t + discount * next_y
        return jnp.where(valid, y, next_y), y

    init = jnp.zeros(x.shape[:-1], jnp.float32)
    return zero_masked(_reverse_scan(step, (x, mask.astype(bool)), init), mask)


def discounted_return(rewards: jnp.ndarray, mask: jnp.ndarray, *, gamma: float) -> jnp.ndarray:
    """Discounted return of a trajectory.

    R(τ) = Σₜ γ^{n(t)} rₜ    (sum over policy tokens; n(t) = Σ_{k<t} m_k, policy steps before t)

    n(t) = t for one run of policy tokens from t = 0; environment tokens in a hole are no steps.

    Args:
      rewards: [..., T] per-token rewards.
      mask: [..., T] policy tokens (holes allowed).
      gamma: discount γ ∈ [0, 1].
    Returns:
      [...] the return of each trajectory.
    """
    check_same_shape(rewards, mask)
    rewards = zero_masked(rewards.astype(jnp.float32), mask)  # [..., T]
    steps = jnp.cumsum(mask.astype(jnp.int32), axis=-1) - mask.astype(jnp.int32)  # [..., T] n(t)
    discounts = gamma ** steps.astype(jnp.float32)  # [..., T]
    return jnp.sum(rewards * discounts, axis=-1)


def reward_to_go(rewards: jnp.ndarray, mask: jnp.ndarray, *, gamma: float) -> jnp.ndarray:
    """Reward-to-go: the discounted return from step t on, ignoring rewards already collected.

    Gₜ = Σ_{k≥t, policy} γ^{n(k)−n(t)} r_k = rₜ + γ G_next(t),   G after the last policy token = 0

    next(t) is the next policy token (a hole in between is a transition, not a step).

    Args:
      rewards: [..., T]; mask: [..., T] policy tokens (holes allowed); gamma: γ.
    Returns:
      [..., T] Gₜ, 0 at masked positions. At the first policy token it is ``discounted_return``.
    """
    check_same_shape(rewards, mask)
    rewards = zero_masked(rewards.astype(jnp.float32), mask)
    return _discounted_suffix_sum(rewards, mask, gamma)


def _next_values(values: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """V(s_next(t)): V at the next policy token after t, 0 when none follows (terminal state)."""
    values = zero_masked(values.astype(jnp.float32), mask)  # [..., T]
    T = values.shape[-1]
    policy_at = jnp.where(mask.astype(bool), jnp.arange(T), T)  # [..., T] own index, or T
    first_from = jax.lax.cummin(policy_at, axis=policy_at.ndim - 1, reverse=True)  # ≥ t
    pad = jnp.full(policy_at.shape[:-1] + (1,), T, policy_at.dtype)
    next_index = jnp.concatenate([first_from[..., 1:], pad], axis=-1)  # [..., T] > t, T: none
    padded = jnp.concatenate([values, jnp.zeros(values.shape[:-1] + (1,), jnp.float32)], axis=-1)
    return jnp.take_along_axis(padded, next_index, axis=-1)


def td_error(
    rewards: jnp.ndarray, values: jnp.ndarray, mask: jnp.ndarray, *, gamma: float
) -> jnp.ndarray:
    """One-step temporal-difference error.

    δₜ = rₜ + γ V(s_next(t)) − V(sₜ),   next(t): the next policy token; V = 0 after the last one.

    Environment tokens between t and next(t) are part of the transition sₜ → s_next(t) (they do not
    depend on θ), so V is read at the next policy token, and γ applies once.

    Args:
      rewards, values, mask: [..., T] (mask: policy tokens, holes allowed); gamma: γ.
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

    δₜ = rₜ + γ V(s_next(t)) − V(sₜ)        (next(t): the next policy token, see ``td_error``)
    Âₜ = δₜ + γλ Â_next(t) = Σ_{l≥0} (γλ)ˡ δ_{t+l}      (t+l: the l-th policy step after t)
    Rₜ = Âₜ + V(sₜ)        (the value-function target)

    λ = 0 gives the TD error (low variance, biased by V); λ = 1 gives Gₜ − V(sₜ), the Monte Carlo
    advantage (unbiased, high variance). Computed by a reverse ``lax.scan`` over time whose carry
    passes through masked positions (environment tokens, padding) unchanged.

    Args:
      rewards: [..., T] per-token rewards.
      values: [..., T] critic values V(sₜ).
      mask: [..., T] policy tokens (holes allowed).
      gamma: discount γ.  lam: GAE λ.
    Returns:
      (advantages [..., T], returns [..., T]), both 0 at masked positions.
    """
    delta = td_error(rewards, values, mask, gamma=gamma)  # [..., T], 0 where masked
    advantages = _discounted_suffix_sum(delta, mask, gamma * lam)  # [..., T]
    returns = zero_masked(advantages + zero_masked(values.astype(jnp.float32), mask), mask)
    return advantages, returns
