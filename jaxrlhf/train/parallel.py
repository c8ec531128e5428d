"""One optimiser step, written once per device and run three ways: single device, jax.pmap, shard_map.

The step is a pure function of ``(state, batch)``. Under data parallelism every device holds the same
``state`` and a 1/n slice of the global batch; it differentiates its own loss, the gradients are
averaged across devices with ``lax.pmean`` and every device applies the same optax update, so the
replicas stay identical. Two wrappers run that same per-device function:

* ``jax.pmap(step, axis_name=...)``: the state is replicated along a leading device axis and the batch
  is reshaped to ``[n_devices, B / n_devices, ...]``;
* ``jax.jit(jax.shard_map(step, mesh=..., in_specs=(P(), P(axis)), out_specs=P()))``: the state is one
  replicated array per leaf and the global batch is split along its first axis over a 1-D ``Mesh``.

(In JAX ≥ 0.8 ``jax.pmap`` is itself implemented on top of ``shard_map``.)

**Making the average exact.** The single-device loss of a batch is usually a *token* mean,
Σ ℓ / N_tokens. Averaging n per-device token means is not the same thing when devices hold different
numbers of valid tokens. So each per-device loss is rescaled by its *share* of the normaliser,
``w_d / mean_d(w_d)`` (:func:`device_share`): then

    mean_d[(w_d / w̄) · Σ_{i∈d} ℓᵢ / w_d] = Σ_d Σ_{i∈d} ℓᵢ / (n w̄) = Σᵢ ℓᵢ / N_tokens,

and ``pmean`` of the per-device gradients is exactly the gradient of the global loss. Loss functions
used here take ``axis_name`` and apply that rescaling to every term (and to their metrics).

**Autodiff under shard_map.** With ``check_vma`` (on by default) shard_map tracks which values vary
across the mesh axis. The gradient of a device-varying loss with respect to *replicated* parameters
is then already summed over devices (the transpose of the implicit broadcast is a ``psum``). To keep a
single, explicit ``pmean`` in the code, the step first marks the parameters device-varying with
``lax.pcast(..., to="varying")``, so each device computes its own gradient, as under ``pmap``.

**Multi-host.** On a TPU pod slice or several GPU hosts each process calls
``jax.distributed.initialize()`` before touching devices (:func:`maybe_initialize_distributed`, behind
``PPOConfig.distributed_init``); ``jax.devices()`` then lists every device of every host and the same
shard_map / pmap code runs unchanged, each host feeding its local slice of the batch.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

PARALLELISM = ("single", "pmap", "shard_map")

# loss_fn(params, batch, axis_name) -> (loss [], metrics {name: []}); under an axis, the pmean of the
# per-device loss/metrics must equal the global batch's value (see device_share).
LossFn = Callable[[Any, Any, "str | None"], tuple[jax.Array, dict[str, jax.Array]]]


@struct.dataclass
class TrainState:
    """What the optimiser carries from step to step (a pytree)."""

    params: Any  # the trainable parameters (an nnx.State of nnx.Param leaves)
    opt_state: Any  # optax state (Adam moments, schedule count, ...)
    step: jax.Array  # int32 [] optimiser steps taken so far


def init_train_state(params: Any, optimizer: optax.GradientTransformation) -> TrainState:
    """A fresh :class:`TrainState` for ``params``."""
    return TrainState(
        params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32)
    )


def device_share(count: jax.Array, axis_name: str | None) -> jax.Array:
    """This device's share of a normaliser, w_d / mean_d(w_d); exactly 1 without a device axis.

    Multiplying a per-device mean Σ_{i∈d} xᵢ / w_d by it makes the ``pmean`` over devices equal the
    global mean Σᵢ xᵢ / Σ_d w_d (see the module docstring).
    """
    count = jnp.asarray(count, jnp.float32)
    if axis_name is None:
        return jnp.ones((), jnp.float32)
    return count / jnp.maximum(jax.lax.pmean(count, axis_name), 1e-12)


def _mark_varying(tree: Any, axis_name: str) -> Any:
    """Mark replicated (device-invariant) leaves as device-varying, so grads stay per-device."""

    def mark(x):
        if axis_name in getattr(jax.typeof(x), "vma", frozenset()):
            return x  # already varying (e.g. under pmap's mapped axis)
        return jax.lax.pcast(x, axis_name, to="varying")

    return jax.tree.map(mark, tree)


def train_step(
    state: TrainState,
    batch: Any,
    *,
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    axis_name: str | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser step on this device's slice of the batch (pure).

    g = ∇_θ L_d(θ; batch_d);   ḡ = pmean_d(g);   θ ← θ + optax_update(ḡ)

    Args:
      state: the (replicated) train state.  batch: this device's slice (the whole batch if
      ``axis_name`` is None).  loss_fn: ``(params, batch, axis_name) -> (loss, metrics)``.
      optimizer: an optax transformation.  axis_name: the device axis, or None on one device.
    Returns:
      (new state, metrics averaged over devices, plus "loss" and "grad_norm").
    """
    params = state.params
    if axis_name is not None:
        params = _mark_varying(params, axis_name)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, metrics), grads = grad_fn(params, batch, axis_name)
    metrics = {**metrics, "loss": loss}
    if axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)
        metrics = jax.lax.pmean(metrics, axis_name)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return TrainState(params=params, opt_state=opt_state, step=state.step + 1), metrics


def replicate(tree: Any, n: int) -> Any:
    """Stack ``n`` copies of every leaf along a new leading device axis (pmap's layout)."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *jnp.shape(x))), tree)


def unreplicate(tree: Any) -> Any:
    """The first replica of every leaf (all replicas are equal after a pmean'd update)."""
    return jax.tree.map(lambda x: x[0], tree)


def split_batch(batch: Any, n: int) -> Any:
    """Reshape every leaf [B, ...] to [n, B / n, ...] (device axis first) for pmap."""

    def split(x):
        if x.shape[0] % n:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by {n} devices")
        return x.reshape(n, x.shape[0] // n, *x.shape[1:])

    return jax.tree.map(split, batch)


def make_mesh(num_devices: int | None = None, axis_name: str = "data") -> Mesh:
    """A 1-D device mesh over the first ``num_devices`` devices (all of them by default)."""
    devices = jax.devices()
    num_devices = len(devices) if num_devices is None else num_devices
    if not 1 <= num_devices <= len(devices):
        raise ValueError(f"num_devices={num_devices}: this host has {len(devices)} devices")
    return Mesh(devices[:num_devices], (axis_name,))


@dataclasses.dataclass(frozen=True)
class ParallelStep:
    """A train step bound to one parallelism, with the layout conversions it needs.

    ``step(device_state, device_batch) -> (device_state, metrics)`` where ``device_state =
    put_state(state)`` and ``device_batch = put_batch(batch)``; ``get_state`` converts back.
    Metrics are always plain scalars.
    """

    step: Callable[[Any, Any], tuple[Any, dict[str, jax.Array]]]
    put_state: Callable[[TrainState], Any]
    get_state: Callable[[Any], TrainState]
    put_batch: Callable[[Any], Any]
    num_devices: int


def make_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    parallelism: str = "single",
    num_devices: int | None = None,
    axis_name: str = "data",
) -> ParallelStep:
    """Wrap :func:`train_step` for one device, ``jax.pmap`` or ``shard_map`` over a 1-D mesh.

    All three compute the same update for the same global batch (up to float rounding).
    """
    if parallelism not in PARALLELISM:
        raise ValueError(f"parallelism={parallelism!r}: expected one of {PARALLELISM}")
    identity = lambda x: x
    if parallelism == "single":
        step = jax.jit(functools.partial(train_step, loss_fn=loss_fn, optimizer=optimizer))
        return ParallelStep(step, identity, identity, identity, 1)

    per_device = functools.partial(
        train_step, loss_fn=loss_fn, optimizer=optimizer, axis_name=axis_name
    )
    if parallelism == "pmap":
        n = jax.local_device_count() if num_devices is None else num_devices
        devices = jax.local_devices()[:n]
        pmapped = jax.pmap(per_device, axis_name=axis_name, devices=devices)

        def step(state, batch):
            state, metrics = pmapped(state, batch)
            return state, unreplicate(metrics)

        return ParallelStep(
            step,
            put_state=lambda s: replicate(s, n),
            get_state=unreplicate,
            put_batch=lambda b: split_batch(b, n),
            num_devices=n,
        )

    mesh = make_mesh(num_devices, axis_name)
    n = mesh.devices.size
    sharded = jax.shard_map(
        per_device, mesh=mesh, in_specs=(P(), P(axis_name)), out_specs=(P(), P())
    )
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P(axis_name))

    def put_batch(batch):
        for x in jax.tree.leaves(batch):
            if x.shape[0] % n:
                raise ValueError(f"batch size {x.shape[0]} is not divisible by {n} devices")
        return jax.device_put(batch, batch_sharding)

    return ParallelStep(
        jax.jit(sharded),
        put_state=lambda s: jax.device_put(s, replicated),
        get_state=identity,
        put_batch=put_batch,
        num_devices=n,
    )


def maybe_initialize_distributed(enabled: bool) -> None:
    """Call ``jax.distributed.initialize()`` (multi-host TPU VMs / GPU clusters) when ``enabled``.

    On Cloud TPU VMs and SLURM/Open MPI clusters JAX discovers the coordinator, process count and
    process id by itself; it must run once per process, before any other JAX call that touches
    devices. With ``enabled=False`` (the default, a single host) this does nothing.
    """
    if enabled:
        jax.distributed.initialize()
