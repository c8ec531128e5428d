"""The optimiser: Adam(W) with global-norm gradient clipping and a learning-rate schedule (optax)."""

from __future__ import annotations

import dataclasses

import optax

SCHEDULES = ("constant", "linear", "cosine")


def learning_rate_schedule(
    learning_rate: float, *, total_steps: int, schedule: str = "linear", warmup_steps: int = 0
) -> optax.Schedule:
    """η(t): linear warm-up from 0 over ``warmup_steps``, then constant, linear or cosine decay to 0.

    linear: η(t) = η₀ · (1 − (t − w) / (T − w));   cosine: η(t) = η₀ · ½(1 + cos(π (t − w) / (T − w)))
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r}: expected one of {SCHEDULES}")
    decay_steps = max(total_steps - warmup_steps, 1)
    if schedule == "constant":
        main = optax.constant_schedule(learning_rate)
    elif schedule == "linear":
        main = optax.linear_schedule(learning_rate, 0.0, decay_steps)
    else:
        main = optax.cosine_decay_schedule(learning_rate, decay_steps)
    if warmup_steps <= 0:
        return main
    warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    return optax.join_schedules([warmup, main], [warmup_steps])


def make_optimizer(
    *,
    learning_rate: float,
    total_steps: int,
    schedule: str = "linear",
    warmup_steps: int = 0,
    max_grad_norm: float | None = 1.0,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-5,
) -> optax.GradientTransformation:
    """clip_by_global_norm(max_grad_norm) → AdamW(η(t), β₁, β₂, ε, weight_decay).

    g ← g · min(1, c / ‖g‖₂) over all parameters together;  then the Adam(W) update.
    """
    lr = learning_rate_schedule(
        learning_rate, total_steps=total_steps, schedule=schedule, warmup_steps=warmup_steps
    )
    adam = optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    if max_grad_norm is None:
        return adam
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), adam)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """Everything :func:`make_optimizer` takes, as a hashable value.

    Train steps take it as a static argument and build the optax transformation inside the traced
    function, so two runs with equal settings share one compiled step (``jax.jit``'s own cache).
    """

    learning_rate: float
    total_steps: int
    schedule: str = "linear"
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    weight_decay: float = 0.0
    eps: float = 1e-5

    def build(self) -> optax.GradientTransformation:
        return make_optimizer(**dataclasses.asdict(self))

    def schedule_fn(self) -> optax.Schedule:
        """η(t) of this optimiser (for logging the learning rate)."""
        return learning_rate_schedule(
            self.learning_rate,
            total_steps=self.total_steps,
            schedule=self.schedule,
            warmup_steps=self.warmup_steps,
        )


def check_scheduled_adamw(config) -> None:
    """Validate the fields :func:`scheduled_adamw` reads (errors name the config's field)."""
    from jaxrlhf.config import require

    require(config.learning_rate > 0, config, "learning_rate", "must be > 0")
    require(config.lr_schedule in SCHEDULES, config, "lr_schedule", f"must be one of {SCHEDULES}")
    require(config.warmup_steps >= 0, config, "warmup_steps", "must be ≥ 0")
    clip = config.max_grad_norm
    require(clip is None or clip > 0, config, "max_grad_norm", "must be > 0 or None")
    require(config.weight_decay >= 0, config, "weight_decay", "must be ≥ 0")
    require(config.adam_eps > 0, config, "adam_eps", "must be > 0")


def scheduled_adamw(config, total_steps: int) -> OptimizerConfig:
    """The optimiser of an RL trainer config (PPOConfig, GRPOConfig): its ``learning_rate``,
    ``lr_schedule``, ``warmup_steps``, ``max_grad_norm`` (None: off), ``weight_decay`` and
    ``adam_eps``, over ``total_steps`` optimiser steps."""
    return OptimizerConfig(
        learning_rate=config.learning_rate,
        total_steps=total_steps,
        schedule=config.lr_schedule,
        warmup_steps=config.warmup_steps,
        max_grad_norm=config.max_grad_norm,
        weight_decay=config.weight_decay,
        eps=config.adam_eps,
    )


def cosine_adamw(config, total_steps: int) -> OptimizerConfig:
    """The optimiser of a supervised trainer config (SFT, reward model, DPO): AdamW with cosine
    decay over ``total_steps``, its ``learning_rate``, ``warmup_steps`` (cut to the run),
    ``weight_decay`` and ``max_grad_norm`` (0: no clipping)."""
    return OptimizerConfig(
        learning_rate=config.learning_rate,
        total_steps=total_steps,
        schedule="cosine",
        warmup_steps=min(config.warmup_steps, total_steps - 1),
        max_grad_norm=config.max_grad_norm if config.max_grad_norm > 0 else None,
        weight_decay=config.weight_decay,
    )
