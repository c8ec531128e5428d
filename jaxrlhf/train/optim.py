"""The optimiser: Adam(W) with global-norm gradient clipping and a learning-rate schedule (optax);
and the fitting of a run to its data that every trainer shares: a batch the data can fill
(:func:`fit_batch_size`) and a warm-up the run can hold (:func:`warmup_for_run`), each cut said in
one line."""

from __future__ import annotations

import dataclasses
import math

import jax
import optax

from jaxrlhf.logging import note

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
    ``lr_schedule``, ``warmup_steps`` (cut to the run: :func:`warmup_for_run`), ``max_grad_norm``
    (None: off), ``weight_decay`` and ``adam_eps``, over ``total_steps`` optimiser steps."""
    return OptimizerConfig(
        learning_rate=config.learning_rate,
        total_steps=total_steps,
        schedule=config.lr_schedule,
        warmup_steps=warmup_for_run(config.warmup_steps, total_steps),
        max_grad_norm=config.max_grad_norm,
        weight_decay=config.weight_decay,
        eps=config.adam_eps,
    )


def supervised_adamw(config, total_steps: int) -> OptimizerConfig:
    """The optimiser of a supervised trainer config (SFT, reward model, DPO): AdamW over
    ``total_steps`` with its ``learning_rate``, ``lr_schedule``, ``warmup_steps`` (cut to the run:
    :func:`warmup_for_run`), ``weight_decay`` and ``max_grad_norm`` (0: no clipping)."""
    return OptimizerConfig(
        learning_rate=config.learning_rate,
        total_steps=total_steps,
        schedule=config.lr_schedule,
        warmup_steps=warmup_for_run(config.warmup_steps, total_steps),
        max_grad_norm=config.max_grad_norm if config.max_grad_norm > 0 else None,
        weight_decay=config.weight_decay,
    )


# ----------------------------------------------------------------------------------------------
# Fitting a run to its data: the batch and the warm-up (every trainer goes through these)
# ----------------------------------------------------------------------------------------------


def warmup_for_run(warmup_steps: int, total_steps: int) -> int:
    """The warm-up a run of T = ``total_steps`` optimiser steps gets: w = min(warmup_steps, T − 1)
    (≥ 0), so that η reaches its peak by the last step, t = T − 1, however long a warm-up was asked
    for."""
    return max(0, min(warmup_steps, total_steps - 1))


def note_warmup(config, total_steps: int, *, what: str) -> int:
    """:func:`warmup_for_run` of ``config.warmup_steps``, saying so in one line when it is cut."""
    warmup = warmup_for_run(config.warmup_steps, total_steps)
    if warmup < config.warmup_steps:
        note(
            f"{what}: warmup_steps {config.warmup_steps} ≥ the run's {total_steps} steps: "
            f"warming up over {warmup}"
        )
    return warmup


def batch_divisor_of(config) -> int:
    """What the global batch of a ``LoopConfig`` must be a multiple of: the devices it is split
    over (1 on one device; data × fsdp on a mesh)."""
    if config.parallelism == "single":
        return 1
    if config.parallelism == "pmap":
        return config.num_devices or jax.local_device_count()
    if config.parallelism == "shard_map":
        return config.num_devices or jax.device_count()
    from jaxrlhf.models.sharding import batch_divisor

    return batch_divisor(config.device_mesh())


def fit_batch_size(config, available: int, *, what: str, unit: str, multiple_of: int = 1,
                   field: str = "batch_size", needs: str = ""):  # fmt: skip
    """``config`` with a ``batch_size`` the data can fill (a frozen config: a new one by
    ``dataclasses.replace``, validated again).

    batch_size ≤ available: ``config`` itself. Otherwise the largest multiple of ``multiple_of``
    (what minibatches and devices need) that is ≤ ``available``, said in one line; when there is
    none, a ValueError naming ``field`` (``needs``: why the multiple). ``what`` names the trainer
    and ``unit`` the rows ("training sequences", "prompts") in the messages.
    """
    requested = config.batch_size
    if requested <= available:
        return config
    size = available // multiple_of * multiple_of
    if size < 1:
        raise ValueError(
            f"{type(config).__name__}.{field} = {getattr(config, field)}: the {available} {unit} "
            f"cannot fill one batch" + (f" ({needs})" if needs else "")
        )
    note(f"{what}: batch_size {requested} > the {available} {unit}: training on batches of {size}")
    return dataclasses.replace(config, batch_size=size)


def fit_supervised_batch(config, available: int, *, what: str, unit: str):
    """:func:`fit_batch_size` for SFT, the reward model and DPO: a multiple of the devices."""
    devices = batch_divisor_of(config)
    if devices == 1:
        return fit_batch_size(config, available, what=what, unit=unit)
    return fit_batch_size(
        config, available, what=what, unit=unit, multiple_of=devices,
        field="mesh" if config.parallelism == "mesh" else "num_devices",
        needs=f"a multiple of the {devices} devices the batch is split over",
    )  # fmt: skip


def fit_rollout_batch(config, num_prompts: int, *, what: str, group_size: int = 1):
    """:func:`fit_batch_size` for the RL trainers (PPOConfig, GRPOConfig): prompts per iteration,
    each answered ``group_size`` times, so that ``num_minibatches`` minibatches of whole-device
    shares cut the batch·group_size rollouts: batch_size · G a multiple of M · devices, i.e.
    batch_size a multiple of M·d / gcd(G, M·d). Also notes a warm-up cut to the run's
    iterations × epochs × minibatches optimiser steps (:func:`note_warmup`)."""
    split = config.num_minibatches * batch_divisor_of(config)
    multiple = split // math.gcd(group_size, split)
    rows = "batch_size" if group_size == 1 else f"batch_size·group_size ({group_size})"
    config = fit_batch_size(
        config, num_prompts, what=what, unit="prompts", multiple_of=multiple,
        field="batch_size" if multiple == 1 else "num_minibatches",
        needs=f"{rows} must be a multiple of num_minibatches × devices = {split}",
    )  # fmt: skip
    note_warmup(config, config.optimizer.total_steps, what=what)
    return config
