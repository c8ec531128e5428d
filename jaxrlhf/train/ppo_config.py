"""PPOConfig: every setting of a PPO run, validated at construction (errors name the field).

The CLI generates ``jaxrlhf ppo --ppo-<field>`` flags from these fields, with their help texts.
"""

from __future__ import annotations

import dataclasses

from jaxrlhf.config import option, require
from jaxrlhf.rl.losses import AGGREGATIONS
from jaxrlhf.rollout import SamplingConfig
from jaxrlhf.train.loop import LoopConfig
from jaxrlhf.train.optim import OptimizerConfig, check_scheduled_adamw, scheduled_adamw

KL_ESTIMATORS = ("k1", "k3")
CRITIC_INITS = ("sft", "reward_model")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPOConfig(LoopConfig):
    """PPO for RLHF: rollouts, rewards, the clipped update, the KL penalty, devices, checkpoints."""

    num_iterations: int = option(
        100,
        "PPO iterations (one rollout batch + its update each; trl counts episodes, by default 3 "
        "epochs of the prompts: about epochs × prompts / batch_size iterations).",
    )
    batch_size: int = option(
        8,
        "Prompts, hence rollouts, per iteration (trl's default on one device: "
        "per_device_train_batch_size 8 × num_mini_batches 1); more than the prompts: the largest "
        "batch they fill that num_minibatches and the devices divide.",
    )
    num_minibatches: int = option(
        1, "Minibatches per PPO epoch (must divide batch_size; trl's default)."
    )
    ppo_epochs: int = option(4, "Passes over each rollout batch (trl's default).")
    max_new_tokens: int = option(32, "Response length N (tokens generated per prompt).")
    temperature: float = option(1.0, "Sampling temperature τ, also applied to every log-prob.")
    top_k: int | None = option(
        None, "Must stay None: top-k sampling would make PPO off-policy (see __post_init__)."
    )
    top_p: float | None = option(
        None, "Must stay None: nucleus sampling would make PPO off-policy (see __post_init__)."
    )
    learning_rate: float = option(3e-6, "Peak Adam learning rate (trl's default).")
    lr_schedule: str = option(
        "linear", "Learning-rate schedule: constant | linear (trl's default) | cosine."
    )
    warmup_steps: int = option(
        0, "Linear warm-up optimiser steps (trl's default); at most the run's steps − 1."
    )
    max_grad_norm: float | None = option(
        1.0, "Global-norm gradient clipping (None: off; trl's default 1.0)."
    )
    weight_decay: float = option(0.0, "AdamW weight decay (trl's default).")
    adam_eps: float = option(
        1e-5, "Adam ε (PPO's usual 1e-5, Huang et al. 2022's N+ details; trl inherits 1e-8)."
    )
    clip_eps: float = option(0.2, "PPO ratio clip ε (trl's cliprange default).")
    value_clip_eps: float | None = option(
        0.2, "Value clip ε around rollout values (None: off; trl's cliprange_value default)."
    )
    vf_coef: float = option(
        0.1, "Value-loss coefficient c₁ (our value loss has no ½: trl's vf_coef is twice ours)."
    )
    ent_coef: float = option(0.0, "Entropy-bonus coefficient c₂.")
    gamma: float = option(1.0, "Discount γ (trl's default).")
    lam: float = option(0.95, "GAE λ (trl's default).")
    kl_coef: float = option(
        0.05, "KL penalty coefficient β (initial value when adaptive; trl's default)."
    )
    kl_estimator: str = option(
        "k1", "Per-token KL estimator in the reward: k1 (trl's default) | k3."
    )
    adaptive_kl: bool = option(False, "Adapt β towards kl_target (Ziegler et al. 2019).")
    kl_target: float = option(6.0, "Adaptive KL: target KL per sequence.")
    kl_horizon: float = option(10000.0, "Adaptive KL: horizon in samples.")
    whiten_rewards: bool = option(
        False, "Whiten the per-token rewards before GAE (trl's default: off)."
    )
    recompute_logprobs: bool = option(
        True,
        "Recompute log π_old by a full forward (first ratio exactly 1); False reuses the "
        "sampler's (as trl does; saves an actor forward with a separate critic).",
    )
    missing_eos_penalty: float | None = option(
        1.0,
        "Subtracted from the score of a response that never emits EOS (the reward model only saw "
        "EOS-terminated text); None: off. Needs a tokenizer with an EOS token.",
    )
    loss_aggregation: str = option(
        "token_mean",
        "Policy-loss reduction: token_mean | seq_mean_token_mean | seq_mean_token_sum.",
    )
    separate_critic: bool = option(
        False, "Separate ValueModel instead of a value head on the actor."
    )
    frozen_dtype: str = option(
        "float32",
        "Parameter dtype of the frozen reference and reward model: float32 | bfloat16 (half the "
        "memory; their log-probs and scores are still computed in float32 at the output).",
    )
    critic_init: str = option(
        "sft",
        "Critic start: sft (SFT trunk, zero value head) | reward_model (the reward model's trunk "
        "and head, as trl and the N+ recipe do; needs separate_critic).",
    )
    seed: int = option(0, "Seed of rollouts, prompt order and minibatch shuffles.")

    def __post_init__(self):
        super().__post_init__()
        self._check_loop()
        self._check_sampling()
        check_scheduled_adamw(self)
        self._check_objective()
        self._check_devices()

    def _check_loop(self):
        for name in ("num_iterations", "batch_size", "num_minibatches", "ppo_epochs"):
            require(getattr(self, name) >= 1, self, name, "must be ≥ 1")
        require(
            self.batch_size % self.num_minibatches == 0,
            self,
            "num_minibatches",
            f"must divide batch_size = {self.batch_size}",
        )

    def _check_sampling(self):
        require(self.max_new_tokens >= 1, self, "max_new_tokens", "must be ≥ 1")
        require(self.temperature > 0, self, "temperature", "must be > 0")
        why = (
            "must be None: PPO samples from the temperature-scaled policy only. With a filter the "
            "tokens would come from the filtered distribution while the ratio, the KL and the loss "
            "use the unfiltered π_θ, so the update would be silently off-policy"
        )
        require(self.top_k is None, self, "top_k", why)
        require(self.top_p is None, self, "top_p", why)

    def _check_objective(self):
        require(0 < self.clip_eps < 1, self, "clip_eps", "must be in (0, 1)")
        require(
            self.value_clip_eps is None or self.value_clip_eps > 0,
            self,
            "value_clip_eps",
            "must be > 0 or None",
        )
        for name in ("vf_coef", "ent_coef", "kl_coef"):
            require(getattr(self, name) >= 0, self, name, "must be ≥ 0")
        require(0 <= self.gamma <= 1, self, "gamma", "must be in [0, 1]")
        require(0 <= self.lam <= 1, self, "lam", "must be in [0, 1]")
        require(
            self.kl_estimator in KL_ESTIMATORS,
            self,
            "kl_estimator",
            f"must be one of {KL_ESTIMATORS}",
        )
        require(self.kl_target > 0, self, "kl_target", "must be > 0")
        require(self.kl_horizon > 0, self, "kl_horizon", "must be > 0")
        require(
            self.missing_eos_penalty is None or self.missing_eos_penalty >= 0,
            self,
            "missing_eos_penalty",
            "must be ≥ 0 or None",
        )
        require(
            self.loss_aggregation in AGGREGATIONS,
            self,
            "loss_aggregation",
            f"must be one of {AGGREGATIONS}",
        )
        require(
            self.critic_init in CRITIC_INITS, self, "critic_init", f"must be one of {CRITIC_INITS}"
        )
        require(
            self.frozen_dtype in ("float32", "bfloat16"),
            self,
            "frozen_dtype",
            "must be float32 or bfloat16",
        )
        require(
            self.critic_init != "reward_model" or self.separate_critic,
            self,
            "critic_init",
            "reward_model needs separate_critic = True (a shared trunk is the actor's)",
        )

    def _check_devices(self):
        if self.parallelism != "single" and self.num_devices is not None:
            require(
                self.minibatch_size % self.num_devices == 0,
                self,
                "num_devices",
                "must divide the minibatch size batch_size / num_minibatches",
            )

    @property
    def minibatch_size(self) -> int:
        return self.batch_size // self.num_minibatches

    @property
    def sampling(self) -> SamplingConfig:
        """How rollouts are sampled (``jaxrlhf.rollout.sample``)."""
        return SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature)

    @property
    def optimizer(self) -> OptimizerConfig:
        """AdamW with clipping and the learning-rate schedule over the whole run."""
        return scheduled_adamw(self, self.num_iterations * self.ppo_epochs * self.num_minibatches)


def resume_may_change(config: PPOConfig) -> tuple[str, ...]:
    """Fields besides the device/checkpoint settings that a resumed run may change: the number of
    iterations, under a constant learning rate (otherwise it sets the length of the decay)."""
    return ("num_iterations",) if config.lr_schedule == "constant" else ()
