"""Direct preference optimisation: the policy trained on preference pairs, no reward model, no RL.

DPO (Rafailov et al. 2023, arXiv:2305.18290) notes that the KL-regularised RLHF optimum is
π*(y|x) ∝ π_ref(y|x) exp(r(x, y)/β), so r(x, y) = β log π*(y|x)/π_ref(y|x) + β log Z(x); put into
the Bradley-Terry likelihood, Z cancels and the policy itself is fitted to the preferences.
Inputs are sequence log-probs log π(y|x) = Σₜ mₜ log π(yₜ|…) (``trajectory_logprob``), one per pair.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrlhf.rl._checks import check_same_shape

DPO_LOSS_TYPES = ("sigmoid", "ipo")


def dpo_terms(
    policy_chosen_logps: jnp.ndarray,
    policy_rejected_logps: jnp.ndarray,
    ref_chosen_logps: jnp.ndarray,
    ref_rejected_logps: jnp.ndarray,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> jnp.ndarray:
    """The per-pair DPO loss, to be summed (a trainer's (sum, count) pair is (Σ ℓ, B)).

    h = (log π(y_c) − log π(y_r)) − (log π_ref(y_c) − log π_ref(y_r))
    sigmoid: ℓ = −(1−ε) log σ(βh) − ε log σ(−βh)      (ε = label_smoothing: cDPO, Mitchell 2023)
    ipo:     ℓ = (h − 1/(2β))²                       (Azar et al. 2023, arXiv:2310.12036)

    βh is the implicit reward margin; the sigmoid loss is Bradley-Terry on it, log 2 at h = 0, with
    ∂ℓ/∂h = −β σ(−βh) (for ε = 0): pairs the policy already ranks right push less. ε > 0 assumes a
    fraction ε of the labels are flipped, so the loss no longer drives h to infinity. IPO regresses
    h on the fixed target 1/(2β) instead; trl feeds it *length-averaged* log-probs (Σₜ / |y|), so
    pass those for trl's IPO. The reference log-probs are constants.

    Args:
      policy_chosen_logps, policy_rejected_logps: [B] log π_θ of each pair's responses.
      ref_chosen_logps, ref_rejected_logps: [B] log π_ref of the same responses.
      beta: β > 0.  loss_type: "sigmoid" | "ipo".  label_smoothing: ε ∈ [0, ½) (sigmoid only).
    Returns:
      [B] per-pair losses.
    """
    check_same_shape(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}: expected one of {DPO_LOSS_TYPES}")
    if isinstance(beta, int | float) and not beta > 0:  # (a traced β is the caller's to check)
        raise ValueError(f"beta={beta}: must be > 0")
    if isinstance(label_smoothing, int | float):
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing={label_smoothing}: must lie in [0, 0.5)")
        if loss_type == "ipo" and label_smoothing != 0.0:
            raise ValueError(
                f"label_smoothing={label_smoothing} applies to loss_type='sigmoid' only"
            )
    h = _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    if loss_type == "ipo":
        return (h - 1.0 / (2.0 * beta)) ** 2
    loss = -jax.nn.log_sigmoid(beta * h)  # [B]
    if not (isinstance(label_smoothing, int | float) and label_smoothing == 0.0):
        loss = (1.0 - label_smoothing) * loss - label_smoothing * jax.nn.log_sigmoid(-beta * h)
    return loss


def dpo_loss(
    policy_chosen_logps: jnp.ndarray,
    policy_rejected_logps: jnp.ndarray,
    ref_chosen_logps: jnp.ndarray,
    ref_rejected_logps: jnp.ndarray,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """DPO's loss, the mean of ``dpo_terms``, and trl's reward metrics.

    L = mean_B ℓ(h);   rewards/chosen = mean β(log π(y_c) − log π_ref(y_c)),
    rewards/rejected likewise, rewards/margins = their difference's mean, rewards/accuracies =
    the fraction of pairs whose chosen reward is the larger (metrics carry no gradient).

    Args:
      see ``dpo_terms``.
    Returns:
      (scalar loss, {"rewards/chosen", "rewards/rejected", "rewards/margins",
      "rewards/accuracies"}).
    """
    losses = dpo_terms(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        beta=beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
    )
    sg = jax.lax.stop_gradient
    chosen = beta * (sg(policy_chosen_logps) - sg(ref_chosen_logps)).astype(jnp.float32)  # [B]
    rejected = beta * (sg(policy_rejected_logps) - sg(ref_rejected_logps)).astype(jnp.float32)
    metrics = {
        "rewards/chosen": jnp.mean(chosen),
        "rewards/rejected": jnp.mean(rejected),
        "rewards/margins": jnp.mean(chosen - rejected),
        "rewards/accuracies": jnp.mean((chosen > rejected).astype(jnp.float32)),
    }
    return jnp.mean(losses), metrics


def _margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected) -> jnp.ndarray:
    """h = (log π_c − log π_r) − (log π_ref,c − log π_ref,r), float32, reference as constants."""
    f32 = jnp.float32
    ref = jax.lax.stop_gradient(ref_chosen.astype(f32) - ref_rejected.astype(f32))
    return (policy_chosen.astype(f32) - policy_rejected.astype(f32)) - ref  # [B]
