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

The G responses of a group share their prompt, and so does the work on it: sampling prefills each
prompt once, the reward model and the loss run it once and let its G responses attend to its keys and
values (``models.heads.response_hidden``; minibatches are drawn as whole groups). With one optimiser
step per batch, π_old is π_θ and the loss takes log π_old from its own forward pass (no separate one).
With a reward model the whole iteration is one jitted program (:func:`iterate`); Python rewards and
DAPO's refills run :func:`draw_groups` from the host, then :func:`update`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from jaxrlhf import rl
from jaxrlhf.models import CausalLM
from jaxrlhf.models.lora import reference_parts, split_trainable
from jaxrlhf.rollout import Rollout, sample
from jaxrlhf.train.checkpoint import save_checkpoint
from jaxrlhf.train.experience import RewardModelFn
from jaxrlhf.train.grpo_config import GRPOConfig
from jaxrlhf.train.grpo_rewards import score_groups, text_reward_fn  # noqa: F401 (re-exported)
from jaxrlhf.train.loop import restore_run, run_iterations
from jaxrlhf.train.optim import fit_rollout_batch
from jaxrlhf.train.ppo import prompt_batch_indices
from jaxrlhf.train.state import Means, ParallelStep, TrainState, init_train_state, run_steps


@struct.dataclass
class GroupBatch:
    """One iteration's responses with what the update needs; fixed for the whole update."""

    prompt_ids: jax.Array  # int32 [R, P]   each prompt repeated G times (R = B·G)
    prompt_mask: jax.Array  # [R, P]
    response_ids: jax.Array  # int32 [R, N]
    response_mask: jax.Array  # float32 [R, N]  1 at the policy's tokens (0 at tools' answers)
    response_attention: jax.Array  # float32 [R, N]  1 at every token of the episode
    logprobs: jax.Array  # float32 [R, N]  log π_old by a forward pass before the update (zeros when
    #                      on-policy: the loss then uses its own log π_θ, without gradient)
    rollout_logprobs: jax.Array  # float32 [R, N]  log π of the sampler (TIS)
    ref_logprobs: jax.Array  # float32 [R, N]  log π_ref (zeros when β = 0)
    advantages: jax.Array  # float32 [R, N]  per token (a sequence's advantage on its tokens)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GroupLoss:
    """The critic-free policy loss of one minibatch as (sum, count) terms (``state.train_step``).

    L = agg[−min(ρÂ, clip(ρ, 1−ε, 1+ε_high)Â) · w] + β · mean_m[k3(π‖π_ref)]
    ρ per token, or GSPO's per-sequence exp(mean_t log ρ); w = TIS weights (or 1).

    With ``group_size`` G > 1 the minibatch holds whole groups (G consecutive rows share a prompt) and
    each prompt is run once for its G responses. ``on_policy``: log π_old = stop_gradient(log π_θ)
    (one step per batch: ρ = 1 in value, ∇ρ = ∇ log π_θ), instead of batch.logprobs.
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
    group_size: int = 1  # G: rows i·G … i·G + G − 1 of every minibatch answer one prompt (else 1)
    on_policy: bool = False
    logits_chunk_size: int | None = None

    @property
    def weights(self) -> tuple[tuple[str, float], ...]:
        return (("loss/policy", 1.0),) + ((("kl", self.kl_coef),) if self.with_reference else ())

    def __call__(self, params, batch: GroupBatch) -> Means:
        G, mask = self.group_size, batch.response_mask
        logprobs, entropy = nnx.merge(self.graphdef, params).response_logprobs(
            batch.prompt_ids[::G], batch.prompt_mask[::G], batch.response_ids,
            batch.response_attention,
            group_size=G, temperature=self.temperature, logits_chunk_size=self.logits_chunk_size,
            entropy=True,
        )  # [b, N] each (the entropy a metric: no gradient)  # fmt: skip
        old = jax.lax.stop_gradient(logprobs) if self.on_policy else batch.logprobs  # [b, N]
        weights = None
        if self.tis_cap is not None:
            weights = rl.tis_weights(old, batch.rollout_logprobs, mask, cap=self.tis_cap)
        policy, clipped = rl.clipped_surrogate(
            logprobs, old, batch.advantages, mask, clip_eps=self.clip_eps,
            clip_eps_high=self.clip_eps_high, importance_level=self.importance_level,
            weights=weights,
        )  # fmt: skip
        tokens = jnp.sum(mask)
        terms = {
            "loss/policy": rl.aggregate_terms(policy, mask, aggregation=self.aggregation),
            "entropy": (jax.lax.stop_gradient(rl.masked_sum(entropy, mask)), tokens),
            "clip_ratio/region_mean": (rl.masked_sum(clipped, mask), tokens),
        }
        # On-policy, the sampler-vs-trainer gap is measured here rather than before the update.
        if self.on_policy:
            gap = jnp.abs(jnp.where(mask > 0, old - batch.rollout_logprobs, 0.0))
            terms["tis/mean_abs_logprob_diff"] = (rl.masked_sum(gap, mask), tokens)
        if self.with_reference:  # k3(π‖π_ref): GRPO's loss term, or (kl_in="reward") a metric
            terms["kl"] = (
                rl.masked_sum(rl.kl_loss(logprobs, batch.ref_logprobs, mask), mask),
                tokens,
            )
        return terms


# ============================================================================ pure pieces


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
                     "kl_coef", "kl_in", "on_policy", "logits_chunk_size"),
)  # fmt: skip
def make_group_batch(
    params, reference_state, prompt_ids, prompt_mask, rollout: Rollout, scores, *,
    graphdef, reference_graphdef, advantage, group_size, temperature, kl_coef, kl_in, on_policy,
    logits_chunk_size=None,
):  # fmt: skip
    """log π_old (unless ``on_policy``: the loss takes it) and log π_ref of the responses, then the
    advantages → (GroupBatch, metrics). Rows in group order; each prompt is run once per group."""
    mask = rollout.mask  # the policy's tokens: with tools, holes where the tools answered

    def logprobs_of(model):
        logprobs, _ = model.response_logprobs(
            prompt_ids[::group_size], prompt_mask[::group_size], rollout.tokens,
            rollout.attention_mask,
            group_size=group_size, temperature=temperature, logits_chunk_size=logits_chunk_size,
        )  # [R, N]  # fmt: skip
        return jnp.where(mask > 0, logprobs, 0.0)

    logprobs = jnp.zeros_like(mask) if on_policy else logprobs_of(nnx.merge(graphdef, params))
    ref_logprobs = jnp.zeros_like(mask)
    if kl_coef > 0:
        reference_state = params if reference_state is None else reference_state  # LoRA: its own
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
        response_mask=mask, response_attention=rollout.attention_mask, logprobs=logprobs,
        rollout_logprobs=rollout.logprobs,
        ref_logprobs=ref_logprobs, advantages=advantages,
    )  # fmt: skip
    groups = scores.reshape(-1, group_size)
    metrics = {
        "reward": jnp.mean(scores),
        "reward_std": jnp.mean(jnp.std(groups, axis=-1, ddof=1)),
        "frac_reward_zero_std": jnp.mean(zero_std_groups(scores, group_size).astype(jnp.float32)),
        "completions/mean_length": jnp.mean(jnp.sum(mask, axis=-1)),
    }
    if rollout.tool_calls is not None:
        metrics["tools/calls_per_episode"] = jnp.mean(rollout.tool_calls.astype(jnp.float32))
    if not on_policy:  # (on-policy, the loss reports the mean gap from its own forward pass)
        mismatch = rl.logprob_mismatch(logprobs, rollout.logprobs, mask)
        metrics["tis/mean_abs_logprob_diff"] = mismatch["mean_abs_diff"]
        metrics["tis/max_ratio"] = mismatch["max_ratio"]
    return batch, metrics


@functools.partial(jax.jit, static_argnames=("epochs", "rollouts", "minibatch", "group_size"))
def minibatch_indices(rng, *, epochs: int, rollouts: int, minibatch: int, group_size: int = 1):
    """[epochs · M, minibatch] row indices: each epoch a fresh permutation of the groups of
    ``group_size`` consecutive rows (1: of the rows), cut into minibatches."""
    keys = jax.random.split(rng, epochs)
    perms = jax.vmap(lambda k: jax.random.permutation(k, rollouts // group_size))(keys)  # [E, R/G]
    rows = perms[..., None] * group_size + jnp.arange(group_size)  # [E, R/G, G]
    return rows.reshape(-1, minibatch)


def loss_group_size(config: GRPOConfig) -> int:
    """The loss's group_size: config.minibatch_group_size, unless pmap / shard_map split a
    minibatch's rows over devices without whole groups on each (then 1: every row runs its prompt)."""
    if config.parallelism in ("pmap", "shard_map"):
        local = config.parallelism == "pmap"
        devices = config.num_devices or (jax.local_device_count() if local else jax.device_count())
        if (config.batch_size // config.num_minibatches) % devices:
            return 1
    return config.minibatch_group_size


# ============================================================================ one iteration


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The fixed parts of an iteration (hashable: a static argument of ``jax.jit``)."""

    config: GRPOConfig
    graphdef: Any  # the actor
    reference_graphdef: Any
    stepper: ParallelStep
    eos_token_id: int | None
    pad_token_id: int

    def __hash__(self) -> int:  # jax.jit hashes its static arguments on every call: hash once
        return self._hash

    @functools.cached_property
    def _hash(self) -> int:
        return hash(tuple(getattr(self, f.name) for f in dataclasses.fields(self)))


def draw_groups(recipe: Recipe, params, prompt_ids, prompt_mask, rng, reward_fn, sampler=sample):
    """Steps 1–2: G responses to each of the B prompts [B, P], each prompt prefilled once, and their
    scores → (prompt_ids, prompt_mask [R, P] in group order, rollout [R, N], scores [R]).
    ``sampler``: ``rollout.sample``, or episodes in turns with tools (``tools.sample_turns``)."""
    c = recipe.config
    rollout = sampler(nnx.merge(recipe.graphdef, params), prompt_ids, prompt_mask, c.sampling, rng,
                     eos_token_id=recipe.eos_token_id, pad_token_id=recipe.pad_token_id,
                     group_size=c.group_size)  # fmt: skip
    prompt_ids, prompt_mask = (
        jnp.repeat(x, c.group_size, axis=0) for x in (prompt_ids, prompt_mask)
    )
    scores = score_groups(reward_fn, prompt_ids, prompt_mask, rollout, c.group_size)
    return prompt_ids, prompt_mask, rollout, scores


def update(recipe: Recipe, train: TrainState, reference_state, groups, rng):
    """Steps 3–4: the advantages (and log π_old, log π_ref), then epochs × minibatches train steps
    on that fixed batch → (train state, metrics)."""
    c = recipe.config
    batch, metrics = make_group_batch(
        train.model_params(), reference_state, *groups, graphdef=recipe.graphdef,
        reference_graphdef=recipe.reference_graphdef, advantage=c.advantage,
        group_size=c.group_size, temperature=c.temperature, kl_coef=c.kl_coef, kl_in=c.kl_in,
        on_policy=c.on_policy, logits_chunk_size=c.logits_chunk_size,
    )  # fmt: skip
    indices = minibatch_indices(rng, epochs=c.epochs, rollouts=c.rollouts,
                                minibatch=c.rollouts // c.num_minibatches,
                                group_size=c.minibatch_group_size)  # fmt: skip
    train, train_metrics = run_steps(recipe.stepper, train, batch, indices)
    return train, {**metrics, **train_metrics}


@jax.jit
def iteration_keys(rng):
    """An iteration's keys from the state's: (next state key, shuffle key, (4 sampling keys: the
    first draw and up to 3 refills)), split in one dispatch."""
    rng, shuffle, *draws = jax.random.split(rng, 6)
    return rng, shuffle, tuple(draws)


@struct.dataclass
class GRPOState:
    """What a GRPO run changes (a pytree; what a checkpoint stores)."""

    train: TrainState
    rng: jax.Array  # uint32 [2]
    iteration: jax.Array  # int32 []


@functools.partial(jax.jit, static_argnames="recipe", donate_argnames="state")
def iterate(recipe: Recipe, state: GRPOState, reference_state, reward_fn, prompt_ids, prompt_mask):
    """Steps 1–4 as one XLA program (a reward model as reward_fn): one dispatch per iteration.
    Returns (the next GRPOState, metrics)."""
    rng, shuffle_rng, draw_rngs = iteration_keys(state.rng)
    params = state.train.model_params()
    groups = draw_groups(recipe, params, prompt_ids, prompt_mask, draw_rngs[0], reward_fn)
    train, metrics = update(recipe, state.train, reference_state, groups, shuffle_rng)
    return GRPOState(train=train, rng=rng, iteration=state.iteration + 1), metrics


# ============================================================================ the trainer


class GRPOTrainer:
    """The frozen reference, the reward function, the prompts and the settings; ``state`` is what
    each iteration changes.

        trainer = GRPOTrainer.from_sft(config, sft, prompt_ids, prompt_mask, reward_fn=fn,
                                       eos_token_id=eos, pad_token_id=pad)
        trainer.train()
    """

    def __init__(self, config: GRPOConfig, actor: CausalLM, reference: CausalLM | None, reward_fn,
                 prompt_ids, prompt_mask, *, eos_token_id=None, pad_token_id=0,
                 sampler=sample):  # fmt: skip
        self.config, self.reward_fn, self.sampler = config, reward_fn, sampler
        self.prompt_ids, self.prompt_mask = np.asarray(prompt_ids), np.asarray(prompt_mask)
        # a batch the prompts fill, a warm-up the run holds (optim.fit_rollout_batch notes a cut)
        self.config = config = fit_rollout_batch(
            config, len(self.prompt_ids), what="GRPO", group_size=config.group_size
        )
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id
        self.graphdef, params, frozen = split_trainable(actor)
        self.reference_graphdef, self.reference_state = reference_parts(actor, reference)
        if config.kl_coef == 0:  # no KL: the reference is never run (nor handed to the programs)
            self.reference_state = None
        self.loss = GroupLoss(
            graphdef=self.graphdef, clip_eps=config.clip_eps, clip_eps_high=config.clip_eps_high,
            importance_level=config.importance_level, aggregation=config.loss_aggregation,
            kl_coef=config.kl_coef if config.kl_in == "loss" else 0.0,
            with_reference=config.kl_coef > 0,
            temperature=config.temperature, tis_cap=config.tis_cap,
            group_size=loss_group_size(config),
            on_policy=config.on_policy, logits_chunk_size=config.logits_chunk_size,
        )  # fmt: skip
        self.stepper = config.train_step(self.loss, config.optimizer, params, frozen)
        self.recipe = Recipe(config, self.graphdef, self.reference_graphdef, self.stepper,
                             eos_token_id, pad_token_id)  # fmt: skip
        # One program per iteration when every step can be traced: a reward model (not Python
        # rules), no refilling loop (dynamic sampling), a train step that runs inside jit (not pmap).
        self.one_program = (
            isinstance(reward_fn, RewardModelFn) and not config.dynamic_sampling
            and self.stepper.in_jit and sampler is sample
        )  # fmt: skip
        self.state = GRPOState(
            train=init_train_state(params, config.optimizer, frozen),
            rng=jax.random.PRNGKey(config.seed),
            iteration=jnp.zeros((), jnp.int32),
        )

    @classmethod
    def from_sft(cls, config: GRPOConfig, sft: CausalLM, prompt_ids, prompt_mask, *,
                 reward_fn, eos_token_id=None, pad_token_id=0, sampler=sample) -> GRPOTrainer:  # fmt: skip
        """The actor is a copy of ``sft`` (in float32 with the config's compute dtype / remat); the
        reference is ``sft`` itself (used only when kl_coef > 0)."""
        return cls(config, config.trainable(sft), config.reference(sft), reward_fn, prompt_ids,
                   prompt_mask, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                   sampler=sampler)  # fmt: skip

    # -- one iteration: the recipe -----------------------------------------------------------------

    def iteration(self, state: GRPOState) -> tuple[GRPOState, dict[str, float]]:
        c, start = self.config, time.perf_counter()
        iteration = int(state.iteration)
        idx = prompt_batch_indices(len(self.prompt_ids), c.batch_size, iteration, c.seed)
        prompt_ids, prompt_mask = self.prompt_ids[idx], self.prompt_mask[idx]  # [B, P]
        if self.one_program:  # 1–4 in one jitted program
            new_state, metrics = iterate(self.recipe, state, self.reference_state, self.reward_fn,
                                         prompt_ids, prompt_mask)  # fmt: skip
            dropped = 0
        else:
            rng, shuffle_rng, draw_rngs = iteration_keys(state.rng)
            # 1–2. sample G responses per prompt and score them (DAPO: refill groups without signal)
            params = state.train.model_params()
            groups, dropped = self._sample_groups(params, idx, iteration, draw_rngs)
            # 3–4. the group is the baseline: advantages; then epochs × minibatches train steps
            train, metrics = update(self.recipe, state.train, self.reference_state, groups,
                                    shuffle_rng)  # fmt: skip
            new_state = GRPOState(
                train=train, rng=rng, iteration=jnp.asarray(iteration + 1, jnp.int32)
            )
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        metrics["groups_resampled"] = float(dropped)
        metrics["time/iteration_s"] = time.perf_counter() - start
        return new_state, metrics

    def _sample_groups(self, params, idx, iteration: int, rngs):
        """G samples of each of this iteration's prompts, scored; with dynamic sampling, groups
        whose rewards are all equal are replaced by groups of fresh prompts (up to 3 more draws).
        Returns ((prompt_ids, prompt_mask, rollout, scores) [B·G, …], number of groups replaced)."""
        c = self.config
        kept, replaced = None, 0
        for attempt, rng in enumerate(rngs):
            if attempt:  # the next prompts in a fixed, seeded order
                idx = np.random.default_rng([c.seed, iteration, attempt]).choice(
                    len(self.prompt_ids), c.batch_size, replace=False
                )
            groups = draw_groups(self.recipe, params, self.prompt_ids[idx], self.prompt_mask[idx],
                                 rng, self.reward_fn, self.sampler)  # fmt: skip
            if not c.dynamic_sampling:
                return groups, 0
            kept, filled = _merge_groups(kept, groups, c.group_size)
            replaced += filled if attempt else 0
            if not bool(jnp.any(zero_std_groups(kept[3], c.group_size))):
                break
        return kept, replaced

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
        return nnx.merge(self.graphdef, self.state.train.model_params())


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
