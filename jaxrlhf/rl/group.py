"""Critic-free advantages: group baselines (GRPO, Dr. GRPO, RLOO) and REINFORCE++'s batch baseline.

Instead of a learned value V(s), these sample G responses per prompt and use the other responses'
scores as the baseline. Scores [B] are laid out as B/G consecutive groups of G samples of the same
prompt (``[p₀, p₀, …, p₀, p₁, …]``, what ``jnp.repeat(prompts, G, axis=0)`` gives). A sequence's
advantage Âᵢ is shared by all its tokens: ``jnp.broadcast_to(adv[:, None], mask.shape)``.
"""

from __future__ import annotations

import chex
import jax.numpy as jnp

from jaxrlhf.rl.returns import reward_to_go
from jaxrlhf.rl.stats import masked_whiten


def _grouped(scores: jnp.ndarray, group_size: int) -> jnp.ndarray:
    """scores [B] → [B/G, G] float32, shifted by each group's first score.

    Subtracting a member of the group first changes no deviation from the group mean but makes an
    all-equal group exactly 0 in float arithmetic (and keeps large offsets from eating precision).
    """
    chex.assert_rank(scores, 1)
    if group_size < 2:
        raise ValueError(f"group_size={group_size}: a group baseline needs at least 2 samples")
    batch = scores.shape[0]
    if batch % group_size:
        raise ValueError(
            f"{batch} scores do not split into groups of group_size={group_size} "
            f"({batch} is not a multiple of {group_size})"
        )
    groups = scores.astype(jnp.float32).reshape(batch // group_size, group_size)  # [B/G, G]
    return groups - groups[:, :1]


def grpo_advantages(
    scores: jnp.ndarray, *, group_size: int, scale_by_std: bool = True, eps: float = 1e-4
) -> jnp.ndarray:
    """GRPO's group-normalised advantages (Shao et al. 2024, arXiv:2402.03300).

    Âᵢ = (rᵢ − mean_g r) / (std_g r + ε),   std with Bessel's correction: √(Σ_g (r − mean)² / (G−1))
    scale_by_std=False (Dr. GRPO, Liu et al. 2025, arXiv:2503.20783):  Âᵢ = rᵢ − mean_g r

    As trl computes it (unbiased std, ε = 1e-4). Each group's advantages sum to 0; a group of equal
    scores gets Â = 0 exactly (it carries no learning signal). Dividing by the std up-weights groups
    whose scores barely differ (too easy or too hard prompts); Dr. GRPO drops it. Note the group-
    mean baseline includes rᵢ itself, which scales the expected gradient by (G−1)/G (see
    ``rloo_advantages``): harmless, the learning rate absorbs it.

    Args:
      scores: [B] the reward of each sample, B/G consecutive groups of G.
      group_size: G ≥ 2.  scale_by_std: divide by the group's std.  eps: ε.
    Returns:
      [B] advantages.
    """
    groups = _grouped(scores, group_size)  # [B/G, G]
    centered = groups - jnp.mean(groups, axis=-1, keepdims=True)  # [B/G, G]
    if scale_by_std:
        var = jnp.sum(centered**2, axis=-1, keepdims=True) / (group_size - 1)  # [B/G, 1]
        positive = var > 0.0  # √ has an infinite slope at 0: keep jax.grad finite there
        std = jnp.where(positive, jnp.sqrt(jnp.where(positive, var, 1.0)), 0.0)
        centered = centered / (std + eps)
    return centered.reshape(-1)


def rloo_advantages(scores: jnp.ndarray, *, group_size: int) -> jnp.ndarray:
    """REINFORCE leave-one-out advantages (Kool et al. 2019; Ahmadian et al. 2024, arXiv:2402.14740).

    Âᵢ = rᵢ − (1/(G−1)) Σ_{j≠i} r_j  =  G/(G−1) · (rᵢ − mean_g r)

    The baseline of sample i uses only the *other* samples, which are independent of aᵢ, so
    E[Σᵢ Âᵢ ∇log π(aᵢ)] / G = ∇E[r]: an unbiased policy-gradient estimate. Each group's
    advantages sum to 0; a group of equal scores gets 0.

    Args:
      scores: [B] the reward of each sample, B/G consecutive groups of G.  group_size: G ≥ 2.
    Returns:
      [B] advantages.
    """
    groups = _grouped(scores, group_size)  # [B/G, G]
    others = (jnp.sum(groups, axis=-1, keepdims=True) - groups) / (group_size - 1)  # [B/G, G]
    return (groups - others).reshape(-1)


def reinforce_pp_advantages(
    rewards: jnp.ndarray, mask: jnp.ndarray, *, gamma: float = 1.0
) -> jnp.ndarray:
    """REINFORCE++ advantages (Hu 2025, arXiv:2501.03262): reward-to-go, whitened over the batch.

    Gₜ = Σ_{k≥t} γ^{k−t} r_k   (γ = 1);    Âₜ = (Gₜ − mean_m G) / √(var_m G + 1e-8)

    No critic and no group: the baseline is the mean over every valid token of the whole batch.
    ``rewards`` are per-token and usually KL-shaped (``kl_penalized_rewards``: −β·KLₜ at every
    token, the score at the last one), so Gₜ is the score minus the KL still to come.

    Args:
      rewards: [..., T] per-token rewards.  mask: [..., T] policy tokens (holes allowed, as in
        ``reward_to_go``).  gamma: γ (1 in REINFORCE++).
    Returns:
      [..., T] advantages, 0 at masked positions.
    """
    returns = reward_to_go(rewards, mask, gamma=gamma)  # [..., T]
    return masked_whiten(returns, mask)
