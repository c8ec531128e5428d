"""The PPO loss of one minibatch, as the (sum, count) table that ``train.state.train_step`` takes.

    L = L_policy + c₁ L_value − c₂ H          (rl.ppo_loss; π and H at temperature τ)

Each term, and each diagnostic, is a (sum, count) pair over this minibatch (or this device's part of
it); the train step adds them across devices and divides once. The term names are trl's metric
names, so the step's metrics are logged as they are.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrlhf import rl
from jaxrlhf.train.experience import Experience, response_outputs
from jaxrlhf.train.state import Means


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPOLoss:
    """The PPO minibatch loss of a policy (ActorCritic or PolicyWithCritic: ``hidden_and_values``
    and an ``lm`` head) with these settings. The log-probs and entropy come from the response
    positions' hidden states, ``logits_chunk_size`` tokens at a time (``CausalLM.token_logprobs``):
    no [b, T, V] logits; the entropy is differentiated only when ``ent_coef`` ≠ 0.

    Frozen and hashable: ``jax.jit`` takes it as a static argument and caches one program per
    distinct (model structure, settings); β is not here (it only enters the rewards), so runs that
    differ only in β share the compiled update.
    """

    graphdef: Any  # nnx.GraphDef of the policy (ActorCritic or PolicyWithCritic)
    clip_eps: float
    value_clip_eps: float | None
    vf_coef: float
    ent_coef: float
    temperature: float
    aggregation: str = "token_mean"
    logits_chunk_size: int | None = None

    @property
    def weights(self) -> tuple[tuple[str, float], ...]:
        return (
            ("loss/policy_avg", 1.0),
            ("loss/value_avg", self.vf_coef),
            ("policy/entropy_avg", -self.ent_coef),
        )

    def __call__(self, params, batch: Experience) -> Means:
        logprobs, entropy, values = self.response_outputs(params, batch)  # [b, N] each
        return self.terms(logprobs, entropy, values, batch)

    def response_outputs(self, params, batch: Experience):
        """(log π(a_t | s_t), H_t, V(s_t)) of the policy at the response tokens, [b, N] each."""
        return response_outputs(
            nnx.merge(self.graphdef, params), batch.prompt_ids, batch.prompt_mask,
            batch.response_ids, batch.attention_mask, temperature=self.temperature,
            logits_chunk_size=self.logits_chunk_size, entropy=True,
            entropy_grad=self.ent_coef != 0,
        )  # fmt: skip

    def terms(self, logprobs, entropy, values, batch: Experience) -> Means:
        """The (sum, count) table from the response outputs (the loss proper, no model in it)."""
        mask = batch.response_mask  # [b, N]
        policy, clipped = rl.clipped_surrogate(
            logprobs, batch.logprobs, batch.advantages, mask, clip_eps=self.clip_eps
        )  # [b, N] each
        value, value_clipped = rl.value_loss_terms(
            values, batch.values, batch.returns, mask, clip_eps=self.value_clip_eps
        )  # [b, N] each
        log_ratio = jax.lax.stop_gradient(jnp.where(mask > 0, logprobs - batch.logprobs, 0.0))
        outside = jnp.abs(jnp.exp(log_ratio) - 1.0) > self.clip_eps
        tokens = jnp.sum(mask)

        def token_mean(x):
            return rl.masked_sum(x, mask), tokens

        return {
            "loss/policy_avg": rl.aggregate_terms(policy, mask, aggregation=self.aggregation),
            "loss/value_avg": token_mean(value),
            "policy/entropy_avg": token_mean(entropy),
            "policy/clipfrac_avg": token_mean(clipped),
            "policy/ratio_outside_clip_avg": token_mean(outside.astype(jnp.float32)),
            "policy/approxkl_avg": token_mean(0.5 * log_ratio**2),
            "val/clipfrac_avg": token_mean(value_clipped),
            "val/ratio": token_mean(
                jnp.exp(jnp.clip(log_ratio, -rl.MAX_LOG_RATIO, rl.MAX_LOG_RATIO))
            ),
        }
