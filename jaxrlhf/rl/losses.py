"""The losses: PPO's clipped surrogate, the (clipped) value loss, the total PPO loss, Bradley-Terry."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxrlhf.rl._checks import MAX_LOG_RATIO, check_same_shape, zero_masked
from jaxrlhf.rl.stats import masked_mean

AGGREGATIONS = (
    "token_mean",
    "seq_mean_token_mean",
    "seq_mean_token_sum",
    "seq_mean_token_sum_norm",
)
IMPORTANCE_LEVELS = ("token", "sequence")


def aggregate_terms(per_token: jnp.ndarray, mask: jnp.ndarray, *, aggregation: str = "token_mean"):
    """A per-token loss [..., T] as a (sum, count) pair whose ratio is the aggregated loss.

    token_mean:              (Σ m·x,                 Σ m)          every valid token weighs the same
    seq_mean_token_mean:     (Σ_seq Σₜ m·x / Σₜ m,   #sequences)   every sequence weighs the same
    seq_mean_token_sum:      (Σ_seq Σₜ m·x,          #sequences)   long sequences weigh more
    seq_mean_token_sum_norm: (Σ m·x / T,             #sequences)   Dr. GRPO: Σ m·x / (B·T)

    Sums and counts add across minibatch shards, so a loss split over devices is reduced by summing
    both and dividing once (``jaxrlhf.train.state``): no per-device weighting is needed. For
    ``seq_mean_token_sum_norm`` that holds when every shard has the same padded length T (the
    global-shape rule of multi-device code).
    """
    check_same_shape(per_token, mask)
    x = zero_masked(per_token.astype(jnp.float32), mask)
    mask = mask.astype(jnp.float32)
    num_seqs = jnp.asarray(math.prod(mask.shape[:-1]), jnp.float32)
    if aggregation == "token_mean":
        return jnp.sum(x), jnp.sum(mask)
    if aggregation == "seq_mean_token_mean":
        return jnp.sum(jnp.sum(x, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)), num_seqs
    if aggregation == "seq_mean_token_sum":
        return jnp.sum(x), num_seqs
    if aggregation == "seq_mean_token_sum_norm":
        return jnp.sum(x) / mask.shape[-1], num_seqs
    raise ValueError(f"aggregation={aggregation!r}: expected one of {AGGREGATIONS}")


def aggregate(per_token: jnp.ndarray, mask: jnp.ndarray, *, aggregation: str = "token_mean"):
    """Reduce a per-token loss [..., T] to a scalar: sum / max(count, 1) of ``aggregate_terms``.

    token_mean:              Σ m·x / Σ m              every valid token weighs the same (default)
    seq_mean_token_mean:     mean_seq(Σₜ m·x / Σₜ m)  every sequence weighs the same (GRPO)
    seq_mean_token_sum:      mean_seq(Σₜ m·x)         long sequences weigh more
    seq_mean_token_sum_norm: Σ m·x / (B·T)            Dr. GRPO (Liu et al. 2025, arXiv:2503.20783)

    ``seq_mean_token_sum_norm`` divides by a constant, B sequences times the padded length T, so
    neither a sequence's length nor the batch's token count rescales its tokens' gradients (the
    length bias Dr. GRPO removes from GRPO). trl's ``dr_grpo`` divides by ``max_completion_length``:
    the same when responses are padded to the generation budget. Unlike the other three, it does
    depend on how much padding a batch carries.

    A mask with holes (environment tokens of a multi-turn episode, see ``jaxrlhf.rl``) counts only
    its policy tokens: Σₜ m and the sums are those of the row with its holes removed. For
    ``seq_mean_token_sum_norm`` that holds when the compacted row keeps the same padded length T.
    """
    total, count = aggregate_terms(per_token, mask, aggregation=aggregation)
    return total / jnp.maximum(count, 1.0)


def clipped_surrogate(
    logprobs: jnp.ndarray,
    old_logprobs: jnp.ndarray,
    advantages: jnp.ndarray,
    mask: jnp.ndarray,
    *,
    clip_eps: float,
    clip_eps_high: float | None = None,
    importance_level: str = "token",
    weights: jnp.ndarray | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """PPO's per-token clipped loss and where its clipped term is the one taken.

    token:    ρₜ = exp(clamp(log π_θ(yₜ) − log π_old(yₜ), ±MAX_LOG_RATIO))
    sequence: ρₜ = s = exp(clamp((1/|y|) Σₜ mₜ (log π_θ(yₜ) − log π_old(yₜ)), ±MAX_LOG_RATIO))
    ℓₜ = −wₜ · min(ρₜ Âₜ, clip(ρₜ, 1−ε, 1+ε_high) Âₜ);   clippedₜ = 1[−clip(ρₜ)Âₜ > −ρₜÂₜ]

    ``clipped`` is trl's ``clipfrac`` indicator: the token's gradient is cut by the clip (e.g.
    Â = +1, ρ = 0.7, ε = 0.2 is *not* clipped: the unclipped term is the smaller one).

    ``clip_eps_high`` is DAPO's clip-higher (Yu et al. 2025, arXiv:2503.14476): a wider upper
    bound lets unlikely tokens with Â > 0 grow further, against entropy collapse (None: ε).
    ``importance_level="sequence"`` is GSPO's sequence ratio (Zheng et al. 2025, arXiv:2507.18071):
    the geometric mean of the token ratios of the row, shared by its tokens and clipped as one; the
    gradient flows through the mean. GSPO's objective is this with advantages constant along each
    row and ``aggregation="seq_mean_token_mean"``.
    ``weights`` wₜ (constants, e.g. ``tis_weights``) multiply each token's loss; None: wₜ = 1.
    With holes in the mask (environment tokens, see ``jaxrlhf.rl``) |y| = Σₜ mₜ counts the policy
    tokens only: the sequence ratio is that of the actions, π_θ(y)/π_old(y) without the transitions.

    Args:
      logprobs: [..., T] log π_θ (differentiated).  old_logprobs: [..., T] log π_old (constants).
      advantages: [..., T] Â (constants).  mask: [..., T].
      clip_eps: ε.  clip_eps_high: ε_high or None.  importance_level: "token" | "sequence".
      weights: [..., T] or None.
    Returns:
      (ℓ [..., T], clipped [..., T] float 0/1), both 0 at masked positions.
    """
    check_same_shape(logprobs, old_logprobs, advantages, mask)
    if importance_level not in IMPORTANCE_LEVELS:
        raise ValueError(
            f"importance_level={importance_level!r}: expected one of {IMPORTANCE_LEVELS}"
        )
    clip_high = clip_eps if clip_eps_high is None else clip_eps_high
    log_ratio = zero_masked(logprobs - jax.lax.stop_gradient(old_logprobs), mask)  # [..., T]
    if importance_level == "sequence":
        lengths = jnp.sum(mask.astype(jnp.float32), axis=-1, keepdims=True)  # [..., 1]
        seq_log_ratio = jnp.sum(log_ratio, axis=-1, keepdims=True) / jnp.maximum(lengths, 1.0)
        log_ratio = jnp.broadcast_to(seq_log_ratio, log_ratio.shape)  # [..., T]
    ratio = jnp.exp(jnp.clip(log_ratio, -MAX_LOG_RATIO, MAX_LOG_RATIO))  # [..., T]
    advantages = jax.lax.stop_gradient(zero_masked(advantages, mask))
    unclipped = -ratio * advantages
    clipped = -jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_high) * advantages
    was_clipped = zero_masked((clipped > unclipped).astype(jnp.float32), mask)
    loss = jnp.maximum(unclipped, clipped)  # [..., T]
    if weights is not None:
        check_same_shape(weights, mask)
        loss = loss * jax.lax.stop_gradient(zero_masked(weights.astype(jnp.float32), mask))
    return zero_masked(loss, mask), was_clipped


def ppo_policy_loss(
    logprobs: jnp.ndarray,
    old_logprobs: jnp.ndarray,
    advantages: jnp.ndarray,
    mask: jnp.ndarray,
    *,
    clip_eps: float,
    clip_eps_high: float | None = None,
    importance_level: str = "token",
    weights: jnp.ndarray | None = None,
    aggregation: str = "token_mean",
) -> jnp.ndarray:
    """PPO's clipped surrogate objective, as a loss (Schulman et al. 2017, arXiv:1707.06347).

    ρₜ = exp(log π_θ(aₜ|sₜ) − log π_old(aₜ|sₜ))      (log ρ clamped to ±MAX_LOG_RATIO)
    L_policy = mean_m[ −min(ρₜ Âₜ, clip(ρₜ, 1−ε, 1+ε) Âₜ) ]

    The min makes the objective a pessimistic bound: moving ρ beyond 1±ε in the direction the
    advantage favours earns nothing, while moves that hurt are always counted.

    The GRPO family reuses it: DAPO's ``clip_eps_high``, GSPO's ``importance_level="sequence"``,
    truncated importance ``weights``, Dr. GRPO's ``aggregation="seq_mean_token_sum_norm"`` (see
    ``clipped_surrogate`` and ``aggregate``). The defaults are plain PPO.

    Args:
      logprobs: [..., T] log π_θ (differentiated).  old_logprobs: [..., T] log π_old at rollout.
      advantages: [..., T] Â (treated as constants).  mask: [..., T].
      clip_eps: ε.  clip_eps_high: ε_high (None: ε).  importance_level: "token" | "sequence".
      weights: [..., T] per-token loss weights or None.  aggregation: see ``aggregate``.
    Returns:
      scalar loss.
    """
    per_token, _ = clipped_surrogate(
        logprobs,
        old_logprobs,
        advantages,
        mask,
        clip_eps=clip_eps,
        clip_eps_high=clip_eps_high,
        importance_level=importance_level,
        weights=weights,
    )
    return aggregate(per_token, mask, aggregation=aggregation)


def value_loss_terms(
    values: jnp.ndarray,
    old_values: jnp.ndarray,
    returns: jnp.ndarray,
    mask: jnp.ndarray,
    *,
    clip_eps: float | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The critic's per-token regression loss, optionally clipped around the rollout-time values.

    ℓₜ = (Vₜ − Rₜ)²;   clipped: ℓₜ = max((Vₜ − Rₜ)², (clip(Vₜ, V_oldₜ − ε, V_oldₜ + ε) − Rₜ)²)

    Returns:
      (ℓ [..., T], clipped [..., T] float 0/1: where the clipped error is the larger one), 0 where
      masked.
    """
    check_same_shape(values, old_values, returns, mask)
    values = zero_masked(values, mask)
    returns = jax.lax.stop_gradient(zero_masked(returns, mask))
    loss = (values - returns) ** 2  # [..., T]
    was_clipped = jnp.zeros_like(loss)
    if clip_eps is not None:
        old_values = jax.lax.stop_gradient(zero_masked(old_values, mask))
        # clip V itself (not V_old + clip(V − V_old)): inside the band it is V exactly, so float
        # rounding cannot count an unclipped token as clipped
        kept = jnp.clip(values, old_values - clip_eps, old_values + clip_eps)  # [..., T]
        clipped = (kept - returns) ** 2
        was_clipped = (clipped > loss).astype(jnp.float32)
        loss = jnp.maximum(loss, clipped)
    return zero_masked(loss, mask), zero_masked(was_clipped, mask)


def value_loss(
    values: jnp.ndarray,
    old_values: jnp.ndarray,
    returns: jnp.ndarray,
    mask: jnp.ndarray,
    *,
    clip_eps: float | None = None,
    aggregation: str = "token_mean",
) -> jnp.ndarray:
    """The critic's regression loss, optionally clipped around the rollout-time values.

    L_value = mean_m[(V − R)²]
    clipped:  mean_m[max((V − R)², (clip(V, V_old − ε, V_old + ε) − R)²)]

    Note: no ½ factor (the derivation's plain MSE). trl and cleanrl use ½·max(...), so their ``vf_coef``
    is twice ours for the same loss: our vf_coef = 0.1 is their 0.2.

    Args:
      values: [..., T] V_θ (differentiated).  old_values: [..., T] V at rollout.
      returns: [..., T] targets R (constants).  mask: [..., T].  clip_eps: ε or None.
    Returns:
      scalar loss.
    """
    per_token, _ = value_loss_terms(values, old_values, returns, mask, clip_eps=clip_eps)
    return aggregate(per_token, mask, aggregation=aggregation)


def ppo_loss(
    logprobs: jnp.ndarray,
    old_logprobs: jnp.ndarray,
    advantages: jnp.ndarray,
    values: jnp.ndarray,
    old_values: jnp.ndarray,
    returns: jnp.ndarray,
    mask: jnp.ndarray,
    entropy: jnp.ndarray,
    *,
    clip_eps: float,
    value_clip_eps: float | None = None,
    vf_coef: float = 0.1,
    ent_coef: float = 0.0,
    aggregation: str = "token_mean",
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """The total PPO loss: clipped policy loss, value loss and entropy bonus.

    L = L_policy + c₁ · L_value − c₂ · H,     H = mean_m[entropyₜ]

    Args:
      logprobs, old_logprobs, advantages: see ``ppo_policy_loss``.
      values, old_values, returns: see ``value_loss``.
      mask: [..., T].  entropy: [..., T] per-token entropy of π_θ (``token_entropy``).
      clip_eps: policy ε.  value_clip_eps: value ε (None: unclipped).
      vf_coef: c₁.  ent_coef: c₂.  aggregation: for the policy loss.
    Returns:
      (scalar loss, {"policy": L_policy, "value": L_value, "entropy": H}).
    """
    check_same_shape(logprobs, entropy, mask)
    policy = ppo_policy_loss(
        logprobs, old_logprobs, advantages, mask, clip_eps=clip_eps, aggregation=aggregation
    )
    value = value_loss(values, old_values, returns, mask, clip_eps=value_clip_eps)
    entropy_mean = masked_mean(entropy, mask)
    loss = policy + vf_coef * value - ent_coef * entropy_mean
    return loss, {"policy": policy, "value": value, "entropy": entropy_mean}


def bradley_terry_loss(
    chosen_rewards: jnp.ndarray, rejected_rewards: jnp.ndarray, *, margin=0.0
) -> jnp.ndarray:
    """The reward model's pairwise loss (Bradley & Terry 1952; Ouyang et al. 2022).

    P(y_c ≻ y_r | x) = σ(r(x, y_c) − r(x, y_r))
    L = mean[−log σ(r_c − r_r − m)]            (m: optional margin, Llama-2 style)

    Args:
      chosen_rewards: [B] scores of the preferred responses.
      rejected_rewards: [B] scores of the other ones.
      margin: scalar or [B].
    Returns:
      scalar loss; log 2 when r_c = r_r (and m = 0).
    """
    check_same_shape(chosen_rewards, rejected_rewards)
    return jnp.mean(-jax.nn.log_sigmoid(chosen_rewards - rejected_rewards - margin))
