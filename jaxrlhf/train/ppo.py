"""PPO for RLHF, as its recipe. One iteration (:meth:`PPOTrainer.iteration`), top to bottom:

    1. sample     prompts [B, P] ──rollout.sample(actor)──▶ Rollout(tokens, mask, logprobs) [B, N]
    2. score      reward_fn(prompts, rollout) ──▶ scores [B]   (− missing-EOS penalty)
    3. advantages experience.score_rollout: actor/critic and reference on prompt ⧺ response,
                  rl.kl_penalized_rewards, rl.gae, rl.masked_whiten ──▶ Experience
    4. update     ppo_epochs × minibatches of state.train_step(PPOLoss) ──▶ new parameters
    5. β          rl.adaptive_kl_update (when adaptive)

The sampling temperature τ is applied everywhere a log-probability is taken: π(a|s) =
softmax(logits / τ), in the rollout, for the reference and in the loss (as trl does), so the ratio and
the KL compare the distribution that actually sampled the tokens. top-k / top-p are refused
(``PPOConfig``): they would sample from another distribution than the one PPO differentiates.

By default log π_old is *recomputed* with a full forward pass of the actor (not taken from the
KV-cached decode): the same forward as the train step, so the first ratio of every update is exactly
1. ``recompute_logprobs=False`` reuses the sampler's log-probs (as trl does).

Pieces: :mod:`~jaxrlhf.train.ppo_config` (the settings), :mod:`~jaxrlhf.train.experience` (step 3),
:mod:`~jaxrlhf.train.ppo_loss` (the minibatch loss), :mod:`~jaxrlhf.train.state` (the train step on
one device, pmap or shard_map). Compiled programs are ``jax.jit``'s own cache, keyed by the model
structures and settings passed as static arguments.
"""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from jaxrlhf import rl
from jaxrlhf.models import ActorCritic, CausalLM, RewardModel, ValueModel
from jaxrlhf.models.lora import reference_parts, split_trainable
from jaxrlhf.models.sharding import param_shardings
from jaxrlhf.rollout import sample
from jaxrlhf.train.checkpoint import save_checkpoint
from jaxrlhf.train.experience import missing_eos_penalty, reward_model_fn, score_rollout
from jaxrlhf.train.loop import restore_run, run_iterations
from jaxrlhf.train.optim import fit_rollout_batch
from jaxrlhf.train.ppo_config import PPOConfig, resume_may_change
from jaxrlhf.train.ppo_loss import PPOLoss
from jaxrlhf.train.state import TrainState, init_train_state, put_batch, run_steps


@struct.dataclass
class PPOState:
    """Everything that evolves during training (a pytree; what a checkpoint stores)."""

    train: TrainState  # params, opt_state, step
    rng: jax.Array  # uint32 [2] raw PRNG key for rollouts and shuffles
    iteration: jax.Array  # int32 [] PPO iterations completed
    kl: rl.AdaptiveKLState  # kl_coef: float32 [] β (constant unless adaptive_kl)


# ============================================================================ the models


class PolicyWithCritic(nnx.Module):
    """An actor and a separate critic behind the ActorCritic interface: → (logits, values)."""

    def __init__(self, lm: CausalLM, critic: ValueModel):
        self.lm = lm
        self.critic = critic

    def hidden_and_values(self, input_ids, attention_mask):
        """(the actor's hidden states [B, T, D], the critic's values [B, T])."""
        return self.lm.hidden(input_ids, attention_mask), self.critic(input_ids, attention_mask)

    def __call__(self, input_ids, attention_mask):
        hidden, values = self.hidden_and_values(input_ids, attention_mask)
        return self.lm.logits_from_hidden(hidden), values


def ppo_loss(config: PPOConfig, graphdef) -> PPOLoss:
    """The minibatch loss PPOTrainer trains ``graphdef``'s policy with under ``config`` (also what
    ``benchmarks/bench_memory.py`` compiles)."""
    return PPOLoss(
        graphdef=graphdef,
        clip_eps=config.clip_eps,
        value_clip_eps=config.value_clip_eps,
        vf_coef=config.vf_coef,
        ent_coef=config.ent_coef,
        temperature=config.temperature,
        aggregation=config.loss_aggregation,
        logits_chunk_size=config.logits_chunk_size,
    )


def init_policy(
    sft: CausalLM,
    *,
    separate_critic: bool = False,
    critic_init: nnx.Module | None = None,
    rngs: nnx.Rngs,
) -> nnx.Module:
    """The trainable policy: a copy of the SFT model plus a critic.

    Shared trunk (default): ActorCritic whose ``lm`` is a copy of ``sft`` and whose value head is
    zero, so V = 0 before the first update (a fresh random head starts from arbitrary values).
    Separate critic: a ValueModel whose trunk is copied from ``critic_init`` or from ``sft``; from
    a RewardModel it also takes the score head as its value head (trl; the N+ recipe), otherwise
    the value head is zero.
    """
    if not separate_critic:
        if critic_init is not None:
            raise ValueError(
                "critic_init needs separate_critic=True (a shared trunk is the actor's)"
            )
        policy = ActorCritic(sft.config, rngs=rngs)
        policy.lm = nnx.clone(sft)
        _zero_head(policy.value_head)
        return policy
    source = sft if critic_init is None else critic_init
    critic = ValueModel(source.config, rngs=rngs)
    critic.model = nnx.clone(source.model)
    if isinstance(source, RewardModel):
        critic.value_head = nnx.clone(source.score)
    else:
        _zero_head(critic.value_head)
    return PolicyWithCritic(nnx.clone(sft), critic)


def _zero_head(head: nnx.Linear) -> None:
    head.kernel[...] = jnp.zeros_like(head.kernel[...])
    head.bias[...] = jnp.zeros_like(head.bias[...])


def generation_model(policy: nnx.Module) -> CausalLM:
    """The CausalLM inside a policy (ActorCritic.lm or PolicyWithCritic.lm)."""
    return policy.lm if hasattr(policy, "lm") else policy


# ============================================================================ randomness, prompts


@functools.partial(jax.jit, static_argnames=("epochs", "batch_size"))
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


_eos_penalty = jax.jit(missing_eos_penalty, static_argnames=("eos_token_id", "penalty"))
_kl_update = jax.jit(rl.adaptive_kl_update, static_argnames=("n_steps", "target", "horizon"))


# ============================================================================ the trainer


class PPOTrainer:
    """Holds what a PPO run needs besides its state: the frozen reference, the reward function, the
    prompts and the settings; the state (:class:`PPOState`) is what each iteration changes.

        trainer = PPOTrainer.from_sft(config, sft, prompt_ids, prompt_mask,
                                      reward_model=rm, eos_token_id=eos, pad_token_id=pad)
        history = trainer.train(callback=lambda it, metrics: logger.log(it, metrics))

    ``reward_fn(prompt_ids, prompt_mask, rollout) -> [B]`` is :func:`reward_model_fn` of a
    RewardModel or any function of the tokens. ``prompt_ids`` / ``prompt_mask`` [num_prompts, P]
    are the whole (left-padded) prompt set; each iteration takes ``batch_size`` of them.
    """

    def __init__(
        self,
        config: PPOConfig,
        policy: nnx.Module,
        reference: CausalLM | None,
        reward_fn: Callable,
        prompt_ids,
        prompt_mask,
        *,
        eos_token_id: int | None = None,
        pad_token_id: int = 0,
        sampler: Callable = sample,
    ):
        if config.separate_critic != isinstance(policy, PolicyWithCritic):
            raise ValueError(
                f"PPOConfig.separate_critic = {config.separate_critic} but the policy is a "
                f"{type(policy).__name__} (use PPOTrainer.from_sft to build it from the config)"
            )
        self.config, self.reward_fn, self.sampler = (
            config,
            reward_fn,
            sampler,
        )  # (tools.sample_turns)
        self.prompt_ids, self.prompt_mask = _check_prompts(prompt_ids, prompt_mask, config)
        # a batch the prompts fill, a warm-up the run holds (optim.fit_rollout_batch notes a cut)
        self.config = config = fit_rollout_batch(config, len(self.prompt_ids), what="PPO")
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id
        self.eos_penalty = config.missing_eos_penalty
        if self.eos_penalty is not None and eos_token_id is None:
            warnings.warn(
                "no EOS token: PPOConfig.missing_eos_penalty is not applied", stacklevel=2
            )
            self.eos_penalty = None
        self.graphdef, params, frozen = split_trainable(policy)
        self.actor_graphdef = nnx.graphdef(generation_model(policy))
        self.reference_graphdef, self.reference_state = reference_parts(
            generation_model(policy), reference
        )  # LoRA (reference None): the actor's adapters-off graph over the policy's parameters
        self.loss = ppo_loss(config, self.graphdef)
        self.stepper = config.train_step(self.loss, config.optimizer, params, frozen)
        if config.minibatch_size % self.stepper.num_devices:
            raise ValueError(
                f"PPOConfig.num_minibatches = {config.num_minibatches}: the minibatch size "
                f"{config.minibatch_size} must be divisible by {self.stepper.num_devices} devices"
            )
        self.mesh = self.stepper.mesh if config.parallelism == "mesh" else None
        if self.mesh is not None and self.reference_state is not None:  # sharded like the policy
            self.reference_state = jax.device_put(
                self.reference_state, param_shardings(self.reference_state, self.mesh)
            )
        self.state = self._placed(
            PPOState(
                train=init_train_state(params, config.optimizer, frozen),
                rng=jax.random.PRNGKey(config.seed),
                iteration=jnp.zeros((), jnp.int32),
                kl=rl.AdaptiveKLState(kl_coef=jnp.asarray(config.kl_coef, jnp.float32)),
            )
        )

    @classmethod
    def from_sft(
        cls,
        config: PPOConfig,
        sft: CausalLM,
        prompt_ids,
        prompt_mask,
        *,
        reward_model: RewardModel | None = None,
        reward_fn: Callable | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int = 0,
        sampler: Callable = sample,
    ) -> PPOTrainer:
        """The run ``config`` describes, starting from an SFT model: the policy is a copy of
        ``sft`` plus a critic (``separate_critic``, ``critic_init``), the reference is ``sft``
        itself (frozen), the reward is ``reward_fn`` or the reward model's score."""
        if (reward_model is None) == (reward_fn is None):
            raise ValueError("give exactly one of reward_model and reward_fn")
        if config.critic_init == "reward_model" and reward_model is None:
            raise ValueError("PPOConfig.critic_init = 'reward_model' needs a reward_model")
        critic_source = reward_model if config.critic_init == "reward_model" else None
        policy = init_policy(
            config.trainable(sft),
            separate_critic=config.separate_critic,
            critic_init=critic_source and config.trainable(critic_source),
            rngs=nnx.Rngs(config.seed),
        )
        if reward_fn is None:
            reward_model = config.frozen(reward_model, param_dtype=config.frozen_dtype)
            reward_fn = reward_model_fn(reward_model, mesh=config.device_mesh())
        return cls(
            config,
            policy,
            config.reference(sft, param_dtype=config.frozen_dtype),  # LoRA: None (adapters off)
            reward_fn,
            prompt_ids,
            prompt_mask,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            sampler=sampler,
        )

    # -- one iteration: the recipe ---------------------------------------------------------------

    def iteration(self, state: PPOState) -> tuple[PPOState, dict[str, float]]:
        """One PPO iteration from ``state`` → (new state, metrics). ``state.train`` is donated."""
        c, start = self.config, time.perf_counter()
        rng, rollout_rng, perms = split_rng(state.rng, epochs=c.ppo_epochs, batch_size=c.batch_size)
        prompt_ids, prompt_mask = self.prompt_batch(int(state.iteration))  # [B, P] each
        params = state.train.model_params()

        # 1. sample responses from the current actor
        actor = nnx.merge(self.actor_graphdef, params["lm"])
        rollout = self.sampler(
            actor, prompt_ids, prompt_mask, c.sampling, rollout_rng,
            eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
        )  # fmt: skip
        # 2. score them
        scores = jnp.asarray(self.reward_fn(prompt_ids, prompt_mask, rollout), jnp.float32)  # [B]
        if self.eos_penalty is not None:
            scores = _eos_penalty(
                scores, rollout.tokens, rollout.mask,
                eos_token_id=self.eos_token_id, penalty=self.eos_penalty,
            )  # fmt: skip
        # 3. log-probs, reference, values → KL-penalised rewards → GAE advantages
        exp, rollout_metrics = score_rollout(
            params, self.reference_state, prompt_ids, prompt_mask, rollout, scores,
            state.kl.kl_coef,
            policy_graphdef=self.graphdef, reference_graphdef=self.reference_graphdef,
            kl_estimator=c.kl_estimator, gamma=c.gamma, lam=c.lam, temperature=c.temperature,
            whiten_rewards=c.whiten_rewards, use_sampler_logprobs=not c.recompute_logprobs,
            eos_token_id=self.eos_token_id, logits_chunk_size=c.logits_chunk_size,
        )  # fmt: skip
        # 4. ppo_epochs × num_minibatches train steps on that fixed Experience
        minibatches = perms.reshape(-1, c.minibatch_size)  # [E · M, b]
        train, train_metrics = run_steps(self.stepper, state.train, exp, minibatches)
        # 5. adapt β towards the KL target
        kl = state.kl
        if c.adaptive_kl:
            kl = _kl_update(
                kl, rollout_metrics["objective/kl"],
                n_steps=c.batch_size, target=c.kl_target, horizon=c.kl_horizon,
            )  # fmt: skip
        new_state = PPOState(train=train, rng=rng, iteration=state.iteration + 1, kl=kl)
        return new_state, self._metrics(state, rollout_metrics, train_metrics, start)

    def prompt_batch(self, iteration: int) -> tuple[jax.Array, jax.Array]:
        """The prompts of iteration ``iteration`` (ids and mask [B, P])."""
        c = self.config
        idx = prompt_batch_indices(len(self.prompt_ids), c.batch_size, iteration, c.seed)
        batch = (self.prompt_ids[idx], self.prompt_mask[idx])
        if self.mesh is not None:
            return put_batch(batch, self.mesh)
        return jnp.asarray(batch[0]), jnp.asarray(batch[1])

    def _placed(self, state: PPOState) -> PPOState:
        """``state`` with its train state laid out for the train step (sharded on a mesh)."""
        if self.mesh is None:
            return state
        return state.replace(train=self.stepper.put_state(state.train))

    def _metrics(self, state, rollout_metrics, train_metrics, start) -> dict[str, float]:
        c = self.config
        metrics = jax.device_get({**rollout_metrics, **train_metrics})
        metrics = {k: float(v) for k, v in metrics.items()}
        done = int(state.iteration) + 1
        metrics["lr"] = float(
            c.optimizer.schedule_fn()(done * c.ppo_epochs * c.num_minibatches - 1)
        )
        metrics["episode"] = float(done * c.batch_size)
        metrics["time/iteration_s"] = time.perf_counter() - start
        return metrics

    # -- the loop ---------------------------------------------------------------------------------

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
        return run_iterations(
            self, num_iterations, desc="ppo", callback=callback, progress=progress,
            postfix=lambda m: {
                "score": f"{m['objective/scores']:.3f}", "kl": f"{m['objective/kl']:.3f}"
            },
        )  # fmt: skip

    # -- checkpoints and the trained model --------------------------------------------------------

    def save(self, directory: str) -> None:
        """Write an orbax checkpoint of the PPOState (+ config) as ``directory/<iteration>``."""
        save_checkpoint(
            directory,
            int(self.state.iteration),
            self.state,
            config=self.config,
            keep=self.config.keep_checkpoints,
        )

    def restore(self, directory: str) -> int:
        """Load the latest checkpoint into ``self.state``; returns its iteration.

        Refuses a checkpoint saved with settings that change the run (batch size, seed, any
        hyperparameter; devices and checkpointing may change), naming the fields.
        """
        state = restore_run(
            directory, self.state, self.config, may_change=resume_may_change(self.config)
        )
        self.state = self._placed(state)
        return int(self.state.iteration)

    def policy(self) -> nnx.Module:
        """The current policy as an NNX module (ActorCritic or PolicyWithCritic)."""
        return nnx.merge(self.graphdef, self.state.train.model_params())

    def actor(self) -> CausalLM:
        """The current actor (the CausalLM inside the policy), e.g. for save_pretrained."""
        return generation_model(self.policy())


def _check_prompts(prompt_ids, prompt_mask, config: PPOConfig):
    prompt_ids, prompt_mask = np.asarray(prompt_ids), np.asarray(prompt_mask)
    if prompt_ids.ndim != 2 or prompt_ids.shape != prompt_mask.shape:
        raise ValueError(
            f"prompt_ids {prompt_ids.shape} and prompt_mask {prompt_mask.shape} must be [N, P]"
        )
    return prompt_ids, prompt_mask
