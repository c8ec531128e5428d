"""Critic-free RL for language models: GRPO and its fixes (Dr. GRPO, DAPO, GSPO), RLOO and
REINFORCE++, as one recipe. One iteration (:meth:`GRPOTrainer.iteration`):

    1. sample      each of B prompts G times ──rollout.sample(actor)──▶ [B·G, N] responses
    2. score       reward_fn(prompts, rollout) ──▶ scores [B·G]  (a reward model, or Python rules)
    3. advantages  the group is the baseline: rl.grpo_advantages (Dr. GRPO: no std), rl.rloo_advantages,
                   or rl.reinforce_pp_advantages (per-token rewards with the KL, whitened over the batch)
    4. update      epochs × minibatches of state.train_step(GroupLoss): the clipped surrogate
                   (clip-higher, GSPO's sequence ratio, TIS weights) + β·KL(π‖π_ref) in the loss

No value model: the other samples of the same prompt play the critic's part. Groups whose G rewards
are all equal carry no signal (every advantage is 0); their fraction is logged
(``frac_reward_zero_std``) and, with ``dynamic_sampling``, they are dropped and replaced by new
groups (DAPO) so every update learns from every group.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from jaxrlhf import rl
from jaxrlhf.models import CausalLM
from jaxrlhf.models.heads import with_precision
from jaxrlhf.rollout import Rollout, concat_prompt_response, response_slice, sample
from jaxrlhf.train.checkpoint import save_checkpoint
from jaxrlhf.train.grpo_config import GRPOConfig
from jaxrlhf.train.loop import restore_run, run_iterations
from jaxrlhf.train.ppo import prompt_batch_indices
from jaxrlhf.train.state import Means, TrainState, init_train_state, run_steps


@struct.dataclass
class GroupBatch:
    """One iteration's responses with what the update needs; fixed for the whole update."""

    prompt_ids: jax.Array  # int32 [R, P]   each prompt repeated G times (R = B·G)
    prompt_mask: jax.Array  # [R, P]
    response_ids: jax.Array  # int32 [R, N]
    response_mask: jax.Array  # float32 [R, N]
    logprobs: jax.Array  # float32 [R, N]  log π_old (recomputed by the trainer's forward)
    rollout_logprobs: jax.Array  # float32 [R, N]  log π of the sampler (TIS)
    ref_logprobs: jax.Array  # float32 [R, N]  log π_ref (zeros when β = 0)
    advantages: jax.Array  # float32 [R, N]  per token (a sequence's advantage on its tokens)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GroupLoss:
    """The critic-free policy loss of one minibatch as (sum, count) terms (``state.train_step``).

    L = agg[−min(ρÂ, clip(ρ, 1−ε, 1+ε_high)Â) · w] + β · mean_m[k3(π‖π_ref)]
    ρ per token, or GSPO's per-sequence exp(mean_t log ρ); w = TIS weights (or 1).
    """

    graphdef: Any  # the actor (CausalLM)
    clip_eps: float
    clip_eps_high: float | None
    importance_level: str
    aggregation: str
    kl_coef: float  # β in the loss (0 when the KL goes in the reward)
    with_reference: bool  # batch.ref_logprobs hold log π_ref (else zeros: no "kl" metric)
    temperature: float
    tis_cap: float | None

    @property
    def weights(self) -> tuple[tuple[str, float], ...]:
        return (("loss/policy", 1.0),) + ((("kl", self.kl_coef),) if self.with_reference else ())

    def __call__(self, params, batch: GroupBatch) -> Means:
        P, N = batch.prompt_ids.shape[1], batch.response_ids.shape[1]
        mask = batch.response_mask
        ids, attention_mask = concat_prompt_response(
            batch.prompt_ids, batch.prompt_mask, batch.response_ids, mask
        )
        logits = response_slice(nnx.merge(self.graphdef, params)(ids, attention_mask), P, N)
        logprobs = rl.token_logprobs(logits, batch.response_ids, temperature=self.temperature)
        weights = None
        if self.tis_cap is not None:
            weights = rl.tis_weights(batch.logprobs, batch.rollout_logprobs, mask, cap=self.tis_cap)
        policy, clipped = rl.clipped_surrogate(
            logprobs, batch.logprobs, batch.advantages, mask, clip_eps=self.clip_eps,
            clip_eps_high=self.clip_eps_high, importance_level=self.importance_level,
            weights=weights,
        )  # fmt: skip
        entropy = rl.token_entropy(logits, temperature=self.temperature)
        tokens = jnp.sum(mask)
        terms = {
            "loss/policy": rl.aggregate_terms(policy, mask, aggregation=self.aggregation),
            "entropy": (jax.lax.stop_gradient(rl.masked_sum(entropy, mask)), tokens),
            "clip_ratio/region_mean": (rl.masked_sum(clipped, mask), tokens),
        }
        if self.with_reference:  # k3(π‖π_ref): GRPO's loss term, or (kl_in="reward") a metric
            terms["kl"] = (
                rl.masked_sum(rl.kl_loss(logprobs, batch.ref_logprobs, mask), mask),
                tokens,
            )
        return terms


# ============================================================================ pure pieces


def repeat_groups(x, group_size: int):
    """Each row repeated ``group_size`` times, consecutively: [B, ...] → [B·G, ...] (on the host:
    NumPy in, NumPy out; no device dispatch per iteration)."""
    return np.repeat(np.asarray(x), group_size, axis=0)


def zero_std_groups(scores, group_size: int):
    """[B·G] → [B] bool: the groups whose rewards are all equal (no learning signal)."""
    groups = scores.reshape(-1, group_size)
    return jnp.all(groups == groups[:, :1], axis=-1)


def sequence_advantages(scores, mask, *, advantage: str, group_size: int):
    """Per-token advantages [R, N] from per-response scores [R] (each response's on its tokens)."""
    if advantage == "rloo":
        seq = rl.rloo_advantages(scores, group_size=group_size)
    else:
        seq = rl.grpo_advantages(scores, group_size=group_size, scale_by_std=advantage == "grpo")
    return seq[:, None] * mask


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "reference_graphdef", "advantage", "group_size", "temperature",
                     "kl_coef", "kl_in"),
)  # fmt: skip
def make_group_batch(
    params, reference_state, prompt_ids, prompt_mask, rollout: Rollout, scores, *,
    graphdef, reference_graphdef, advantage, group_size, temperature, kl_coef, kl_in,
):  # fmt: skip
    """log π_old and log π_ref of the responses, then the advantages → (GroupBatch, metrics)."""
    P, N = prompt_ids.shape[1], rollout.tokens.shape[1]
    mask = rollout.mask
    ids, attention_mask = concat_prompt_response(prompt_ids, prompt_mask, rollout.tokens, mask)

    def logprobs_of(model):
        logits = response_slice(model(ids, attention_mask), P, N)
        return jnp.where(
            mask > 0, rl.token_logprobs(logits, rollout.tokens, temperature=temperature), 0.0
        )

    logprobs = logprobs_of(nnx.merge(graphdef, params))
    ref_logprobs = jnp.zeros_like(logprobs)
    if kl_coef > 0:
        ref_logprobs = logprobs_of(nnx.merge(reference_graphdef, reference_state))
    if advantage == "reinforce_pp":
        beta = kl_coef if kl_in == "reward" else 0.0
        rewards = rl.kl_penalized_rewards(
            scores, logprobs, ref_logprobs, mask, kl_coef=beta, kind="k1"
        )
        advantages = rl.reinforce_pp_advantages(rewards, mask)
    else:
        if kl_in == "reward" and kl_coef > 0:  # the sequence's KL folded into its score
            scores = scores - kl_coef * rl.masked_sum(logprobs - ref_logprobs, mask, axis=-1)
        advantages = sequence_advantages(scores, mask, advantage=advantage, group_size=group_size)
    batch = GroupBatch(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=rollout.tokens,
        response_mask=mask, logprobs=logprobs, rollout_logprobs=rollout.logprobs,
        ref_logprobs=ref_logprobs, advantages=advantages,
    )  # fmt: skip
    groups = scores.reshape(-1, group_size)
    mismatch = rl.logprob_mismatch(logprobs, rollout.logprobs, mask)
    metrics = {
        "reward": jnp.mean(scores),
        "reward_std": jnp.mean(jnp.std(groups, axis=-1, ddof=1)),
        "frac_reward_zero_std": jnp.mean(zero_std_groups(scores, group_size).astype(jnp.float32)),
        "completions/mean_length": jnp.mean(jnp.sum(mask, axis=-1)),
        "tis/mean_abs_logprob_diff": mismatch["mean_abs_diff"],
        "tis/max_ratio": mismatch["max_ratio"],
    }
    return batch, metrics


@functools.partial(jax.jit, static_argnames=("epochs", "rollouts", "minibatch"))
def minibatch_indices(rng, *, epochs: int, rollouts: int, minibatch: int):
    """[epochs · M, minibatch] row indices: each epoch a fresh permutation, cut into minibatches."""
    keys = jax.random.split(rng, epochs)
    perms = jax.vmap(lambda k: jax.random.permutation(k, rollouts))(keys)  # [E, R]
    return perms.reshape(-1, minibatch)


# ============================================================================ reward functions


def text_reward_fn(functions, tokenizer, *, weights=None) -> Callable:
    """A token-level ``reward_fn(prompt_ids, prompt_mask, rollout) -> [R]`` from Python rules on
    text, each ``fn(prompts: list[str], completions: list[str]) -> list[float]``, summed with
    ``weights`` (default 1 each); fractional values are kept (float32)."""
    weights = [1.0] * len(functions) if weights is None else list(weights)
    if len(weights) != len(functions):
        raise ValueError(f"{len(weights)} weights for {len(functions)} reward functions")

    def decode(ids, mask):
        return [
            tokenizer.decode([t for t, m in zip(row, keep) if m], skip_special_tokens=True)
            for row, keep in zip(np.asarray(ids).tolist(), np.asarray(mask).tolist())
        ]

    def reward_fn(prompt_ids, prompt_mask, rollout):
        prompts, completions = decode(prompt_ids, prompt_mask), decode(rollout.tokens, rollout.mask)
        total = np.zeros(len(completions), np.float32)
        for fn, w in zip(functions, weights):
            values = np.asarray(fn(prompts, completions), np.float32)
            if values.shape != total.shape:
                name = getattr(fn, "__name__", repr(fn))
                raise ValueError(
                    f"reward function {name} returned {values.shape[0] if values.ndim else 'a scalar'}"
                    f" values for {len(completions)} completions"
                )
            total += w * values
        return jnp.asarray(total)

    return reward_fn


# ============================================================================ the trainer


@struct.dataclass
class GRPOState:
    """What a GRPO run changes (a pytree; what a checkpoint stores)."""

    train: TrainState
    rng: jax.Array  # uint32 [2]
    iteration: jax.Array  # int32 []


class GRPOTrainer:
    """The frozen reference, the reward function, the prompts and the settings; ``state`` is what
    each iteration changes.

        trainer = GRPOTrainer.from_sft(config, sft, prompt_ids, prompt_mask, reward_fn=fn,
                                       eos_token_id=eos, pad_token_id=pad)
        trainer.train()
    """

    def __init__(self, config: GRPOConfig, actor: CausalLM, reference: CausalLM, reward_fn,
                 prompt_ids, prompt_mask, *, eos_token_id=None, pad_token_id=0):  # fmt: skip
        self.config, self.reward_fn = config, reward_fn
        self.prompt_ids, self.prompt_mask = np.asarray(prompt_ids), np.asarray(prompt_mask)
        if len(self.prompt_ids) < config.batch_size:
            raise ValueError(
                f"{len(self.prompt_ids)} prompts cannot fill GRPOConfig.batch_size = "
                f"{config.batch_size}"
            )
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id
        self.graphdef, params = nnx.split(actor)
        self.reference_graphdef, self.reference_state = nnx.split(reference)
        self.loss = GroupLoss(
            graphdef=self.graphdef, clip_eps=config.clip_eps, clip_eps_high=config.clip_eps_high,
            importance_level=config.importance_level, aggregation=config.loss_aggregation,
            kl_coef=config.kl_coef if config.kl_in == "loss" else 0.0,
            with_reference=config.kl_coef > 0,
            temperature=config.temperature, tis_cap=config.tis_cap,
        )  # fmt: skip
        self.stepper = config.train_step(self.loss, config.optimizer, params)
        self.state = GRPOState(
            train=init_train_state(params, config.optimizer),
            rng=jax.random.PRNGKey(config.seed),
            iteration=jnp.zeros((), jnp.int32),
        )

    @classmethod
    def from_sft(cls, config: GRPOConfig, sft: CausalLM, prompt_ids, prompt_mask, *,
                 reward_fn, eos_token_id=None, pad_token_id=0) -> GRPOTrainer:  # fmt: skip
        """The actor is a copy of ``sft`` (in float32 with the config's compute dtype / remat); the
        reference is ``sft`` itself (used only when kl_coef > 0)."""
        return cls(config, config.trainable(sft), with_precision(sft, compute_dtype=config.compute_dtype),
                   reward_fn, prompt_ids, prompt_mask, eos_token_id=eos_token_id,
                   pad_token_id=pad_token_id)  # fmt: skip

    # -- one iteration: the recipe -----------------------------------------------------------------

    def iteration(self, state: GRPOState) -> tuple[GRPOState, dict[str, float]]:
        c, start = self.config, time.perf_counter()
        rng, shuffle_rng, *sample_rngs = jax.random.split(state.rng, 2 + 4)
        params = state.train.params
        actor = nnx.merge(self.graphdef, params)
        # 1–2. sample G responses per prompt and score them (DAPO: refill groups without signal)
        groups, dropped = self._sample_groups(actor, int(state.iteration), sample_rngs)
        prompt_ids, prompt_mask, rollout, scores = groups
        # 3. the group is the baseline: advantages (and log π_old, log π_ref)
        batch, metrics = make_group_batch(
            params, self.reference_state, prompt_ids, prompt_mask, rollout, scores,
            graphdef=self.graphdef, reference_graphdef=self.reference_graphdef,
            advantage=c.advantage, group_size=c.group_size, temperature=c.temperature,
            kl_coef=c.kl_coef, kl_in=c.kl_in,
        )  # fmt: skip
        # 4. epochs × minibatches train steps on that fixed batch
        indices = minibatch_indices(shuffle_rng, epochs=c.epochs, rollouts=c.rollouts,
                                    minibatch=c.rollouts // c.num_minibatches)  # fmt: skip
        train, train_metrics = run_steps(self.stepper, state.train, batch, indices)
        new_state = GRPOState(train=train, rng=rng, iteration=state.iteration + 1)
        metrics = {k: float(v) for k, v in jax.device_get({**metrics, **train_metrics}).items()}
        metrics["groups_resampled"] = float(dropped)
        metrics["time/iteration_s"] = time.perf_counter() - start
        return new_state, metrics

    def _sample_groups(self, actor, iteration: int, rngs):
        """G samples of each of this iteration's prompts, scored; with dynamic sampling, groups
        whose rewards are all equal are replaced by groups of fresh prompts (up to 3 more draws).
        Returns ((prompt_ids, prompt_mask, rollout, scores) [B·G, …], number of groups replaced)."""
        c = self.config
        idx = prompt_batch_indices(len(self.prompt_ids), c.batch_size, iteration, c.seed)
        kept, replaced = None, 0
        for attempt, rng in enumerate(rngs):
            if attempt:  # the next prompts in a fixed, seeded order
                idx = np.random.default_rng([c.seed, iteration, attempt]).choice(
                    len(self.prompt_ids), c.batch_size, replace=False
                )
            groups = self._draw(actor, idx, rng)
            if not c.dynamic_sampling:
                return groups, 0
            kept, filled = _merge_groups(kept, groups, c.group_size)
            replaced += filled if attempt else 0
            if not bool(jnp.any(zero_std_groups(kept[3], c.group_size))):
                break
        return kept, replaced

    def _draw(self, actor, idx, rng):
        c = self.config
        prompt_ids = repeat_groups(self.prompt_ids[idx], c.group_size)  # [B·G, P]
        prompt_mask = repeat_groups(self.prompt_mask[idx], c.group_size)
        rollout = sample(actor, prompt_ids, prompt_mask, c.sampling, rng,
                         eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id)  # fmt: skip
        scores = jnp.asarray(self.reward_fn(prompt_ids, prompt_mask, rollout), jnp.float32)
        return prompt_ids, prompt_mask, rollout, scores

    # -- the loop ----------------------------------------------------------------------------------

    def step(self) -> dict[str, float]:
        self.state, metrics = self.iteration(self.state)
        return metrics

    def train(self, num_iterations=None, *, callback=None, progress=True) -> list[dict]:
        """Iterate until ``num_iterations`` (default config.num_iterations) are done in total,
        checkpointing like PPOTrainer.train."""
        return run_iterations(
            self, num_iterations, desc="grpo", callback=callback, progress=progress,
            postfix=lambda m: {"reward": f"{m['reward']:.3f}"},
        )  # fmt: skip

    def save(self, directory: str) -> None:
        save_checkpoint(directory, int(self.state.iteration), self.state, config=self.config,
                        keep=self.config.keep_checkpoints)  # fmt: skip

    def restore(self, directory: str) -> int:
        may_change = ("num_iterations",) if self.config.lr_schedule == "constant" else ()
        self.state = restore_run(directory, self.state, self.config, may_change=may_change)
        return int(self.state.iteration)

    def actor(self) -> CausalLM:
        return nnx.merge(self.graphdef, self.state.train.params)


def _merge_groups(kept, new, group_size: int):
    """Fill the zero-signal groups of ``kept`` with signal groups of ``new`` (same shapes).
    Returns (merged, number of groups filled)."""
    if kept is None:
        return new, 0
    bad = np.flatnonzero(np.asarray(zero_std_groups(kept[3], group_size)))
    good = np.flatnonzero(~np.asarray(zero_std_groups(new[3], group_size)))
    n = min(len(bad), len(good))
    if n == 0:
        return kept, 0

    def rows(groups):
        return (groups[:, None] * group_size + np.arange(group_size)).reshape(-1)

    target, source = rows(bad[:n]), rows(good[:n])

    def fill(a, b):
        return jnp.asarray(a).at[target].set(jnp.asarray(b)[source])

    return jax.tree.map(fill, kept, new), n
