"""GRPOConfig: every setting of a critic-free run (GRPO, Dr. GRPO, DAPO, GSPO, RLOO, REINFORCE++),
validated at construction (errors name the field); the CLI's ``--grpo-*`` flags."""

from __future__ import annotations

import dataclasses

from jaxrlhf.config import option, require
from jaxrlhf.rl.losses import AGGREGATIONS
from jaxrlhf.rollout import SamplingConfig
from jaxrlhf.train.loop import LoopConfig
from jaxrlhf.train.optim import OptimizerConfig, check_scheduled_adamw, scheduled_adamw

ADVANTAGES = ("grpo", "dr_grpo", "rloo", "reinforce_pp")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPOConfig(LoopConfig):
    """Group-relative policy optimisation and its relatives (no critic)."""

    num_iterations: int = option(
        100,
        "Iterations (one group rollout batch + its update each; trl counts epochs of the prompts, "
        "3 by default: about epochs × prompts / batch_size iterations).",
    )
    batch_size: int = option(
        16,
        "Prompts per iteration, each sampled group_size times (trl counts completions: its default "
        "8 per device is one prompt per step); more than the prompts: the largest batch they fill "
        "whose batch_size·group_size num_minibatches divides.",
    )
    group_size: int = option(
        8,
        "Samples G per prompt: the group whose rewards are the baseline (trl's num_generations).",
    )
    num_minibatches: int = option(1, "Minibatches per epoch (must divide batch_size·group_size).")
    epochs: int = option(
        1,
        "Passes over each rollout batch (μ; trl's num_iterations default); 1 keeps the update "
        "on-policy.",
    )
    max_new_tokens: int = option(32, "Response length N.")
    temperature: float = option(1.0, "Sampling temperature τ, also applied to every log-prob.")
    advantage: str = option(
        "grpo",
        "grpo: (r − mean_g)/std_g | dr_grpo: r − mean_g | rloo: r − mean of the others | "
        "reinforce_pp: per-token rewards with the KL, reward-to-go, whitened over the batch.",
    )
    loss_aggregation: str = option(
        "token_mean",
        "token_mean | seq_mean_token_mean (GRPO's paper) | seq_mean_token_sum | "
        "seq_mean_token_sum_norm (Dr. GRPO: Σ/(B·T), no length bias).",
    )
    clip_eps: float = option(
        0.2, "Ratio clip ε (lower side, and upper unless clip_eps_high; trl's epsilon default)."
    )
    clip_eps_high: float | None = option(None, "DAPO's clip-higher: upper clip 1 + ε_high.")
    importance_level: str = option(
        "token", "token (PPO/GRPO) | sequence (GSPO: one length-normalised ratio per response)."
    )
    kl_coef: float = option(
        0.0, "β of the KL to the reference (0: no reference pass at all; trl's beta default)."
    )
    kl_in: str = option("loss", "Where the KL goes: loss (GRPO's k3 term) | reward (per token).")
    tis_cap: float | None = option(
        None, "Truncated importance sampling: weight min(π_train/π_rollout, C) (None: off)."
    )
    dynamic_sampling: bool = option(
        False, "Drop groups whose rewards are all equal and resample (DAPO); up to 4 tries."
    )
    learning_rate: float = option(1e-6, "Peak AdamW learning rate (trl's default).")
    lr_schedule: str = option(
        "linear",
        "constant | linear (trl's default) | cosine; constant lets a resumed run change "
        "num_iterations.",
    )
    warmup_steps: int = option(
        0, "Linear warm-up optimiser steps (trl's default); at most the run's steps − 1."
    )
    max_grad_norm: float | None = option(
        1.0, "Global-norm gradient clipping (None: off; trl's default 1.0)."
    )
    weight_decay: float = option(0.0, "AdamW weight decay (trl's default).")
    adam_eps: float = option(1e-8, "Adam ε (trl's default).")
    seed: int = option(0, "Seed of rollouts, prompt order and minibatch shuffles.")

    def __post_init__(self):
        super().__post_init__()
        for name in ("num_iterations", "batch_size", "num_minibatches", "epochs", "max_new_tokens"):
            require(getattr(self, name) >= 1, self, name, "must be ≥ 1")
        require(self.group_size >= 2, self, "group_size", "must be ≥ 2 (the group is the baseline)")
        require(
            self.rollouts % self.num_minibatches == 0,
            self,
            "num_minibatches",
            f"must divide batch_size·group_size = {self.rollouts}",
        )
        require(self.temperature > 0, self, "temperature", "must be > 0")
        require(self.advantage in ADVANTAGES, self, "advantage", f"must be one of {ADVANTAGES}")
        require(
            self.loss_aggregation in AGGREGATIONS,
            self,
            "loss_aggregation",
            f"must be one of {AGGREGATIONS}",
        )
        require(0 < self.clip_eps < 1, self, "clip_eps", "must be in (0, 1)")
        require(
            self.clip_eps_high is None or self.clip_eps_high > 0,
            self,
            "clip_eps_high",
            "must be > 0 or None",
        )
        require(
            self.importance_level in ("token", "sequence"),
            self,
            "importance_level",
            "must be token or sequence",
        )
        require(self.kl_coef >= 0, self, "kl_coef", "must be ≥ 0")
        require(self.kl_in in ("loss", "reward"), self, "kl_in", "must be loss or reward")
        require(self.tis_cap is None or self.tis_cap > 0, self, "tis_cap", "must be > 0 or None")
        check_scheduled_adamw(self)

    @property
    def rollouts(self) -> int:
        """Responses per iteration: batch_size · group_size."""
        return self.batch_size * self.group_size

    @property
    def minibatch_group_size(self) -> int:
        """group_size when num_minibatches divides batch_size: minibatches are then drawn as whole
        groups (G consecutive rows), so the loss runs each prompt once for its G responses
        (``models.heads.response_hidden``); else 1: rows are drawn one by one."""
        return self.group_size if self.batch_size % self.num_minibatches == 0 else 1

    @property
    def on_policy(self) -> bool:
        """One optimiser step per batch (epochs = num_minibatches = 1) and no KL in the reward: at
        that step π_old = π_θ, so the loss takes log π_old from its own forward pass (no gradient)
        instead of a separate forward pass before the update (as trl does for num_iterations = 1)."""
        needs_old = self.kl_coef > 0 and self.kl_in == "reward"  # the KL penalty shapes the rewards
        return self.epochs == 1 and self.num_minibatches == 1 and not needs_old

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature)

    @property
    def optimizer(self) -> OptimizerConfig:
        return scheduled_adamw(self, self.num_iterations * self.epochs * self.num_minibatches)
