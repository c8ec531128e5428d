"""Experience: one rollout batch scored by the reference and the critic, with rewards and advantages.

    Rollout(tokens, mask) + scores [B]
      ── actor / critic(prompt ⧺ response) ──▶ log π_old [B, N], V_old [B, N]
      ── reference(prompt ⧺ response) ───────▶ log π_ref [B, N]
      ── rl.kl_penalized_rewards ────────────▶ rewards [B, N]
      ── rl.gae, rl.masked_whiten ───────────▶ advantages, returns [B, N]

Everything here is a pure function. :func:`make_experience` is the readable version on full logits
(apply functions); :func:`score_rollout` is the jitted composition the PPO loop calls, on the models'
hidden states with the LM head at the response positions only (:func:`score_tokens`, equal to it),
with the model structures (graphdefs) and hyperparameters as static arguments.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ClassVar

import chex
import jax
import jax.numpy as jnp
from flax import nnx, struct

from jaxrlhf import rl
from jaxrlhf.models.sharding import param_shardings
from jaxrlhf.rollout import Rollout, concat_prompt_response, response_slice, score_sequences


@struct.dataclass
class Experience:
    """One rollout batch with everything the PPO update needs; fixed for the whole update."""

    prompt_ids: jax.Array  # int32 [B, P]  left-padded prompts
    prompt_mask: jax.Array  # [B, P]        1 = real prompt token
    response_ids: jax.Array  # int32 [B, N] sampled tokens (pad after EOS)
    response_mask: jax.Array  # float32 [B, N] 1 = valid response token (EOS included)
    logprobs: jax.Array  # float32 [B, N]  log π_old(aₜ|sₜ) at temperature τ
    ref_logprobs: jax.Array  # float32 [B, N] log π_ref(aₜ|sₜ) at temperature τ
    values: jax.Array  # float32 [B, N]   V_old(sₜ): critic before the update
    scores: jax.Array  # float32 [B]      reward-model scores (after the missing-EOS penalty)
    rewards: jax.Array  # float32 [B, N]  −β KLₜ + score at the last token
    advantages: jax.Array  # float32 [B, N] whitened GAE advantages
    returns: jax.Array  # float32 [B, N]  GAE returns (value targets)
    # With tools: 1 at every token of the episode (response_mask is 0 at the tools' answers)
    response_attention: jax.Array | None = None  # float32 [B, N]; None: response_mask

    @property
    def attention_mask(self) -> jax.Array:
        return self.response_mask if self.response_attention is None else self.response_attention


def missing_eos_penalty(scores, response_ids, response_mask, *, eos_token_id, penalty):
    """score − penalty for every response that contains no EOS among its valid tokens.

    The reward model was trained on EOS-terminated text; a response cut off by max_new_tokens is
    outside what it saw, and its score is not to be trusted (trl; the N+ implementation details).

    Args:
      scores: [B].  response_ids, response_mask: [B, N].  eos_token_id: int.  penalty: float ≥ 0.
    Returns:
      [B] penalised scores.
    """
    chex.assert_rank(scores, 1)
    has_eos = jnp.any((response_ids == eos_token_id) & (response_mask > 0), axis=-1)  # [B]
    return jnp.where(has_eos, scores, scores - penalty)


def make_experience(
    policy_apply: Callable,
    reference_apply: Callable,
    prompt_ids,
    prompt_mask,
    response_ids,
    response_mask,
    scores,
    *,
    kl_coef,
    kl_estimator: str = "k1",
    gamma: float = 1.0,
    lam: float = 0.95,
    temperature: float = 1.0,
    whiten_rewards: bool = False,
    rollout_logprobs=None,
) -> Experience:
    """Score a rollout batch: log-probs, reference log-probs, values, KL-penalised rewards, GAE.

    logπ_old = token_logprobs(actor(x)/τ);   logπ_ref = token_logprobs(reference(x)/τ)
    rₜ = −β KLₜ(logπ_old, logπ_ref) + 1[t = last]·score          (rl.kl_penalized_rewards)
    Â, R = GAE(r, V_old; γ, λ);   Â ← whiten(Â)                   (rl.gae, rl.masked_whiten)

    Args:
      policy_apply: (input_ids, attention_mask) → (logits [B, T, V], values [B, T]).
      reference_apply: (input_ids, attention_mask) → logits [B, T, V].
      prompt_ids, prompt_mask: [B, P] left-padded prompts.
      response_ids, response_mask: [B, N] the rollout.  scores: [B] (after any EOS penalty).
      kl_coef: β.  kl_estimator: "k1" | "k3".  gamma, lam: GAE.  temperature: τ.
      whiten_rewards: whiten the rewards (mean kept) before GAE.
      rollout_logprobs: [B, N] log π_old from the sampler; when given they are used instead of
        recomputing them (the actor's logits are then unused and XLA drops that computation).
    Returns:
      Experience.
    """
    chex.assert_rank(
        [prompt_ids, prompt_mask, response_ids, response_mask, scores], [2, 2, 2, 2, 1]
    )
    mask = response_mask.astype(jnp.float32)  # [B, N]
    logprobs, ref_logprobs, values = _score_tokens_from_logits(
        policy_apply, reference_apply, prompt_ids, prompt_mask, response_ids, mask,
        temperature=temperature, rollout_logprobs=rollout_logprobs,
    )  # fmt: skip
    return experience_from_scores(
        prompt_ids, prompt_mask, response_ids, mask, logprobs, ref_logprobs, values, scores,
        kl_coef=kl_coef, kl_estimator=kl_estimator, gamma=gamma, lam=lam,
        whiten_rewards=whiten_rewards,
    )  # fmt: skip


def experience_from_scores(prompt_ids, prompt_mask, response_ids, mask, logprobs, ref_logprobs,
                           values, scores, *, kl_coef, kl_estimator: str, gamma: float, lam: float,
                           whiten_rewards: bool, attention=None) -> Experience:  # fmt: skip
    """The Experience of a rollout whose tokens are scored (log π_old, log π_ref, V_old [B, N],
    0 where ``mask`` is 0): :func:`ppo_targets` and the fields together."""
    scores = scores.astype(jnp.float32)
    rewards, advantages, returns = ppo_targets(
        scores, logprobs, ref_logprobs, values, mask, kl_coef=kl_coef, kl_estimator=kl_estimator,
        gamma=gamma, lam=lam, whiten_rewards=whiten_rewards,
    )  # fmt: skip
    return Experience(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids,
        response_mask=mask, logprobs=logprobs, ref_logprobs=ref_logprobs, values=values,
        scores=scores, rewards=rewards, advantages=advantages, returns=returns,
        response_attention=mask if attention is None else attention,
    )  # fmt: skip


def ppo_targets(scores, logprobs, ref_logprobs, values, mask, *, kl_coef, kl_estimator: str,
                gamma: float, lam: float, whiten_rewards: bool):  # fmt: skip
    """(rewards, advantages, returns) [B, N] each of a scored rollout:

    rₜ = −β KLₜ(logπ_old, logπ_ref) + 1[t = last]·score   (whitened, mean kept, if asked)
    Â, R = GAE(r, V_old; γ, λ);   Â ← whiten(Â)
    """
    rewards = rl.kl_penalized_rewards(
        scores, logprobs, ref_logprobs, mask, kl_coef=kl_coef, kind=kl_estimator
    )  # [B, N]
    if whiten_rewards:
        rewards = rl.masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = rl.gae(rewards, values, mask, gamma=gamma, lam=lam)  # [B, N] each
    return rewards, rl.masked_whiten(advantages, mask), returns


def _score_tokens_from_logits(
    policy_apply, reference_apply, prompt_ids, prompt_mask, response_ids, mask, *,
    temperature, rollout_logprobs,
):  # fmt: skip
    """log π_old, log π_ref and V_old of each response token ([B, N] each, 0 where masked)."""
    P, N = prompt_ids.shape[1], response_ids.shape[1]
    ids, attention_mask = concat_prompt_response(prompt_ids, prompt_mask, response_ids, mask)
    logits, values = policy_apply(ids, attention_mask)  # [B, T, V], [B, T]
    if rollout_logprobs is None:
        logits = response_slice(logits, P, N)  # [B, N, V]
        logprobs = rl.token_logprobs(logits, response_ids, temperature=temperature)  # [B, N]
    else:
        chex.assert_equal_shape([rollout_logprobs, response_ids])
        logprobs = rollout_logprobs.astype(jnp.float32)  # [B, N]
    ref_logits = response_slice(reference_apply(ids, attention_mask), P, N)  # [B, N, V]
    ref_logprobs = rl.token_logprobs(ref_logits, response_ids, temperature=temperature)  # [B, N]
    values = response_slice(values, P, N)  # [B, N]
    return tuple(jnp.where(mask > 0, x, 0.0) for x in (logprobs, ref_logprobs, values))


def response_outputs(policy, prompt_ids, prompt_mask, response_ids, response_mask, *,
                     temperature, logits_chunk_size=None, logprobs=True, entropy=False,
                     entropy_grad=False):  # fmt: skip
    """(log π(aₜ|sₜ), Hₜ, V(sₜ)) [B, N] each of a policy (ActorCritic or PolicyWithCritic) at the
    response tokens, in one trunk pass over prompt ⧺ response: the LM head only at the response
    positions, ``logits_chunk_size`` tokens at a time (``CausalLM.token_logprobs``), so no
    [B, T, V] logits. ``logprobs`` False: the head is not run (log π and H come back None)."""
    P, N = prompt_ids.shape[1], response_ids.shape[1]
    ids, attention_mask = concat_prompt_response(
        prompt_ids, prompt_mask, response_ids, response_mask
    )
    hidden, values = policy.hidden_and_values(ids, attention_mask)  # [B, T, D], [B, T]
    hidden, values = response_slice(hidden, P, N), response_slice(values, P, N)  # [B, N, ...]
    if not logprobs:
        return None, None, values
    logprobs, entropy = policy.lm.token_logprobs(
        hidden, response_ids, temperature=temperature, logits_chunk_size=logits_chunk_size,
        entropy=entropy, entropy_grad=entropy_grad,
    )  # fmt: skip
    return logprobs, entropy, values


def score_tokens(policy, reference, prompt_ids, prompt_mask, response_ids, mask, *, temperature,
                 logits_chunk_size=None, rollout_logprobs=None, attention=None):  # fmt: skip
    """log π_old, log π_ref and V_old [B, N] (0 where masked) of the policy and the frozen
    reference (a CausalLM): what ``_score_tokens_from_logits`` gives on their full logits, from
    the hidden states at the response positions (:func:`response_outputs`,
    ``CausalLM.response_logprobs``). ``attention``: the tokens attended to (tools' answers too)."""
    attention = mask if attention is None else attention
    logprobs, _, values = response_outputs(
        policy, prompt_ids, prompt_mask, response_ids, attention, temperature=temperature,
        logits_chunk_size=logits_chunk_size, logprobs=rollout_logprobs is None,
    )  # fmt: skip
    if rollout_logprobs is not None:
        chex.assert_equal_shape([rollout_logprobs, response_ids])
        logprobs = rollout_logprobs.astype(jnp.float32)  # [B, N]
    ref_logprobs, _ = reference.response_logprobs(
        prompt_ids, prompt_mask, response_ids, attention, temperature=temperature,
        logits_chunk_size=logits_chunk_size,
    )  # [B, N]  # fmt: skip
    return tuple(jnp.where(mask > 0, x, 0.0) for x in (logprobs, ref_logprobs, values))


def experience_metrics(
    exp: Experience, *, kl_coef, kl_estimator: str = "k1", eos_token_id: int | None = None
) -> dict[str, jax.Array]:
    """The rollout-side metrics, under trl's names (sums over tokens, means over the batch).

    objective/kl = mean_b Σₜ KLₜ;  objective/entropy = mean_b Σₜ −log π(aₜ);
    objective/non_score_reward = mean_b Σₜ −β KLₜ;  objective/rlhf_reward = scores + non-score.
    """
    mask = exp.response_mask  # [B, N]
    kl = rl.kl_estimate(exp.logprobs, exp.ref_logprobs, kind=kl_estimator)  # [B, N]
    kl_per_seq = rl.masked_sum(kl, mask, axis=-1)  # [B]
    non_score = -kl_coef * kl_per_seq  # [B]
    metrics = {
        "objective/kl": jnp.mean(kl_per_seq),
        "objective/entropy": jnp.mean(rl.masked_sum(-exp.logprobs, mask, axis=-1)),
        "objective/non_score_reward": jnp.mean(non_score),
        "objective/rlhf_reward": jnp.mean(exp.scores + non_score),
        "objective/scores": jnp.mean(exp.scores),
        "objective/kl_coef": jnp.asarray(kl_coef, jnp.float32),
        "val/explained_variance": rl.explained_variance(exp.values, exp.returns, mask),
        "val/response_length": jnp.mean(jnp.sum(mask, axis=-1)),
    }
    if eos_token_id is not None:
        is_eos = (exp.response_ids == eos_token_id) & (mask > 0)
        metrics["val/num_eos_tokens"] = jnp.sum(is_eos).astype(jnp.float32)
    return metrics


@functools.partial(
    jax.jit,
    static_argnames=(
        "policy_graphdef", "reference_graphdef", "kl_estimator", "gamma", "lam", "temperature",
        "whiten_rewards", "use_sampler_logprobs", "eos_token_id", "logits_chunk_size",
    ),
)  # fmt: skip
def score_rollout(
    policy_params,
    reference_state,
    prompt_ids,
    prompt_mask,
    rollout: Rollout,
    scores,
    kl_coef,
    *,
    policy_graphdef,
    reference_graphdef,
    kl_estimator: str,
    gamma: float,
    lam: float,
    temperature: float,
    whiten_rewards: bool,
    use_sampler_logprobs: bool,
    eos_token_id: int | None,
    logits_chunk_size: int | None = None,
) -> tuple[Experience, dict[str, jax.Array]]:
    """:func:`make_experience`'s Experience of the policy (ActorCritic or PolicyWithCritic) and the
    frozen reference (``reference_state`` None: the policy's actor parameters, read through
    ``reference_graphdef``, LoRA's adapters-off graph) on a rollout, from their hidden states (:func:`score_tokens`: the LM head at
    the response positions, chunked), plus :func:`experience_metrics` (jitted; β = ``kl_coef`` is
    traced)."""
    policy = nnx.merge(policy_graphdef, policy_params)
    if reference_state is None:  # LoRA: the policy's own actor with its adapters off
        reference_state = policy_params["lm"]
    reference = nnx.merge(reference_graphdef, reference_state)
    mask = rollout.mask.astype(jnp.float32)  # [B, N]
    logprobs, ref_logprobs, values = score_tokens(
        policy, reference, prompt_ids, prompt_mask, rollout.tokens, mask,
        temperature=temperature, logits_chunk_size=logits_chunk_size,
        rollout_logprobs=rollout.logprobs if use_sampler_logprobs else None,
        attention=rollout.attention,
    )  # fmt: skip
    exp = experience_from_scores(
        prompt_ids, prompt_mask, rollout.tokens, mask, logprobs, ref_logprobs, values, scores,
        kl_coef=kl_coef, kl_estimator=kl_estimator, gamma=gamma, lam=lam,
        whiten_rewards=whiten_rewards, attention=rollout.attention,
    )  # fmt: skip
    metrics = experience_metrics(
        exp, kl_coef=kl_coef, kl_estimator=kl_estimator, eos_token_id=eos_token_id
    )
    if rollout.tool_calls is not None:
        metrics["tools/calls_per_episode"] = jnp.mean(rollout.tool_calls.astype(jnp.float32))
    return exp, metrics


@functools.partial(jax.jit, static_argnames=("graphdef", "group_size"))
def _reward_model_scores(
    state, prompt_ids, prompt_mask, response_ids, response_mask, *, graphdef, group_size=1
):  # fmt: skip
    model = nnx.merge(graphdef, state)
    if group_size == 1:
        return score_sequences(model, prompt_ids, prompt_mask, response_ids, response_mask)
    return model.score_responses(
        prompt_ids[::group_size], prompt_mask[::group_size], response_ids, response_mask,
        group_size=group_size,
    )  # fmt: skip


@struct.dataclass
class RewardModelFn:
    """``reward_fn(prompt_ids, prompt_mask, rollout, *, group_size=1) -> scores [R]`` of a RewardModel.

    A pytree (its parameters are the leaves), so a jitted program can take it as an argument and run
    it inside (GRPO's one-program iteration). ``shares_prompts``: with ``group_size`` G the rows come
    in groups of G that share a prompt, and each prompt is run once per group.
    """

    graphdef: Any = struct.field(pytree_node=False)
    state: Any  # the RewardModel's nnx.State
    shares_prompts: ClassVar[bool] = True

    def __call__(self, prompt_ids, prompt_mask, rollout, *, group_size=1):
        return _reward_model_scores(
            self.state, prompt_ids, prompt_mask, rollout.tokens, rollout.attention_mask,
            graphdef=self.graphdef, group_size=group_size,
        )  # fmt: skip


def reward_model_fn(reward_model: nnx.Module, *, mesh=None) -> RewardModelFn:
    """The reward function of a RewardModel (jitted): ``reward_fn(prompt_ids, prompt_mask, rollout)
    -> scores [B]``.

    The reward model reads its score at the last real token of prompt ⧺ response (the EOS, or the
    last generated token when there is none). With a device ``mesh`` its parameters are sharded
    like the policy's (``models.sharding``).
    """
    graphdef, state = nnx.split(reward_model)
    if mesh is not None:
        state = jax.device_put(state, param_shardings(state, mesh))
    return RewardModelFn(graphdef=graphdef, state=state)
