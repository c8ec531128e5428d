"""One train step for every trainer (SFT, reward model, PPO), run on one device, under jax.pmap or
under jax.shard_map.

**A loss is a table of means.** Each trainer's loss is a small frozen dataclass (hashable, so it is a
static argument of ``jax.jit``) that maps ``(params, batch)`` to ``{name: (sum, count)}`` — for
PPO ``{"policy": (Σ ℓ, #tokens), "value": (Σ (V−R)², #tokens), "entropy": …, "clipfrac": …}`` — and
has ``weights``, the coefficients of the terms that make the objective:

    L(θ) = Σ_k w_k · S_k(θ) / C_k          S_k = Σ over the whole batch,  C_k = its count

**Data parallelism.** Every device holds the same ``TrainState`` and 1/n of the batch. Sums and
counts add across devices, so each device divides its own sum by the *global* count (a ``psum`` of
the counts, which do not depend on θ) and the ``psum`` of the per-device gradients is exactly ∇L of
the global batch, however unevenly the valid tokens fall on the devices. The same per-device
function is wrapped four ways (``make_train_step``):

* ``"single"``: ``jax.jit(train_step)`` on one device;
* ``"mesh"``: the same jitted step over a (data, fsdp, tensor) device mesh (``models.sharding``):
  parameters and optimiser state sharded by the model's rules, the batch split over (data, fsdp);
  GSPMD partitions the program and inserts the collectives. The step is written for one device —
  sums and counts are global arrays, so no explicit psum — and this is the path that scales;
* ``"pmap"``: ``jax.pmap(train_step, axis_name="data")``: the state is replicated along a leading
  device axis and the batch reshaped to ``[n_devices, B / n_devices, ...]``;
* ``"shard_map"``: ``jax.jit(jax.shard_map(train_step, in_specs=(P(), P("data")), ...))`` over a 1-D
  ``Mesh``: one replicated array per state leaf, the batch split along its first axis.

**Autodiff under shard_map.** With ``check_vma`` (on by default) shard_map tracks which values vary
across the mesh axis; the gradient of a device-varying loss with respect to *replicated* parameters is
then already summed over devices. To keep one explicit ``psum`` in the code, the step first marks the
parameters device-varying with ``lax.pcast(..., to="varying")``, so each device computes its own
gradient, as under pmap.

The state is donated to the step (``donate_argnums``): XLA may update parameters and Adam moments
in place.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrlhf.models.sharding import (
    batch_divisor,
    batch_sharding,
    param_shardings,
    path_string,
)
from jaxrlhf.train.optim import OptimizerConfig

PARALLELISM = ("single", "mesh", "pmap", "shard_map")
AXIS = "data"

Means = dict[str, tuple[jax.Array, jax.Array]]  # name → (sum over this batch, count)

SKIPPED = "nonfinite_skipped"  # the metric: updates skipped for a non-finite loss or gradient


class Loss(Protocol):
    """What ``train_step`` needs of a loss: hashable, callable, and the weights of its terms."""

    weights: tuple[tuple[str, float], ...]  # ((term name, coefficient w_k), ...)

    def __call__(self, params: Any, batch: Any) -> Means: ...

    def __hash__(self) -> int: ...


@struct.dataclass
class TrainState:
    """What the optimiser carries from step to step (a pytree)."""

    params: Any  # the trainable parameters (an nnx.State of nnx.Param leaves)
    opt_state: Any  # optax state (Adam moments, schedule count, ...)
    step: jax.Array  # int32 [] optimiser steps taken so far
    frozen: Any = None  # what the loss reads and nothing updates: a LoRA model's base (or None)

    def model_params(self) -> Any:
        """Every parameter of the model: ``nnx.merge(graphdef, state.model_params())``."""
        return self.params if self.frozen is None else nnx.merge_state(self.params, self.frozen)


def init_train_state(params: Any, optimizer: OptimizerConfig, frozen: Any = None) -> TrainState:
    """A fresh :class:`TrainState` for ``params`` and the ``frozen`` rest of the model (both
    copied: the steps donate the state's buffers, which must not be the caller's model's). An
    empty ``frozen`` (``lora.split_trainable`` without adapters) is None. Optimiser state is made
    for ``params`` alone."""
    params = jax.tree.map(jnp.copy, params)
    frozen = jax.tree.map(jnp.copy, frozen) if jax.tree.leaves(frozen) else None
    return TrainState(
        params=params,
        opt_state=optimizer.build().init(params),
        step=jnp.zeros((), jnp.int32),
        frozen=frozen,
    )


def _mark_varying(tree: Any, axis_name: str) -> Any:
    """Mark replicated (device-invariant) leaves as device-varying, so grads stay per-device."""

    def mark(x):
        if axis_name in getattr(jax.typeof(x), "vma", frozenset()):
            return x  # already varying (e.g. under pmap's mapped axis)
        return jax.lax.pcast(x, axis_name, to="varying")

    return jax.tree.map(mark, tree)


def _psum(tree: Any, axis_name: str | None) -> Any:
    return tree if axis_name is None else jax.lax.psum(tree, axis_name)


def train_step(
    state: TrainState,
    batch: Any,
    loss: Loss,
    optimizer: OptimizerConfig,
    axis_name: str | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser step on this device's slice of the batch (pure).

    L_d(θ) = Σ_k w_k S_{k,d}(θ) / Σ_d C_{k,d};   g = Σ_d ∇L_d;   θ ← θ + optax_update(g)

    Args:
      state: the (replicated) train state.  batch: this device's slice (the whole batch if
        ``axis_name`` is None).  loss: a :class:`Loss`.  optimizer: its config.
      axis_name: the device axis, or None on one device.
    Returns:
      (new state, metrics: every term's global mean, plus "loss", "grad_norm" and
      ``nonfinite_skipped``).

    **Non-finite values.** When the loss or the gradient norm ‖g‖ is NaN/±inf (some gradient
    element is NaN or ±inf, or ‖g‖² overflows float32; one check on ‖g‖ rather than one per
    parameter), checked after the cross-device sum so that every device agrees, the update is
    skipped: params and opt_state come back unchanged (Adam's moments and the schedule count too),
    ``step`` still advances (it counts the batches consumed, so which batch comes next stays a
    function of ``step``) and ``nonfinite_skipped`` is 1 (else 0). With finite values the update
    is exactly the plain one.
    """
    params = state.params if axis_name is None else _mark_varying(state.params, axis_name)

    def objective(params):
        means = {}
        if state.frozen is not None:  # the loss reads the whole model; ∇ only through params
            params = nnx.merge_state(params, state.frozen)
        for name, (total, count) in loss(params, batch).items():
            count = _psum(jax.lax.stop_gradient(jnp.asarray(count, jnp.float32)), axis_name)
            means[name] = total / jnp.maximum(count, 1.0)  # this device's part of the mean
        return sum(w * means[name] for name, w in loss.weights), means

    (value, means), grads = jax.value_and_grad(objective, has_aux=True)(params)
    value, means, grads = _psum((value, means, grads), axis_name)
    updates, opt_state = optimizer.build().update(grads, state.opt_state, state.params)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(value) & jnp.isfinite(grad_norm)  # after the psum: devices agree
    new_state = TrainState(
        params=keep_if(finite, optax.apply_updates(state.params, updates), state.params),
        opt_state=keep_if(finite, opt_state, state.opt_state),
        step=state.step + 1,
        frozen=state.frozen,
    )
    metrics = {
        **means,
        "loss": value,
        "grad_norm": grad_norm,
        SKIPPED: 1.0 - finite.astype(jnp.float32),
    }
    return new_state, metrics


def keep_if(ok: jax.Array, new: Any, old: Any) -> Any:
    """``new`` where ``ok`` else ``old``, leaf by leaf (a select: ``new`` exactly when ok)."""
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


# ------------------------------------------------------------------------- the three wrappers


def replicate(tree: Any, n: int) -> Any:
    """Stack ``n`` copies of every leaf along a new leading device axis (pmap's layout)."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *jnp.shape(x))), tree)


def unreplicate(tree: Any) -> Any:
    """The first replica of every leaf (all replicas are equal after a psum'd update)."""
    return jax.tree.map(lambda x: x[0], tree)


def split_batch(batch: Any, n: int) -> Any:
    """Reshape every leaf [B, ...] to [n, B / n, ...] (device axis first) for pmap."""
    check_divisible(batch, n)
    return jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)


def check_divisible(batch: Any, n: int) -> None:
    for x in jax.tree.leaves(batch):
        if x.shape[0] % n:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by {n} devices")


def data_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D ``data`` mesh over the first ``num_devices`` devices (all of them by default)."""
    devices = jax.devices()
    num_devices = len(devices) if num_devices is None else num_devices
    if not 1 <= num_devices <= len(devices):
        raise ValueError(f"num_devices={num_devices}: this host has {len(devices)} devices")
    return Mesh(devices[:num_devices], (AXIS,))


_single_step = jax.jit(train_step, static_argnums=(2, 3, 4), donate_argnums=0)
_pmap_step = jax.pmap(
    train_step, axis_name=AXIS, static_broadcasted_argnums=(2, 3, 4), donate_argnums=0
)


@functools.partial(jax.jit, static_argnums=(2, 3, 4), donate_argnums=0)
def _shard_map_step(state, batch, loss, optimizer, mesh):
    per_device = functools.partial(train_step, loss=loss, optimizer=optimizer, axis_name=AXIS)
    sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=(P(), P()))
    return sharded(state, batch)


@functools.partial(jax.jit, static_argnums=(2, 3, 4), donate_argnums=0)
def _mesh_step(state, batch, loss, optimizer, layout):
    treedef, shardings = layout
    state_sharding = jax.tree.unflatten(treedef, shardings)
    state = jax.lax.with_sharding_constraint(state, state_sharding)
    batch = jax.lax.with_sharding_constraint(batch, batch_sharding(shardings[0].mesh))
    state, metrics = train_step(state, batch, loss, optimizer)
    return jax.lax.with_sharding_constraint(state, state_sharding), metrics


def mesh_layout(params: Any, optimizer: OptimizerConfig, mesh: Mesh, frozen: Any = None) -> tuple:
    """Where every leaf of the TrainState of ``params`` (and ``frozen``) lives on ``mesh``, as a
    hashable (treedef, shardings) pair: parameters by the model's sharding rules, each
    optimiser-state leaf like the parameter it mirrors (Adam's moments: same path suffix, same
    shape), the rest (step counts) replicated."""
    shardings = param_shardings(params, mesh)
    by_path = {
        path_string(path): (x.shape, sharding)
        for (path, x), sharding in zip(
            jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(shardings)
        )
    }
    replicated = NamedSharding(mesh, P())

    def like_its_parameter(path, x):
        path = path_string(path)
        for param_path, (shape, sharding) in by_path.items():
            if path.endswith(param_path) and x.shape == shape:
                return sharding
        return replicated

    abstract = jax.eval_shape(lambda p: optimizer.build().init(p), params)
    opt_shardings = jax.tree_util.tree_map_with_path(like_its_parameter, abstract)
    frozen = frozen if jax.tree.leaves(frozen) else None
    frozen_shardings = None if frozen is None else param_shardings(frozen, mesh)
    layout = TrainState(
        params=shardings, opt_state=opt_shardings, step=replicated, frozen=frozen_shardings
    )
    leaves, treedef = jax.tree.flatten(layout)
    return treedef, tuple(leaves)


@dataclasses.dataclass(frozen=True)
class ParallelStep:
    """The train step bound to one loss, optimiser and parallelism, with its layout conversions.

    ``step(device_state, device_batch) -> (device_state, metrics)`` where ``device_state =
    put_state(state)`` and ``device_batch = put_batch(batch)``; ``get_state`` converts back.
    Metrics are always plain scalars. ``in_jit`` is True when ``step`` may be called inside
    ``jax.jit`` (single, shard_map; pmap is driven from Python).
    """

    loss: Loss
    optimizer: OptimizerConfig
    parallelism: str = "single"
    num_devices: int = 1
    mesh: Mesh | None = None
    layout: tuple | None = None  # "mesh": (treedef, shardings) of the TrainState (mesh_layout)

    @property
    def in_jit(self) -> bool:
        return self.parallelism != "pmap"

    def step(self, state, batch):
        if self.parallelism == "single":
            return _single_step(state, batch, self.loss, self.optimizer, None)
        if self.parallelism == "pmap":
            state, metrics = _pmap_step(state, batch, self.loss, self.optimizer, AXIS)
            return state, unreplicate(metrics)
        if self.parallelism == "mesh":
            return _mesh_step(state, batch, self.loss, self.optimizer, self.layout)
        return _shard_map_step(state, batch, self.loss, self.optimizer, self.mesh)

    def put_state(self, state: TrainState):
        if self.parallelism == "pmap":  # placed as pmap expects, wherever ``state`` was computed
            return jax.device_put(
                replicate(state, self.num_devices), NamedSharding(self.mesh, P(AXIS))
            )
        if self.parallelism == "shard_map":
            return jax.device_put(state, NamedSharding(self.mesh, P()))
        if self.parallelism == "mesh":
            return jax.device_put(state, jax.tree.unflatten(*self.layout))
        return state

    def get_state(self, state) -> TrainState:
        return unreplicate(state) if self.parallelism == "pmap" else state

    def put_batch(self, batch):
        if self.parallelism == "pmap":
            return jax.device_put(
                split_batch(batch, self.num_devices), NamedSharding(self.mesh, P(AXIS))
            )
        if self.parallelism == "shard_map":
            check_divisible(batch, self.num_devices)
            return jax.device_put(batch, NamedSharding(self.mesh, P(AXIS)))
        if self.parallelism == "mesh":
            return put_batch(batch, self.mesh)
        return batch


def make_train_step(
    loss: Loss,
    optimizer: OptimizerConfig,
    *,
    parallelism: str = "single",
    num_devices: int | None = None,
    mesh: Mesh | None = None,
    params: Any = None,
    frozen: Any = None,
) -> ParallelStep:
    """:func:`train_step` on one device, over a device ``mesh`` (with the ``params`` whose layout it
    sets), under ``jax.pmap`` or under ``shard_map`` over a 1-D mesh of ``num_devices``.

    All four compute the same update for the same global batch (up to float rounding).
    """
    if parallelism not in PARALLELISM:
        raise ValueError(f"parallelism={parallelism!r}: expected one of {PARALLELISM}")
    if parallelism == "single":
        return ParallelStep(loss, optimizer)
    if parallelism == "mesh":
        if mesh is None or params is None:
            raise ValueError('parallelism="mesh" needs the mesh and the parameters')
        divisor = batch_divisor(mesh)
        return ParallelStep(
            loss, optimizer, "mesh", divisor, mesh, mesh_layout(params, optimizer, mesh, frozen)
        )
    if parallelism == "pmap":
        n = jax.local_device_count() if num_devices is None else num_devices
        if not 1 <= n <= jax.local_device_count():
            raise ValueError(f"num_devices={n}: this host has {jax.local_device_count()} devices")
        mesh = Mesh(np.array(jax.local_devices()[:n]), (AXIS,))  # the devices pmap maps over
        return ParallelStep(loss, optimizer, "pmap", n, mesh)
    mesh = data_mesh(num_devices)
    return ParallelStep(loss, optimizer, "shard_map", mesh.devices.size, mesh)


def put_batch(batch: Any, mesh: Mesh) -> Any:
    """A global host batch (every process holds the same rows) as global arrays split over the
    mesh's (data, fsdp) axes.

    One process: ``device_put``. Several processes (``jax.distributed``): each keeps only its own
    contiguous share of the rows (process p of P: rows [p·B/P, (p+1)·B/P), the rows its devices
    hold) and ``jax.make_array_from_process_local_data`` assembles the global array, so no device
    of another process receives rows through this one.
    """
    check_divisible(batch, batch_divisor(mesh))
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    p, n = jax.process_index(), jax.process_count()

    def local(x):
        rows = x.shape[0] // n
        return jax.make_array_from_process_local_data(
            sharding, np.asarray(x)[p * rows : (p + 1) * rows], x.shape
        )

    return jax.tree.map(local, batch)


def run_steps(stepper: ParallelStep, state: TrainState, data: Any, indices) -> tuple[Any, dict]:
    """Train steps on the minibatches ``data[indices[i]]``, in order → (state, mean metrics; the
    number of skipped updates for ``nonfinite_skipped``).

    ``indices`` [S, b]: row i selects minibatch i. Single / shard_map: one jitted ``lax.scan`` (one
    dispatch for the whole update; ``state`` is donated); pmap: a Python loop of pmapped steps.
    """
    if stepper.in_jit:
        return _scan_steps(state, data, jnp.asarray(indices), stepper)
    device_state = stepper.put_state(state)
    history = []
    for idx in np.asarray(indices):
        batch = jax.tree.map(lambda x: x[idx], data)  # noqa: B023
        device_state, metrics = stepper.step(device_state, stepper.put_batch(batch))
        history.append(metrics)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *history)
    return stepper.get_state(device_state), reduce_metrics(stacked)


def reduce_metrics(stacked: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-minibatch metrics [S] → one value each: the mean, but ``nonfinite_skipped`` summed
    (how many of the S updates were skipped)."""
    return {k: jnp.sum(v) if k == SKIPPED else jnp.mean(v) for k, v in stacked.items()}


@functools.partial(jax.jit, static_argnums=3, donate_argnums=0)
def _scan_steps(state, data, indices, stepper: ParallelStep):
    def body(state, idx):
        return stepper.step(state, jax.tree.map(lambda x: x[idx], data))

    state, metrics = jax.lax.scan(body, state, indices)
    return state, reduce_metrics(metrics)
