"""What every trainer shares: the device and checkpoint settings, and the supervised training loop
(SFT and the reward model: shuffle → minibatch → ``state.train_step``, with resume).

    for step in range(state.step, steps):
        batch = data[epoch_batches(N, batch_size, epoch, seed)[step % steps_per_epoch]]
        state, metrics = train_step(state, batch)           # one device, pmap or shard_map
        every checkpoint_every steps and at the end: save (state, config)

Which rows a step reads is a function of (seed, step) alone, so a run resumed from a checkpoint
continues exactly like an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxrlhf.config import option, require
from jaxrlhf.logging import note
from jaxrlhf.logging import progress as progress_bar
from jaxrlhf.models.heads import with_settings
from jaxrlhf.models.lora import has_lora, model_configs, parse_targets, with_lora
from jaxrlhf.models.peft_adapter import load_adapter
from jaxrlhf.models.sharding import make_mesh, parse_mesh
from jaxrlhf.train.checkpoint import (
    latest_step,
    restore_checkpoint,
    save_checkpoint,
    saved_config,
)
from jaxrlhf.train.state import PARALLELISM, SKIPPED, ParallelStep, TrainState, make_train_step


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoopConfig:
    """Devices and checkpoints (shared by SFTConfig, RewardConfig and PPOConfig)."""

    parallelism: str = option(
        "single",
        "single (one device) | mesh (GSPMD over --*-mesh: sharded parameters, the scalable path) | "
        "pmap | shard_map (the readable data-parallel versions).",
    )
    mesh: str | None = option(
        None,
        "Device mesh, e.g. data=2,fsdp=2,tensor=2 (the sizes multiply to the number of devices); "
        "given alone it implies parallelism=mesh. None with parallelism=mesh: all devices on data.",
    )
    num_devices: int | None = option(None, "Devices for pmap/shard_map (None: all local).")
    compute_dtype: str = option(
        "float32",
        "Activation/matmul dtype of the trained model: float32 | bfloat16 (mixed precision: the "
        "parameters and Adam state stay float32; logits, log-probs, values and losses float32).",
    )
    remat: bool = option(
        False, "Activation checkpointing: recompute each block in the backward pass (less memory)."
    )
    scan_layers: bool | None = option(
        None,
        "--scan-layers: the transformer blocks stacked and scanned over (compile time flat in "
        "depth; a mesh gathers one layer at a time). --no-scan-layers: a Python loop over the "
        "blocks, compiled unrolled; faster for small models on CPU (benchmarks/bench_ppo.py). "
        "Same results. None: the model's own layout (loaded models: scanned).",
    )
    logits_chunk_size: int | None = option(
        None,
        "Tokens per chunk of the LM head in the loss: log-probs and entropy from the hidden states, "
        "one chunk's float32 logits at a time (None: as many as fit 64 MiB; small vocabularies: "
        "one chunk). Changes memory, not results.",
    )
    lora_rank: int = option(
        0,
        "LoRA adapters of this rank on the blocks' projections, trained with the heads while the "
        "base stays frozen (0: full fine-tuning). The reference of PPO/GRPO/DPO is then the policy "
        "with its adapters off (no second copy). The learning rate is yours: LoRA's best rate is "
        "about 10x full fine-tuning's, and for RL even rank 1 matched full fine-tuning (Schulman "
        "et al. 2025, 'LoRA Without Regret').",
    )
    lora_alpha: float = option(32.0, "LoRA's alpha: an adapter adds (alpha / rank) * B A.")
    lora_dropout: float = option(
        0.0, "Dropout on the adapters' input: only 0 (no trainer applies dropout; RL must not)."
    )
    lora_targets: str | None = option(
        None,
        "Comma list of the Hugging Face names of the projections that get adapters (llama: "
        "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj; gpt2: c_attn,c_proj,c_fc). "
        "None or all-linear: every one.",
    )
    adapter: str | None = option(
        None,
        "A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors, e.g. an "
        "earlier run's policy_adapter/) to start from, on the base model it was made for; its "
        "rank, alpha and targets replace --lora-*.",
    )
    checkpoint_dir: str | None = option(None, "Directory for orbax checkpoints (None: none).")
    checkpoint_every: int = option(0, "Save every this many steps/iterations (0: only at the end).")
    keep_checkpoints: int = option(2, "Most recent checkpoints to keep.")
    max_nonfinite_skips: int = option(
        3,
        "Stop the run after this many consecutive steps/iterations whose loss or gradient was NaN "
        "or inf (each such update is skipped: parameters and optimiser state unchanged).",
    )

    def __post_init__(self):
        if self.mesh and self.parallelism == "single":  # a mesh given alone means run on it
            object.__setattr__(self, "parallelism", "mesh")
        require(
            self.parallelism in PARALLELISM, self, "parallelism", f"must be one of {PARALLELISM}"
        )
        require(
            self.num_devices is None or self.num_devices >= 1,
            self,
            "num_devices",
            "must be ≥ 1 or None",
        )
        require(
            self.logits_chunk_size is None or self.logits_chunk_size >= 1,
            self,
            "logits_chunk_size",
            "must be ≥ 1 or None",
        )
        require(self.checkpoint_every >= 0, self, "checkpoint_every", "must be ≥ 0")
        require(self.keep_checkpoints >= 1, self, "keep_checkpoints", "must be ≥ 1")
        require(self.max_nonfinite_skips >= 1, self, "max_nonfinite_skips", "must be ≥ 1")
        require(
            self.mesh is None or self.parallelism == "mesh",
            self,
            "mesh",
            "is used only with parallelism = 'mesh'",
        )
        require(
            self.compute_dtype in ("float32", "bfloat16"),
            self,
            "compute_dtype",
            "must be float32 or bfloat16",
        )
        require(self.lora_rank >= 0, self, "lora_rank", "must be ≥ 0 (0: no adapters)")
        require(self.lora_alpha > 0, self, "lora_alpha", "must be > 0")
        require(
            self.lora_dropout == 0.0,
            self,
            "lora_dropout",
            "must be 0: no trainer applies dropout (RL needs the log-probs of the rollout)",
        )
        if self.lora_rank == 0 and self.adapter is None:
            for name in ("lora_alpha", "lora_targets"):
                default = next(f.default for f in dataclasses.fields(LoopConfig) if f.name == name)
                require(
                    getattr(self, name) == default,
                    self,
                    name,
                    "is used only with lora_rank ≥ 1 (or an adapter); set lora_rank",
                )
        if self.mesh:
            try:
                parse_mesh(self.mesh)
            except ValueError as err:
                require(False, self, "mesh", str(err))

    def device_mesh(self):
        """The jax Mesh of parallelism = "mesh" (None otherwise)."""
        if self.parallelism != "mesh":
            return None
        try:
            return make_mesh(self.mesh)
        except ValueError as err:  # e.g. sizes that do not multiply to the number of devices
            raise ValueError(f"{type(self).__name__}.mesh = {self.mesh!r}: {err}") from None

    @property
    def uses_lora(self) -> bool:
        return self.lora_rank > 0 or self.adapter is not None

    def trainable(self, model):
        """``model`` with this compute dtype, remat and block layout, in float32 parameters (the
        master weights); with LoRA (``lora_rank`` or ``adapter``), the base keeps its dtype and
        gets adapters (``models.lora``), float32 like the heads."""
        model = with_settings(
            model, param_dtype=None if self.uses_lora else "float32",
            compute_dtype=self.compute_dtype, remat=self.remat, scan_layers=self.scan_layers,
        )  # fmt: skip
        if self.adapter is not None and not has_lora(model):
            try:
                return load_adapter(model, self.adapter)
            except TypeError as err:
                raise ValueError(f"{type(self).__name__}.adapter: {err}") from None
        if self.lora_rank and not has_lora(model):
            with self._naming("lora_targets"):
                targets = parse_targets(self.lora_targets, model_configs(model)[0].family)
            with self._naming("lora_rank"):
                return with_lora(model, rank=self.lora_rank, alpha=self.lora_alpha,
                                 targets=targets, seed=getattr(self, "seed", 0))  # fmt: skip
        return model

    @contextlib.contextmanager
    def _naming(self, field: str):
        """A ValueError inside, as one naming ``<Config>.<field>``."""
        try:
            yield
        except ValueError as err:
            raise ValueError(f"{type(self).__name__}.{field}: {err}") from None

    def reference(self, model, *, param_dtype: str | None = None):
        """The frozen reference of PPO / GRPO: ``frozen(model)``, or None with LoRA (the trainer
        reads the policy with its adapters off: ``lora.reference_parts``)."""
        return None if self.uses_lora else self.frozen(model, param_dtype=param_dtype)

    def frozen(self, model, *, param_dtype: str | None = None):
        """A frozen model (reference, reward model) with this compute dtype and block layout, its
        parameters cast to ``param_dtype`` (None: as they are)."""
        return with_settings(
            model, param_dtype=param_dtype, compute_dtype=self.compute_dtype,
            scan_layers=self.scan_layers,
        )  # fmt: skip

    def train_step(self, loss, optimizer, params, frozen=None) -> ParallelStep:
        """The train step of ``loss`` with these devices (``state.make_train_step``)."""
        return make_train_step(
            loss,
            optimizer,
            parallelism=self.parallelism,
            num_devices=self.num_devices,
            mesh=self.device_mesh(),
            params=params,
            frozen=frozen,
        )


LORA_FIELDS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "adapter")
LOOP_FIELDS = tuple(f.name for f in dataclasses.fields(LoopConfig) if f.name not in LORA_FIELDS)
"""The device and checkpoint settings: a run may resume with others (not the LoRA settings)."""


def resume_mismatches(config: Any, saved: dict, *, may_change: tuple[str, ...] = ()) -> list[str]:
    """The fields (``name (checkpoint X, now Y)``) in which ``config`` differs from a checkpoint's
    saved config, other than the device/checkpoint settings and ``may_change``."""
    out = []
    for field in dataclasses.fields(config):
        if field.name in LOOP_FIELDS + may_change or field.name not in saved:
            continue
        now, then = getattr(config, field.name), saved[field.name]
        if now != then:
            out.append(f"{field.name} (checkpoint {then!r}, now {now!r})")
    return out


def restore_run(directory: str, target: Any, config: Any, *, may_change=()) -> Any:
    """The latest checkpoint's state under ``directory``, refusing one saved with other settings
    (checked before the state is read: another LoRA rank is another shape)."""
    mismatches = resume_mismatches(config, saved_config(directory), may_change=may_change)
    if mismatches:
        raise ValueError(
            f"cannot resume from {directory!r}: the {type(config).__name__} differs from the "
            f"checkpoint's in {', '.join(mismatches)} (start a new run in another directory, or "
            "resume with the saved values)"
        )
    return restore_checkpoint(directory, target)[0]


class NonFiniteError(ValueError):
    """Too many consecutive steps/iterations with a non-finite loss or gradient."""


@dataclasses.dataclass
class SkipGuard:
    """Counts consecutive steps (or iterations) whose metrics report a skipped update
    (``nonfinite_skipped`` > 0) and stops the run after ``config.max_nonfinite_skips`` of them.

        guard = SkipGuard(config, "iteration")
        for done in ...:
            metrics = ...;  log(metrics)
            guard.check(done, metrics)          # raises NonFiniteError on the K-th in a row
            if guard.clean and <checkpoint due>: save  # never checkpoint inside a run of skips

    A run of skips is never checkpointed (except at the very end of the run), so the latest
    checkpoint is the last state from before it, and a run resumed from any checkpoint starts with
    no skips behind it: the count needs no saving.
    """

    config: Any  # a LoopConfig (its max_nonfinite_skips and checkpoint_dir)
    what: str  # "step" | "iteration", for the message
    streak: int = 0  # consecutive skipping steps/iterations so far

    @property
    def clean(self) -> bool:
        """True when the latest step/iteration updated the parameters (no skip)."""
        return self.streak == 0

    def check(self, index: int, metrics: dict[str, float]) -> None:
        """Count ``metrics`` of step/iteration ``index`` (1-based: the number done)."""
        self.streak = self.streak + 1 if metrics.get(SKIPPED, 0.0) > 0 else 0
        limit = self.config.max_nonfinite_skips
        if self.streak < limit:
            return
        where = self.config.checkpoint_dir
        saved = (
            f"; the checkpoints under {where!r} hold the state from before them" if where else ""
        )
        raise NonFiniteError(
            f"non-finite loss or gradient at {self.what} {index}: {self.streak} consecutive "
            f"{self.what}s skipped their updates ({type(self.config).__name__}."
            f"max_nonfinite_skips = {limit}), so the run stops{saved} (check the data and the "
            "reward function, or lower the learning rate)"
        )


def run_iterations(
    trainer,
    num_iterations: int | None,
    *,
    desc: str,
    postfix: Callable[[dict[str, float]], dict[str, str]],
    callback: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = True,
) -> list[dict[str, float]]:
    """The RL trainers' outer loop (PPOTrainer.train, GRPOTrainer.train): ``trainer.step()`` until
    ``num_iterations`` (default ``trainer.config.num_iterations``) are done in total, continuing from
    ``trainer.state.iteration``.

    After each iteration ``callback(iteration, metrics)`` is called; :class:`SkipGuard` stops the run
    after ``max_nonfinite_skips`` skipping iterations in a row; with ``config.checkpoint_dir``,
    ``trainer.save`` runs every ``checkpoint_every`` iterations (never inside a run of skips) and
    after the last one. Returns the metrics of the iterations run here.
    """
    c = trainer.config
    total = c.num_iterations if num_iterations is None else num_iterations
    start = int(trainer.state.iteration)
    history, guard, noted_k1 = [], SkipGuard(c, "iteration"), False
    bar = progress_bar(
        range(start, total),
        initial=start,
        total=total,
        desc=desc,
        what="iterations",
        disable=not progress,
    )
    for done in (it + 1 for it in bar):
        metrics = trainer.step()
        history.append(metrics)
        if callback is not None:
            callback(done, metrics)
        bar.set_postfix(postfix(metrics))
        noted_k1 = noted_k1 or note_negative_k1(c, done, metrics)
        guard.check(done, metrics)  # stops after max_nonfinite_skips skipping iterations
        if c.checkpoint_dir and (
            (guard.clean and c.checkpoint_every and done % c.checkpoint_every == 0) or done == total
        ):
            trainer.save(c.checkpoint_dir)
    return history


def note_negative_k1(config: Any, iteration: int, metrics: dict[str, float]) -> bool:
    """Say once why ``objective/kl`` went negative: with ``kl_estimator = "k1"`` the per-token
    estimate log π − log π_ref is unbiased for KL(π‖π_ref) ≥ 0 but any one batch of it can be
    below 0; k3 = (r − 1) − log r with r = π_ref/π is ≥ 0 for every token. Returns whether it spoke."""
    kl = metrics.get("objective/kl")
    if getattr(config, "kl_estimator", None) != "k1" or kl is None or not kl < 0:
        return False
    note(
        f"note: objective/kl = {kl:.4f} < 0 at iteration {iteration}: the k1 estimate "
        "(log π − log π_ref, summed over sampled tokens) is unbiased but can be negative on a "
        'batch; the true KL is not. k3 is never negative: kl_estimator="k3" (--ppo-kl-estimator k3).'
    )
    return True


def epoch_batches(num_rows: int, batch_size: int, epoch: int, seed: int) -> np.ndarray:
    """Row indices [num_rows // batch_size, batch_size] of one shuffled epoch (remainder dropped)."""
    order = np.random.default_rng([seed, epoch]).permutation(num_rows)
    steps = num_rows // batch_size
    return order[: steps * batch_size].reshape(steps, batch_size)


def fit(
    stepper: ParallelStep,
    state: TrainState,
    data: Any,
    *,
    batch_size: int,
    steps: int,
    seed: int,
    config: Any,
    desc: str,
    progress: bool = True,
    callback: Callable[[int, dict[str, float], TrainState], None] | None = None,
) -> tuple[TrainState, list[dict[str, float]]]:
    """Train from ``state`` (``state.step`` steps already done) until ``steps`` steps are done.

    ``data``: a pytree of arrays with ``num_rows`` rows each. With ``config.checkpoint_dir`` the run
    first resumes from the latest checkpoint there (refusing other settings), and saves every
    ``config.checkpoint_every`` steps and at the end. ``callback(step, metrics, state)`` runs after
    every step. A step with a non-finite loss or gradient is skipped (``state.train_step``); after
    ``config.max_nonfinite_skips`` in a row :class:`NonFiniteError` stops the run (see
    :class:`SkipGuard`). Returns (state, the metrics of the steps run here).
    """
    num_rows = len(jax.tree.leaves(data)[0])
    per_epoch = num_rows // batch_size
    if config.checkpoint_dir and latest_step(config.checkpoint_dir) is not None:
        state = restore_run(config.checkpoint_dir, state, config)
    history = []
    start = int(state.step)
    guard = SkipGuard(config, "step")
    device_state = stepper.put_state(state)
    bar = progress_bar(
        range(start, steps),
        initial=start,
        total=steps,
        desc=desc,
        what="steps",
        disable=not progress,
    )
    for step in bar:
        idx = epoch_batches(num_rows, batch_size, step // per_epoch, seed)[step % per_epoch]
        batch = jax.tree.map(lambda x: np.asarray(x[idx]), data)  # noqa: B023
        device_state, metrics = stepper.step(device_state, stepper.put_batch(batch))
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        history.append(metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}")
        done = step + 1
        if callback is not None:
            callback(done, metrics, stepper.get_state(device_state))
        guard.check(done, metrics)  # after the callback, so the step that stops is logged
        save = config.checkpoint_dir and (
            (guard.clean and config.checkpoint_every and done % config.checkpoint_every == 0)
            or done == steps
        )
        if save:
            state = stepper.get_state(device_state)
            save_checkpoint(
                config.checkpoint_dir, done, state, config=config, keep=config.keep_checkpoints
            )
    return stepper.get_state(device_state), history
