"""Checkpoints of a training run with orbax: the state pytree (params, optimiser state, rng, iteration,
adaptive-KL state) plus the config as JSON, one directory per step.

    <directory>/
      3/state/...            the pytree (OCDBT/zarr arrays, written by ocp.args.StandardSave)
      3/config/metadata      the config (ocp.args.JsonSave of dataclasses.asdict(config))
      5/...

**Atomic writes.** ``ocp.CheckpointManager.save`` first writes everything into a temporary sibling
``<step>.orbax-checkpoint-tmp-<n>``; once every file is written it adds a ``commit_success.txt``
marker and *renames* the directory to ``<step>`` (orbax's ``AtomicRenameTemporaryPath``: one atomic
``rename`` on a POSIX file system; on object stores without atomic rename, orbax's
``CommitFileTemporaryPath`` writes to the final path and the marker file, written last, is what
makes the step count). A reader (``latest_step``,
``restore``) only ever considers finalized step directories, so a run killed halfway through a save
leaves the previous checkpoints intact and the partial one invisible; the next manager removes the
stale temporary directory. Old checkpoints are deleted only *after* a new one is finalized
(``max_to_keep``), so a good checkpoint is never replaced by a partial one. ``tests/test_checkpoint.py``
checks both: no temporary directory survives a save, and a leftover temporary directory from a
"crash" is ignored; ``tests/test_robustness.py`` SIGKILLs a real ``jaxrlhf ppo`` process inside orbax's
finalize (files written, directory not yet renamed) and at a random moment, and the resumed run ends
with the metrics of an uninterrupted one.

Saving is synchronous here (``enable_async_checkpointing=False``): PPO iterations are short and a
synchronous save keeps "the checkpoint exists" equal to "save returned".
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding

from jaxrlhf.models.sharding import LISTED_BLOCKS, path_string
from jaxrlhf.train.state import TrainState


def _manager(directory: str | os.PathLike, *, keep: int | None = None) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=True,
        enable_async_checkpointing=False,
        cleanup_tmp_directories=True,
    )
    return ocp.CheckpointManager(
        os.path.abspath(os.fspath(directory)), options=options, item_names=("state", "config")
    )


def _config_dict(config: Any) -> dict:
    if config is None:
        return {}
    if dataclasses.is_dataclass(config):
        return {"class": type(config).__name__, **dataclasses.asdict(config)}
    return dict(config)


def save_checkpoint(
    directory: str | os.PathLike,
    step: int,
    state: Any,
    *,
    config: Any = None,
    keep: int | None = None,
) -> None:
    """Save ``state`` (any pytree of arrays) and ``config`` (a dataclass or dict) as step ``step``.

    Overwrites nothing: saving a step that already exists raises FileExistsError.
    ``keep``: how many most recent checkpoints to keep (None: all).
    """
    manager = _manager(directory, keep=keep)
    try:
        if int(step) in manager.all_steps():
            raise FileExistsError(
                f"checkpoint step {int(step)} already exists under {os.fspath(directory)!r}"
            )
        config = _config_dict(config)
        base = frozen_signature(state)
        if base is not None:
            config["frozen_base"] = base
        saved = manager.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(jax.tree.map(_savable, without_frozen(state))),
                config=ocp.args.JsonSave(config),
            ),
        )
        manager.wait_until_finished()
        if not saved:
            raise RuntimeError(f"orbax declined to save step {int(step)} under {directory!r}")
    finally:
        manager.close()


def latest_step(directory: str | os.PathLike) -> int | None:
    """The newest finalized step under ``directory`` (None when there is none)."""
    if not os.path.isdir(directory):
        return None
    manager = _manager(directory)
    try:
        return manager.latest_step()
    finally:
        manager.close()


def all_steps(directory: str | os.PathLike) -> list[int]:
    """Every finalized step under ``directory``, ascending."""
    if not os.path.isdir(directory):
        return []
    manager = _manager(directory)
    try:
        return sorted(manager.all_steps())
    finally:
        manager.close()


def saved_config(directory: str | os.PathLike, step: int | None = None) -> dict:
    """The config dict saved with step ``step`` (default: the latest), without its state."""
    manager = _manager(directory)
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {os.fspath(directory)!r}")
        saved = manager.restore(int(step), args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    finally:
        manager.close()
    return dict(saved["config"] or {})


def restore_checkpoint(
    directory: str | os.PathLike, target: Any, *, step: int | None = None
) -> tuple[Any, dict]:
    """Restore step ``step`` (default: the latest) into the structure of ``target``.

    ``target`` is a pytree with the same structure, shapes and dtypes as the saved state (e.g. a
    freshly initialised train state); only its structure is used. Returns (state, config dict).

    Where ``target``'s arrays are sharded over a device mesh, each array is read straight into
    that sharding (every process reads only its shards), whatever mesh the checkpoint was written
    from: that is how a run resumes on a different mesh. Otherwise the arrays come back as ordinary
    (uncommitted, default-device) arrays, like freshly computed ones: orbax hands back arrays
    *committed* to a device, and jit treats those as a different input signature, which would
    recompile every program after a resume.
    """
    manager = _manager(directory)
    try:
        if step is None:
            step = manager.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint under {os.fspath(directory)!r}")
        saved = manager.restore(int(step), args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        saved_base = dict(saved["config"] or {}).get("frozen_base")
        _check_frozen_base(directory, step, saved_base, frozen_signature(target))
        abstract = jax.tree.map(_abstract, without_frozen(target))
        try:
            restored = manager.restore(
                int(step),
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), config=ocp.args.JsonRestore()
                ),
            )
        except ValueError as err:
            if "structure" not in str(err).lower():
                raise
            raise ValueError(_mismatch_message(directory, int(step), str(err), target)) from None
    finally:
        manager.close()
    state = jax.tree.map(_uncommitted, restored["state"], without_frozen(target))
    config = dict(restored["config"] or {})
    config.pop("frozen_base", None)
    return with_frozen_of(state, target), config


def _is_train_state(x) -> bool:
    return isinstance(x, TrainState)


def without_frozen(tree: Any) -> Any:
    """``tree`` with every TrainState's frozen part (a LoRA model's base) left out: a checkpoint
    holds the adapters, heads and their optimiser state, not the base they apply to."""
    return jax.tree.map(
        lambda x: x.replace(frozen=None) if _is_train_state(x) else x, tree, is_leaf=_is_train_state
    )


def with_frozen_of(tree: Any, target: Any) -> Any:
    """``tree`` (restored without frozen parts) with ``target``'s frozen parts put back."""
    frozen = [x.frozen for x in jax.tree.leaves(target, is_leaf=_is_train_state)
              if _is_train_state(x)]  # fmt: skip
    states = iter(frozen)
    return jax.tree.map(
        lambda x: x.replace(frozen=next(states)) if _is_train_state(x) else x, tree,
        is_leaf=_is_train_state,
    )  # fmt: skip


def frozen_signature(tree: Any) -> list | None:
    """What identifies the frozen base(s) of ``tree``'s TrainStates: per frozen array its path,
    shape and the sum and the sum of squares of its values (float64 on the host; None without a
    frozen part). Recorded with a checkpoint, so that resuming over another base is refused."""
    frozen = [x.frozen for x in jax.tree.leaves(tree, is_leaf=_is_train_state)
              if _is_train_state(x) and x.frozen is not None]  # fmt: skip
    if not frozen:
        return None
    out = []
    for path, x in jax.tree_util.tree_leaves_with_path(frozen):
        path = path[1:] if len(frozen) == 1 else path  # (the list's index, when there is one)
        x = jnp.asarray(x, jnp.float32)
        out.append([path_string(path), list(x.shape), float(jnp.sum(x)), float(jnp.sum(x * x))])
    return out


def _check_frozen_base(directory, step, saved: list | None, now: list | None) -> None:
    """Refuse to resume adapters over a base other than the one they were trained on."""
    where = f"cannot resume from {os.fspath(directory)!r} (step {step})"
    if saved is None and now is None:
        return
    if saved is None or now is None:
        held = "a LoRA run's adapters" if saved is not None else "a full fine-tuning state"
        now_is = "full fine-tuning" if saved is not None else "LoRA"
        raise ValueError(f"{where}: it holds {held} and this run is {now_is} (resume with the "
                         "checkpoint's lora_rank)")  # fmt: skip
    for (path, shape, total, squares), (path2, shape2, total2, squares2) in zip(saved, now):
        same = (
            path == path2
            and shape == shape2
            and all(
                abs(a - b) <= 1e-4 * max(1.0, abs(a))
                for a, b in ((total, total2), (squares, squares2))
            )
        )
        if not same:
            raise ValueError(
                f"{where}: its adapters were trained on another base model ({path} differs: "
                f"checkpoint sum {total:.6g}, this base {total2:.6g}); resume with the base "
                "model the run started from"
            )
    if len(saved) != len(now):
        raise ValueError(f"{where}: its adapters were trained on another base model")


PER_LAYER = re.compile(
    r"\.(h|layers)\.\d+[.:]"
)  # "params.lm.model.layers.0.mlp…" in orbax's report


def _mismatch_message(directory, step: int, report: str, target) -> str:
    """Why a checkpoint does not fit the state it is restored into, in a user's words."""
    where = f"cannot resume from {os.fspath(directory)!r} (step {step})"
    if PER_LAYER.search(report):
        paths = [path_string(p) for p, _ in jax.tree_util.tree_leaves_with_path(target)]
        if any(LISTED_BLOCKS.search(p) for p in paths):  # the run lists them: the file stacks
            return (
                f"{where}: it holds the transformer blocks stacked (one [num_layers, ...] array "
                "each) and this run holds them one per layer (scan_layers off); resume with "
                "scan_layers on (the default: drop --no-scan-layers)"
            )
        return (
            f"{where}: it holds the transformer blocks one per layer ('layers.0', 'layers.1', …: "
            "a run with scan_layers off, or a jaxrlhf from before the blocks were stacked) and "
            "this run stacks them; resume with scan_layers off (--no-scan-layers)"
        )
    first = " ".join(report.split())[:400]
    return (
        f"{where}: its state does not have the structure of this run's (another model, "
        f"algorithm or optimiser?); orbax says: {first}"
    )


def _savable(x):
    """Arrays sharded over a mesh as they are (orbax writes each process's shards); everything
    else (one device, numpy) as a host copy, which every process holds alike."""
    return x if _on_mesh(x) else np.asarray(x)


def _on_mesh(x) -> bool:
    return isinstance(getattr(x, "sharding", None), NamedSharding) and x.sharding.mesh.size > 1


def _abstract(x):
    """What orbax restores ``x`` as: shape, dtype and, on a mesh, its sharding."""
    if _on_mesh(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return ocp.utils.to_shape_dtype_struct(x)


def _uncommitted(restored, target):
    return restored if _on_mesh(target) else jnp.asarray(np.asarray(restored))
