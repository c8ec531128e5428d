"""The math of RLHF with PPO: pure functions on arrays (no models, no configs).

Convention: the last axis is time ([T] for one sequence, [B, T] for a batch, any leading dims); a
``mask`` is 0/1 and marks the policy's own tokens, its actions. It may have holes: in a multi-turn
(tool-use) episode the policy writes, a tool or environment inserts tokens (mask 0), the policy
writes again, then padding. Since log P(τ|θ) = log p(s₀) + Σₜ log π_θ(aₜ|sₜ) + Σₜ log P(sₜ₊₁|sₜ,aₜ)
and the transitions do not depend on θ, inserted tokens belong to the state: they are out of the
loss, the ratio and the KL, and they are no time steps. Every function over time therefore gives,
at policy tokens, what it gives on the row with its holes removed (masked-in entries moved left,
mask one run of 1s), and 0 at masked positions: γ counts policy steps, V(sₜ₊₁) is read at the next
policy token, the score lands on the last one. (``aggregation="seq_mean_token_sum_norm"`` divides
by the padded length T, so compact into the same T for that identity.)
"""

from jaxrlhf.rl._checks import MAX_LOG_RATIO
from jaxrlhf.rl.best_of import best_of_n_estimate, best_of_n_kl, best_of_n_probs
from jaxrlhf.rl.dpo import dpo_loss, dpo_terms
from jaxrlhf.rl.group import grpo_advantages, reinforce_pp_advantages, rloo_advantages
from jaxrlhf.rl.importance import logprob_mismatch, tis_weights
from jaxrlhf.rl.kl import (
    AdaptiveKLState,
    adaptive_kl_update,
    kl_estimate,
    kl_loss,
    kl_penalized_rewards,
)
from jaxrlhf.rl.logprobs import token_entropy, token_logprobs, trajectory_logprob
from jaxrlhf.rl.losses import (
    aggregate,
    aggregate_terms,
    bradley_terry_loss,
    clipped_surrogate,
    ppo_loss,
    ppo_policy_loss,
    value_loss,
    value_loss_terms,
)
from jaxrlhf.rl.returns import discounted_return, gae, reward_to_go, td_error
from jaxrlhf.rl.stats import (
    approx_kl,
    clip_fraction,
    explained_variance,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)

__all__ = [
    "MAX_LOG_RATIO",
    "AdaptiveKLState",
    "adaptive_kl_update",
    "aggregate",
    "aggregate_terms",
    "approx_kl",
    "best_of_n_estimate",
    "best_of_n_kl",
    "best_of_n_probs",
    "bradley_terry_loss",
    "clip_fraction",
    "clipped_surrogate",
    "discounted_return",
    "dpo_loss",
    "dpo_terms",
    "explained_variance",
    "gae",
    "grpo_advantages",
    "kl_estimate",
    "kl_loss",
    "kl_penalized_rewards",
    "logprob_mismatch",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "ppo_loss",
    "ppo_policy_loss",
    "reinforce_pp_advantages",
    "reward_to_go",
    "rloo_advantages",
    "td_error",
    "tis_weights",
    "token_entropy",
    "token_logprobs",
    "trajectory_logprob",
    "value_loss",
    "value_loss_terms",
]
