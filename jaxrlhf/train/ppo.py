"""PPO for RLHF: make_experience (rollout → scores → reference/critic → rewards → GAE) and the update.

One iteration, as data (every arrow a pure function of ``jaxrlhf.rl`` or a model forward pass):

    prompts [B, P] ──generate(actor)──▶ Rollout(tokens [B, N], mask [B, N])
    reward_fn(prompts, rollout) ──▶ scores [B]           (− missing_eos_penalty without an EOS)
    actor-critic(prompt ⧺ response) ──▶ logprobs [B, N], values [B, N]
    reference(prompt ⧺ response) ──▶ ref_logprobs [B, N]
    rl.kl_penalized_rewards ──▶ rewards [B, N];  rl.gae ──▶ advantages, returns;  rl.masked_whiten
    ── Experience (fixed for the whole update) ──▶ ppo_epochs × minibatches of train_step
    train_step = ∇ [L_policy + c₁ L_value − c₂ H] → pmean over devices → optax update

The sampling temperature τ is applied everywhere a log-probability is taken: π(a|s) =
softmax(logits / τ), in the rollout, for the reference, and in the loss (as trl does), so the ratio
and the KL compare the distribution that actually sampled the tokens.

By default the log-probs of the rollout are *recomputed* with a full forward pass of the actor (not
taken from the KV-cached decode): the same forward as the train step, so the first ratio of every
update is exactly 1. With a shared trunk that pass is needed for the values anyway; with a separate
critic ``recompute_logprobs=False`` reuses the sampler's log-probs instead (as trl does), which saves
one actor forward per iteration at the price of float-rounding differences between the two.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from jaxrlhf import rl
from jaxrlhf.config import option, require
from jaxrlhf.models import ActorCritic, CausalLM, ValueModel
from jaxrlhf.train.optim import SCHEDULES, learning_rate_schedule, make_optimizer
from jaxrlhf.train.parallel import (
    PARALLELISM,
    TrainState,
    device_share,
    init_train_state,
    make_train_step,
    maybe_initialize_distributed,
)
from jaxrlhf.train.parallel import train_step as parallel_train_step

KL_ESTIMATORS = ("k1", "k3")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")


# ============================================================================ configuration


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPOConfig:
    """PPO for RLHF: rollouts, rewards, the clipped update, the KL penalty, devices, checkpoints."""

    num_iterations: int = option(100, "PPO iterations (one rollout batch + its update each).")
    batch_size: int = option(64, "Prompts, hence rollouts, per iteration.")
    num_minibatches: int = option(1, "Minibatches per PPO epoch (must divide batch_size).")
    ppo_epochs: int = option(4, "Passes over each rollout batch.")
    max_new_tokens: int = option(32, "Response length N (tokens generated per prompt).")
    temperature: float = option(1.0, "Sampling temperature τ, also applied to every log-prob.")
    top_k: int | None = option(None, "Sample only from the k most likely tokens (None: off).")
    top_p: float | None = option(None, "Nucleus sampling mass (None: off).")
    learning_rate: float = option(1e-5, "Peak Adam learning rate.")
    lr_schedule: str = option("linear", "Learning-rate schedule: constant | linear | cosine.")
    warmup_steps: int = option(0, "Linear warm-up optimiser steps.")
    max_grad_norm: float | None = option(1.0, "Global-norm gradient clipping (None: off).")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    adam_eps: float = option(1e-5, "Adam ε.")
    clip_eps: float = option(0.2, "PPO ratio clip ε.")
    value_clip_eps: float | None = option(0.2, "Value clip ε around rollout values (None: off).")
    vf_coef: float = option(0.1, "Value-loss coefficient c₁ (our value loss has no ½ factor).")
    ent_coef: float = option(0.0, "Entropy-bonus coefficient c₂.")
    gamma: float = option(1.0, "Discount γ.")
    lam: float = option(0.95, "GAE λ.")
    kl_coef: float = option(0.05, "KL penalty coefficient β (initial value when adaptive).")
    kl_estimator: str = option("k1", "Per-token KL estimator in the reward: k1 | k3.")
    adaptive_kl: bool = option(False, "Adapt β towards kl_target (Ziegler et al. 2019).")
    kl_target: float = option(6.0, "Adaptive KL: target KL per sequence.")
    kl_horizon: float = option(10000.0, "Adaptive KL: horizon in samples.")
    whiten_rewards: bool = option(False, "Whiten the per-token rewards before GAE.")
    recompute_logprobs: bool = option(
        True,
        "Recompute log π_old by a full forward (first ratio exactly 1); False reuses the "
        "sampler's (as trl does; saves an actor forward with a separate critic).",
    )
    missing_eos_penalty: float | None = option(
        None, "Subtracted from the score of a response without EOS (None: off)."
    )
    loss_aggregation: str = option(
        "token_mean",
        "Policy-loss reduction: token_mean | seq_mean_token_mean | seq_mean_token_sum.",
    )
    separate_critic: bool = option(
        False, "Separate ValueModel instead of a value head on the actor."
    )
    parallelism: str = option("single", "Train-step data parallelism: single | pmap | shard_map.")
    num_devices: int | None = option(None, "Devices for pmap/shard_map (None: all local).")
    distributed_init: bool = option(
        False, "Call jax.distributed.initialize() first (multi-host TPU VMs / GPU clusters)."
    )
    seed: int = option(0, "Seed of rollouts, prompt order and minibatch shuffles.")
    checkpoint_dir: str | None = option(None, "Directory for orbax checkpoints (None: none).")
    checkpoint_every: int = option(0, "Save every this many iterations (0: only at the end).")
    keep_checkpoints: int = option(2, "Most recent checkpoints to keep.")

    def __post_init__(self):
        for name in ("num_iterations", "batch_size", "num_minibatches", "ppo_epochs"):
            require(getattr(self, name) >= 1, self, name, "must be ≥ 1")
        require(self.max_new_tokens >= 1, self, "max_new_tokens", "must be ≥ 1")
        require(
            self.batch_size % self.num_minibatches == 0,
            self,
            "num_minibatches",
            f"must divide batch_size = {self.batch_size}",
        )
        require(self.temperature > 0, self, "temperature", "must be > 0")
        require(self.top_k is None or self.top_k >= 1, self, "top_k", "must be ≥ 1 or None")
        require(self.top_p is None or 0 < self.top_p <= 1, self, "top_p", "must be in (0, 1]")
        require(self.learning_rate > 0, self, "learning_rate", "must be > 0")
        require(self.lr_schedule in SCHEDULES, self, "lr_schedule", f"must be one of {SCHEDULES}")
        require(self.warmup_steps >= 0, self, "warmup_steps", "must be ≥ 0")
        require(
            self.max_grad_norm is None or self.max_grad_norm > 0,
            self,
            "max_grad_norm",
            "must be > 0 or None",
        )
        require(self.weight_decay >= 0, self, "weight_decay", "must be ≥ 0")
        require(self.adam_eps > 0, self, "adam_eps", "must be > 0")
        require(0 < self.clip_eps < 1, self, "clip_eps", "must be in (0, 1)")
        require(
            self.value_clip_eps is None or self.value_clip_eps > 0,
            self,
            "value_clip_eps",
            "must be > 0 or None",
        )
        require(self.vf_coef >= 0, self, "vf_coef", "must be ≥ 0")
        require(self.ent_coef >= 0, self, "ent_coef", "must be ≥ 0")
        require(0 <= self.gamma <= 1, self, "gamma", "must be in [0, 1]")
        require(0 <= self.lam <= 1, self, "lam", "must be in [0, 1]")
        require(self.kl_coef >= 0, self, "kl_coef", "must be ≥ 0")
        require(
            self.kl_estimator in KL_ESTIMATORS,
            self,
            "kl_estimator",
            f"must be one of {KL_ESTIMATORS}",
        )
        require(self.kl_target > 0, self, "kl_target", "must be > 0")
        require(self.kl_horizon > 0, self, "kl_horizon", "must be > 0")
        require(
            self.loss_aggregation in AGGREGATIONS,
            self,
            "loss_aggregation",
            f"must be one of {AGGREGATIONS}",
        )
        require(
            self.parallelism in PARALLELISM, self, "parallelism", f"must be one of {PARALLELISM}"
        )
        require(
            self.num_devices is None or self.num_devices >= 1,
            self,
            "num_devices",
            "must be ≥ 1 or None",
        )
        if self.parallelism != "single" and self.num_devices is not None:
            require(
                (self.batch_size // self.num_minibatches) % self.num_devices == 0,
                self,
                "num_devices",
                "must divide the minibatch size batch_size / num_minibatches",
            )
        require(self.checkpoint_every >= 0, self, "checkpoint_every", "must be ≥ 0")
        require(self.keep_checkpoints >= 1, self, "keep_checkpoints", "must be ≥ 1")

    @property
    def minibatch_size(self) -> int:
        return self.batch_size // self.num_minibatches

    @property
    def total_optimizer_steps(self) -> int:
        return self.num_iterations * self.ppo_epochs * self.num_minibatches


# ============================================================================ data


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


@struct.dataclass
class PPOState:
    """Everything that evolves during training (a pytree; what a checkpoint stores)."""

    train: TrainState  # params, opt_state, step
    rng: jax.Array  # uint32 [2] raw PRNG key for rollouts and shuffles
    iteration: jax.Array  # int32 [] PPO iterations completed
    kl: rl.AdaptiveKLState  # kl_coef: float32 [] β (constant unless adaptive_kl)


class PolicyWithCritic(nnx.Module):
    """An actor and a separate critic behind the ActorCritic interface: → (logits, values)."""

    def __init__(self, lm: CausalLM, critic: ValueModel):
        self.lm = lm
        self.critic = critic

    def __call__(self, input_ids, attention_mask):
        return self.lm(input_ids, attention_mask), self.critic(input_ids, attention_mask)


def copy_module(module: nnx.Module) -> nnx.Module:
    """A deep copy with its own Variables (``nnx.merge(*nnx.split(m))`` would share them)."""
    return nnx.clone(module)


def init_policy(
    sft: CausalLM,
    *,
    separate_critic: bool = False,
    critic_init: nnx.Module | None = None,
    rngs: nnx.Rngs,
) -> nnx.Module:
    """The trainable policy: the SFT model's weights plus a fresh value head (or a ValueModel).

    Shared trunk (default): ActorCritic whose ``lm`` is a copy of ``sft``. Separate critic: a
    ValueModel whose trunk is copied from ``critic_init`` (e.g. the reward model, as trl does) or
    from ``sft``; its value head is freshly initialised.
    """
    if not separate_critic:
        policy = ActorCritic(sft.config, rngs=rngs)
        policy.lm = copy_module(sft)
        return policy
    source = critic_init if critic_init is not None else sft
    critic = ValueModel(source.config, rngs=rngs)
    critic.model = copy_module(source.model)
    return PolicyWithCritic(copy_module(sft), critic)


def generation_model(policy: nnx.Module) -> CausalLM:
    """The CausalLM inside a policy (ActorCritic.lm or PolicyWithCritic.lm)."""
    return policy.lm if hasattr(policy, "lm") else policy


# ============================================================================ the pure functions


def _zero_masked(x, mask):
    """x with masked positions set to 0 (before any arithmetic, so garbage there cannot leak)."""
    return jnp.where(mask > 0, x, jnp.zeros_like(x))


def concat_prompt_response(prompt_ids, prompt_mask, response_ids, response_mask):
    """prompt ⧺ response: ids [B, P + N] and attention mask [B, P + N] (int32)."""
    input_ids = jnp.concatenate([prompt_ids, response_ids.astype(prompt_ids.dtype)], axis=1)
    mask = jnp.concatenate([prompt_mask.astype(jnp.int32), response_mask.astype(jnp.int32)], axis=1)
    return input_ids, mask


def response_slice(x, prompt_len: int, response_len: int):
    """The positions whose outputs score the response: x[:, P−1 : P−1+N].

    logits[:, t] predict token t + 1, so response token j (at P + j) is scored by position P − 1 + j;
    likewise the value of the state before response token j is values[:, P − 1 + j].
    """
    return x[:, prompt_len - 1 : prompt_len - 1 + response_len]


def missing_eos_penalty(scores, response_ids, response_mask, *, eos_token_id, penalty):
    """score − penalty for every response that contains no EOS among its valid tokens.

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
    P, N = prompt_ids.shape[1], response_ids.shape[1]
    mask = response_mask.astype(jnp.float32)  # [B, N]
    input_ids, attention_mask = concat_prompt_response(
        prompt_ids, prompt_mask, response_ids, response_mask
    )  # [B, P + N]
    logits, values = policy_apply(input_ids, attention_mask)  # [B, T, V], [B, T]
    logits = response_slice(logits, P, N)  # [B, N, V]
    values = _zero_masked(response_slice(values, P, N), mask)  # [B, N]
    if rollout_logprobs is None:
        logprobs = rl.token_logprobs(logits, response_ids, temperature=temperature)  # [B, N]
    else:
        chex.assert_equal_shape([rollout_logprobs, response_ids])
        logprobs = rollout_logprobs.astype(jnp.float32)  # [B, N]
    ref_logits = response_slice(reference_apply(input_ids, attention_mask), P, N)  # [B, N, V]
    ref_logprobs = rl.token_logprobs(ref_logits, response_ids, temperature=temperature)  # [B, N]
    logprobs = _zero_masked(logprobs, mask)
    ref_logprobs = _zero_masked(ref_logprobs, mask)
    scores = scores.astype(jnp.float32)
    rewards = rl.kl_penalized_rewards(
        scores, logprobs, ref_logprobs, mask, kl_coef=kl_coef, kind=kl_estimator
    )  # [B, N]
    if whiten_rewards:
        rewards = rl.masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = rl.gae(rewards, values, mask, gamma=gamma, lam=lam)  # [B, N] each
    advantages = rl.masked_whiten(advantages, mask)  # [B, N]
    return Experience(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids,
        response_mask=mask,
        logprobs=logprobs,
        ref_logprobs=ref_logprobs,
        values=values,
        scores=scores,
        rewards=rewards,
        advantages=advantages,
        returns=returns,
    )


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


def ppo_minibatch_loss(
    params,
    batch: Experience,
    axis_name: str | None,
    *,
    apply: Callable,
    clip_eps: float,
    value_clip_eps: float | None,
    vf_coef: float,
    ent_coef: float,
    temperature: float,
    aggregation: str = "token_mean",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The PPO loss of one minibatch (per device), with its diagnostics.

    L = L_policy + c₁ L_value − c₂ H    (rl.ppo_loss; π and H at temperature τ)

    Each term is multiplied by this device's share of its normaliser (``device_share``: valid tokens,
    or sequences for the seq_mean aggregations) so that the pmean over devices equals the loss of the
    global minibatch; on one device every share is 1 and L is exactly ``rl.ppo_loss``.

    Args:
      params: trainable parameters.  batch: an Experience minibatch [b, ...].
      axis_name: device axis or None.  apply: (params, ids, mask) → (logits, values).
    Returns:
      (loss, metrics under trl's names).
    """
    P, N = batch.prompt_ids.shape[1], batch.response_ids.shape[1]
    mask = batch.response_mask  # [b, N]
    input_ids, attention_mask = concat_prompt_response(
        batch.prompt_ids, batch.prompt_mask, batch.response_ids, mask
    )
    logits, values = apply(params, input_ids, attention_mask)  # [b, T, V], [b, T]
    logits = response_slice(logits, P, N)  # [b, N, V]
    values = response_slice(values, P, N)  # [b, N]
    logprobs = rl.token_logprobs(logits, batch.response_ids, temperature=temperature)  # [b, N]
    entropy = rl.token_entropy(logits, temperature=temperature)  # [b, N]
    _, parts = rl.ppo_loss(
        logprobs,
        batch.logprobs,
        batch.advantages,
        values,
        batch.values,
        batch.returns,
        mask,
        entropy,
        clip_eps=clip_eps,
        value_clip_eps=value_clip_eps,
        vf_coef=vf_coef,
        ent_coef=ent_coef,
        aggregation=aggregation,
    )
    token_share = device_share(jnp.sum(mask), axis_name)
    seq_share = device_share(mask.shape[0], axis_name)
    policy_share = token_share if aggregation == "token_mean" else seq_share
    loss = (
        policy_share * parts["policy"]
        + vf_coef * token_share * parts["value"]
        - ent_coef * token_share * parts["entropy"]
    )

    logprobs = jax.lax.stop_gradient(logprobs)
    values = jax.lax.stop_gradient(values)
    ratio = jnp.exp(_zero_masked(logprobs - batch.logprobs, mask))  # [b, N]
    if value_clip_eps is None:
        value_clipfrac = jnp.zeros((), jnp.float32)
    else:
        unclipped = (values - batch.returns) ** 2  # [b, N]
        clipped_values = batch.values + jnp.clip(
            values - batch.values, -value_clip_eps, value_clip_eps
        )
        value_clipfrac = rl.masked_mean(
            ((clipped_values - batch.returns) ** 2 > unclipped).astype(jnp.float32), mask
        )
    metrics = {
        "policy/approxkl_avg": rl.approx_kl(logprobs, batch.logprobs, mask),
        "policy/clipfrac_avg": rl.clip_fraction(logprobs, batch.logprobs, mask, clip_eps=clip_eps),
        "policy/entropy_avg": parts["entropy"],
        "loss/policy_avg": parts["policy"],
        "loss/value_avg": parts["value"],
        "val/clipfrac_avg": value_clipfrac,
        "val/ratio": rl.masked_mean(ratio, mask),
    }
    metrics = {k: jax.lax.stop_gradient(v) * token_share for k, v in metrics.items()}
    metrics["loss/policy_avg"] = jax.lax.stop_gradient(parts["policy"]) * policy_share
    return loss, metrics


def prompt_batch_indices(
    num_prompts: int, batch_size: int, iteration: int, seed: int
) -> np.ndarray:
    """Which prompts iteration ``i`` uses: epoch-wise shuffles, a deterministic function of (i, seed).

    The prompt set is reshuffled every ⌊num_prompts / batch_size⌋ iterations; the remainder of each
    shuffle is skipped. Being a function of the iteration number, a resumed run sees the same prompts.
    """
    per_epoch = num_prompts // batch_size
    if per_epoch < 1:
        raise ValueError(f"{num_prompts} prompts cannot fill batch_size = {batch_size}")
    epoch, index = divmod(int(iteration), per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(num_prompts)
    return order[index * batch_size : (index + 1) * batch_size]


def reward_model_fn(reward_model: nnx.Module) -> Callable:
    """A ``reward_fn(prompt_ids, prompt_mask, rollout) -> scores [B]`` from a RewardModel (jitted).

    The reward model reads its score at the last real token of prompt ⧺ response (the EOS, or the
    last generated token when there is none).
    """
    graphdef, state = nnx.split(reward_model)

    @jax.jit
    def score(state, prompt_ids, prompt_mask, response_ids, response_mask):
        model = nnx.merge(graphdef, state)
        ids, mask = concat_prompt_response(prompt_ids, prompt_mask, response_ids, response_mask)
        return model(ids, mask)  # [B]

    def reward_fn(prompt_ids, prompt_mask, rollout):
        return score(state, prompt_ids, prompt_mask, rollout.tokens, rollout.mask)

    return reward_fn


# ============================================================================ the driver


class PPOPrograms:
    """The jitted programs of one (model structure, config): rollout, experience, update.

    Built once per distinct key and cached (:func:`programs_for`), so trainers that share a model
    structure and a config (a resumed run, a test's second trainer) reuse the compiled code.
    """

    def __init__(
        self,
        policy: nnx.Module,
        reference: CausalLM,
        config: PPOConfig,
        *,
        eos_token_id: int | None,
        pad_token_id: int,
    ):
        c = self.config = config
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id
        self.graphdef, _, self.rest = nnx.split(policy, nnx.Param, ...)  # rest: empty for ours
        self.ref_graphdef, _ = nnx.split(reference)
        self.gen_graphdef, _, self.gen_rest = nnx.split(generation_model(policy), nnx.Param, ...)
        self.optimizer = make_optimizer(
            learning_rate=c.learning_rate,
            total_steps=c.total_optimizer_steps,
            schedule=c.lr_schedule,
            warmup_steps=c.warmup_steps,
            max_grad_norm=c.max_grad_norm,
            weight_decay=c.weight_decay,
            eps=c.adam_eps,
        )
        self.rollout = jax.jit(self._rollout)
        self.experience = jax.jit(self._experience)
        self.gather = jax.jit(_gather)
        self.penalty = jax.jit(self._penalty)
        self.split_rng = jax.jit(
            functools.partial(split_rng, epochs=c.ppo_epochs, batch_size=c.batch_size)
        )
        self.kl_update = jax.jit(
            functools.partial(
                rl.adaptive_kl_update,
                n_steps=c.batch_size,
                target=c.kl_target,
                horizon=c.kl_horizon,
            )
        )
        self._steppers: dict = {}
        self._updates: dict = {}

    def model(self, params):
        """The policy module with ``params``."""
        return nnx.merge(self.graphdef, params, self.rest)

    def apply(self, params, input_ids, attention_mask):
        """(logits [B, T, V], values [B, T]) of the policy with ``params``."""
        return self.model(params)(input_ids, attention_mask)

    def loss_fn(self, params, batch, axis_name):
        """The per-device PPO loss (``ppo_minibatch_loss`` with this config's coefficients)."""
        c = self.config
        return ppo_minibatch_loss(
            params,
            batch,
            axis_name,
            apply=self.apply,
            clip_eps=c.clip_eps,
            value_clip_eps=c.value_clip_eps,
            vf_coef=c.vf_coef,
            ent_coef=c.ent_coef,
            temperature=c.temperature,
            aggregation=c.loss_aggregation,
        )

    def train_step(self, train_state: TrainState, minibatch: Experience):
        """One optimiser step on one device: pure (state, minibatch) → (state, metrics)."""
        return parallel_train_step(
            train_state, minibatch, loss_fn=self.loss_fn, optimizer=self.optimizer
        )

    def stepper(self, parallelism: str, num_devices: int | None):
        """The train step wrapped for ``parallelism`` (compiled once per setting)."""
        key = (parallelism, num_devices)
        if key not in self._steppers:
            self._steppers[key] = make_train_step(
                self.loss_fn, self.optimizer, parallelism=parallelism, num_devices=num_devices
            )
        return self._steppers[key]

    def update_fn(self, parallelism: str, num_devices: int | None):
        """One whole update, ``(train_state, exp, perms [E, B]) -> (train_state, mean metrics)``.

        Under "single" and "shard_map" the ppo_epochs × num_minibatches steps run inside one
        jitted ``lax.scan`` (one dispatch per iteration); under "pmap" a Python loop calls the
        pmapped step. Compiled once per setting.
        """
        key = (parallelism, num_devices)
        if key in self._updates:
            return self._updates[key]
        stepper = self.stepper(parallelism, num_devices)
        b = self.config.minibatch_size

        def minibatch_indices(perms):  # [E, B] -> [E · M, b]
            return perms.reshape(-1, b)

        if parallelism == "pmap":

            def update(train_state, exp, perms):
                state = stepper.put_state(train_state)
                step_metrics = []
                for idx in minibatch_indices(perms):
                    state, metrics = stepper.step(state, stepper.put_batch(self.gather(exp, idx)))
                    step_metrics.append(metrics)
                metrics = jax.device_get(step_metrics)
                mean = {k: np.mean([m[k] for m in metrics]) for k in metrics[0]}
                return stepper.get_state(state), mean

        else:

            @jax.jit
            def update(train_state, exp, perms):
                def body(state, idx):
                    return stepper.step(state, _gather(exp, idx))

                state, metrics = jax.lax.scan(body, train_state, minibatch_indices(perms))
                return state, jax.tree.map(jnp.mean, metrics)

        self._updates[key] = update
        return update

    def _rollout(self, params, prompt_ids, prompt_mask, rng):
        from jaxrlhf.rollout import generate

        c = self.config
        lm = nnx.merge(self.gen_graphdef, params["lm"], self.gen_rest)
        return generate(
            lm,
            prompt_ids,
            prompt_mask,
            max_new_tokens=c.max_new_tokens,
            rng=rng,
            temperature=c.temperature,
            top_k=c.top_k,
            top_p=c.top_p,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )

    def _penalty(self, scores, response_ids, response_mask):
        return missing_eos_penalty(
            scores,
            response_ids,
            response_mask,
            eos_token_id=self.eos_token_id,
            penalty=self.config.missing_eos_penalty,
        )

    def _experience(self, params, ref_state, prompt_ids, prompt_mask, rollout, scores, kl_coef):
        c = self.config
        reference = nnx.merge(self.ref_graphdef, ref_state)
        exp = make_experience(
            lambda ids, mask: self.apply(params, ids, mask),
            reference,
            prompt_ids,
            prompt_mask,
            rollout.tokens,
            rollout.mask,
            scores,
            kl_coef=kl_coef,
            kl_estimator=c.kl_estimator,
            gamma=c.gamma,
            lam=c.lam,
            temperature=c.temperature,
            whiten_rewards=c.whiten_rewards,
            rollout_logprobs=None if c.recompute_logprobs else rollout.logprobs,
        )
        metrics = experience_metrics(
            exp, kl_coef=kl_coef, kl_estimator=c.kl_estimator, eos_token_id=self.eos_token_id
        )
        return exp, metrics


def split_rng(rng, *, epochs: int, batch_size: int):
    """One iteration's randomness from the state's key: (next key, rollout key, perms [E, B]).

    perms[e] is the order in which epoch e visits the batch; consecutive slices of it are the
    minibatches.
    """
    rng, rollout_rng, shuffle_rng = jax.random.split(rng, 3)
    perms = jax.vmap(lambda k: jax.random.permutation(k, batch_size))(
        jax.random.split(shuffle_rng, epochs)
    )  # [E, B]
    return rng, rollout_rng, perms


def _gather(exp: Experience, idx) -> Experience:
    """The rows ``idx`` [b] of every field: a minibatch."""
    return jax.tree.map(lambda x: x[idx], exp)


_PROGRAMS: dict[Any, PPOPrograms] = {}


def programs_for(
    policy: nnx.Module,
    reference: CausalLM,
    config: PPOConfig,
    *,
    eos_token_id: int | None,
    pad_token_id: int,
) -> PPOPrograms:
    """The (cached) :class:`PPOPrograms` for this policy/reference structure and config.

    Settings that do not change the compiled programs (devices, checkpointing) are left out of the
    key. A policy with non-Param state (none of ours has any) is never shared.
    """
    graphdef, _, rest = nnx.split(policy, nnx.Param, ...)
    ref_graphdef, _ = nnx.split(reference)
    key_config = dataclasses.replace(
        config,
        parallelism="single",
        num_devices=None,
        distributed_init=False,
        checkpoint_dir=None,
        checkpoint_every=0,
        keep_checkpoints=2,
        kl_coef=0.0,  # β is traced (PPOState.kl), so runs that differ only in β share programs
    )
    key = (graphdef, ref_graphdef, key_config, eos_token_id, pad_token_id)
    shareable = not jax.tree.leaves(rest)
    if shareable and key in _PROGRAMS:
        return _PROGRAMS[key]
    programs = PPOPrograms(
        policy, reference, key_config, eos_token_id=eos_token_id, pad_token_id=pad_token_id
    )
    if shareable:
        _PROGRAMS[key] = programs
    return programs


class PPOTrainer:
    """A thin driver around the pure functions: holds the frozen reference, the reward function,
    the prompts, the compiled programs and the :class:`PPOState`.

        trainer = PPOTrainer(config, policy, reference, reward_fn, prompt_ids, prompt_mask,
                             eos_token_id=eos, pad_token_id=pad)
        history = trainer.train(callback=lambda it, metrics: logger.log(it, metrics))

    ``policy`` is an ActorCritic (shared trunk) or a PolicyWithCritic (see :func:`init_policy`);
    ``reference`` is a frozen CausalLM; ``reward_fn(prompt_ids, prompt_mask, rollout) -> [B]`` can be
    :func:`reward_model_fn` of a RewardModel or any function of the tokens. ``prompt_ids`` /
    ``prompt_mask`` [num_prompts, P] are the whole (left-padded) prompt set; each iteration takes
    ``batch_size`` of them (:func:`prompt_batch_indices`).
    """

    def __init__(
        self,
        config: PPOConfig,
        policy: nnx.Module,
        reference: CausalLM,
        reward_fn: Callable,
        prompt_ids,
        prompt_mask,
        *,
        eos_token_id: int | None = None,
        pad_token_id: int = 0,
    ):
        maybe_initialize_distributed(config.distributed_init)
        if config.missing_eos_penalty is not None and eos_token_id is None:
            raise ValueError("PPOConfig.missing_eos_penalty needs an eos_token_id")
        prompt_ids = np.asarray(prompt_ids)
        prompt_mask = np.asarray(prompt_mask)
        if prompt_ids.ndim != 2 or prompt_ids.shape != prompt_mask.shape:
            raise ValueError(
                f"prompt_ids {prompt_ids.shape} and prompt_mask {prompt_mask.shape} must be [N, P]"
            )
        if prompt_ids.shape[0] < config.batch_size:
            raise ValueError(
                f"{prompt_ids.shape[0]} prompts cannot fill PPOConfig.batch_size = "
                f"{config.batch_size}"
            )
        self.config = config
        self.reward_fn = reward_fn
        self.prompt_ids, self.prompt_mask = prompt_ids, prompt_mask
        self.programs = programs_for(
            policy, reference, config, eos_token_id=eos_token_id, pad_token_id=pad_token_id
        )
        _, self.ref_state = nnx.split(reference)
        self.stepper = self.programs.stepper(config.parallelism, config.num_devices)
        if config.minibatch_size % self.stepper.num_devices:
            raise ValueError(
                f"PPOConfig.num_minibatches = {config.num_minibatches}: the minibatch size "
                f"{config.minibatch_size} must be divisible by {self.stepper.num_devices} devices"
            )
        params = nnx.state(policy, nnx.Param)
        self.state = PPOState(
            train=init_train_state(params, self.programs.optimizer),
            rng=jax.random.PRNGKey(config.seed),
            iteration=jnp.zeros((), jnp.int32),
            kl=rl.AdaptiveKLState(kl_coef=jnp.asarray(config.kl_coef, jnp.float32)),
        )
        self.lr_schedule = jax.jit(
            learning_rate_schedule(
                config.learning_rate,
                total_steps=config.total_optimizer_steps,
                schedule=config.lr_schedule,
                warmup_steps=config.warmup_steps,
            )
        )

    # -- one iteration -------------------------------------------------------------------------

    def collect(self, state: PPOState):
        """Rollout → scores → Experience for iteration ``state.iteration`` (no parameter change).

        Returns (experience, rollout metrics, next rng, minibatch permutations [E, B]).
        """
        c, prog = self.config, self.programs
        rng, rollout_rng, perms = prog.split_rng(state.rng)
        idx = prompt_batch_indices(len(self.prompt_ids), c.batch_size, int(state.iteration), c.seed)
        prompt_ids = jnp.asarray(self.prompt_ids[idx])  # [B, P]
        prompt_mask = jnp.asarray(self.prompt_mask[idx])  # [B, P]
        params = state.train.params
        rollout = prog.rollout(params, prompt_ids, prompt_mask, rollout_rng)
        scores = jnp.asarray(self.reward_fn(prompt_ids, prompt_mask, rollout), jnp.float32)  # [B]
        if c.missing_eos_penalty is not None:
            scores = prog.penalty(scores, rollout.tokens, rollout.mask)
        exp, metrics = prog.experience(
            params, self.ref_state, prompt_ids, prompt_mask, rollout, scores, state.kl.kl_coef
        )
        return exp, metrics, rng, perms

    def update(self, train_state: TrainState, exp: Experience, perms):
        """ppo_epochs × num_minibatches train steps on one Experience → (state, mean metrics).

        perms [E, B]: the visiting order of each epoch (see :func:`split_rng`).
        """
        update = self.programs.update_fn(self.config.parallelism, self.config.num_devices)
        return update(train_state, exp, perms)

    def iteration(self, state: PPOState) -> tuple[PPOState, dict[str, float]]:
        """One PPO iteration from ``state``: collect, update, adapt β. Returns (state, metrics)."""
        c = self.config
        start = time.perf_counter()
        exp, rollout_metrics, rng, perms = self.collect(state)
        train_state, train_metrics = self.update(state.train, exp, perms)
        kl = state.kl
        if c.adaptive_kl:
            kl = self.programs.kl_update(kl, rollout_metrics["objective/kl"])
        new_state = PPOState(train=train_state, rng=rng, iteration=state.iteration + 1, kl=kl)
        metrics = jax.device_get({**rollout_metrics, **train_metrics})
        metrics = {k: float(v) for k, v in metrics.items()}
        steps = int(state.iteration + 1) * c.ppo_epochs * c.num_minibatches
        metrics["lr"] = float(self.lr_schedule(steps - 1))
        metrics["episode"] = float((int(state.iteration) + 1) * c.batch_size)
        metrics["time/iteration_s"] = time.perf_counter() - start
        return new_state, metrics

    def step(self) -> dict[str, float]:
        """Run one iteration on the trainer's own state; returns its metrics."""
        self.state, metrics = self.iteration(self.state)
        return metrics

    def train(
        self,
        num_iterations: int | None = None,
        *,
        callback: Callable[[int, dict[str, float]], None] | None = None,
        progress: bool = True,
    ) -> list[dict[str, float]]:
        """Iterate until ``num_iterations`` (default config.num_iterations) are done in total.

        After each iteration ``callback(iteration, metrics)`` is called (the CLI writes JSONL from
        it); with ``config.checkpoint_dir`` a checkpoint is saved every ``checkpoint_every``
        iterations and after the last one. Continues from ``self.state`` (see :meth:`restore`).
        """
        from tqdm.auto import tqdm

        c = self.config
        total = c.num_iterations if num_iterations is None else num_iterations
        start = int(self.state.iteration)
        history = []
        bar = tqdm(
            range(start, total), initial=start, total=total, disable=not progress, desc="ppo"
        )
        for it in bar:
            metrics = self.step()
            history.append(metrics)
            done = it + 1
            if callback is not None:
                callback(done, metrics)
            bar.set_postfix(
                score=f"{metrics['objective/scores']:.3f}", kl=f"{metrics['objective/kl']:.3f}"
            )
            if c.checkpoint_dir and (
                (c.checkpoint_every and done % c.checkpoint_every == 0) or done == total
            ):
                self.save(c.checkpoint_dir)
        return history

    # -- checkpoints and the trained model --------------------------------------------------

    def save(self, directory: str) -> None:
        """Write an orbax checkpoint of the PPOState (+ config) as ``directory/<iteration>``."""
        from jaxrlhf.train.checkpoint import save_checkpoint

        save_checkpoint(
            directory,
            int(self.state.iteration),
            self.state,
            config=self.config,
            keep=self.config.keep_checkpoints,
        )

    def restore(self, directory: str, step: int | None = None) -> int:
        """Load the latest (or ``step``) checkpoint into ``self.state``; returns its iteration."""
        from jaxrlhf.train.checkpoint import restore_checkpoint

        self.state, _ = restore_checkpoint(directory, self.state, step=step)
        return int(self.state.iteration)

    def policy(self) -> nnx.Module:
        """The current policy as an NNX module (ActorCritic or PolicyWithCritic)."""
        return self.programs.model(self.state.train.params)

    def actor(self) -> CausalLM:
        """The current actor (the CausalLM inside the policy), e.g. for save_pretrained."""
        return generation_model(self.policy())
