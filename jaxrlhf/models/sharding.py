"""Where each parameter lives on a device mesh: logical axis names per parameter, one table mapping
them to the mesh axes ``data``, ``fsdp`` and ``tensor``.

Every parameter dimension gets a *logical* name by what it indexes (``vocab``, ``embed``, ``heads``,
``kv_heads``, ``mlp``), from the parameter's place in the model (``PARAM_AXES``, one table per
family); ``LOGICAL_TO_MESH`` then says which mesh axis shards that dimension:

    layers   → (none)   the leading axis of the scanned blocks' stacked parameters
    embed    → fsdp     every large weight is split over the FSDP axis (ZeRO-3 style: all-gathered
                        just in time by GSPMD, gradients reduce-scattered)
    heads    → tensor   Megatron column-parallel q/k/v (and GPT-2's fused qkv), row-parallel output
    kv_heads → tensor   (GQA: the K key/value heads)
    mlp      → tensor   column-parallel up/gate, row-parallel down projection
    vocab    → tensor   the embedding table and the LM head split over the vocabulary

A LoRA adapter (``models.lora``) follows its projection: A [d_in, r] is split like the kernel's
rows, B [r, d_out] like its columns, the rank axis never.

Batches are split over ``(data, fsdp)`` together: FSDP is data parallelism whose replicas also share
the parameters. A dimension that a mesh axis does not divide is left unsplit on that axis, so any mesh
runs any model (GSPMD inserts the collectives; the numbers do not depend on the layout).

    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    shardings = param_shardings(nnx.state(model), mesh)        # NamedSharding per parameter
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both

LOGICAL_TO_MESH = {
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
}

# (regular expression on the parameter's path "a/b/c", logical names of its dimensions); the first
# match wins. Paths are those of nnx.state(model) with the stacked-layer segment taken off (see
# logical_axes): e.g. "lm/model/attn/c_attn/kernel" for the [L, D, 3D] "lm/model/h/attn/c_attn/kernel".
PARAM_AXES = (
    # embeddings and the LM head
    (r"(wte|embed_tokens)/embedding$", ("vocab", "embed")),
    (r"wpe/embedding$", (None, "embed")),
    (r"lm_head/kernel$", ("embed", "vocab")),
    # GPT-2 attention (fused q|k|v columns) and MLP
    (r"attn/c_attn/kernel$", ("embed", "heads")),
    (r"attn/c_attn/bias$", ("heads",)),
    (r"attn/c_proj/kernel$", ("heads", "embed")),
    (r"mlp/c_fc/kernel$", ("embed", "mlp")),
    (r"mlp/c_fc/bias$", ("mlp",)),
    (r"mlp/c_proj/kernel$", ("mlp", "embed")),
    # Llama / Qwen2 / Mistral attention (GQA) and gated MLP
    (r"q_proj/kernel$", ("embed", "heads")),
    (r"q_proj/bias$", ("heads",)),
    (r"(k_proj|v_proj)/kernel$", ("embed", "kv_heads")),
    (r"(k_proj|v_proj)/bias$", ("kv_heads",)),
    (r"o_proj/kernel$", ("heads", "embed")),
    (r"(gate_proj|up_proj)/kernel$", ("embed", "mlp")),
    (r"(gate_proj|up_proj)/bias$", ("mlp",)),
    (r"down_proj/kernel$", ("mlp", "embed")),
    # scalar heads (value, reward) and everything D-sized (norms, output biases)
    (r"(value_head|score)/kernel$", ("embed", None)),
    (r"(value_head|score)/bias$", (None,)),
    (r"(weight|bias)$", ("embed",)),
)


def parse_mesh(spec: str | None) -> dict[str, int]:
    """``"data=2,fsdp=2,tensor=2"`` → {"data": 2, "fsdp": 2, "tensor": 2}; None or "" → all devices
    on ``data``. Axes left out have size 1."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    if not spec:
        sizes["data"] = jax.device_count()
        return sizes
    for part in spec.split(","):
        name, _, size = part.partition("=")
        name = name.strip()
        if name not in MESH_AXES or not size.strip().isdigit() or int(size) < 1:
            raise ValueError(
                f"mesh {spec!r}: expected comma-separated AXIS=SIZE with AXIS in {MESH_AXES} and "
                f"SIZE ≥ 1 (e.g. data=2,fsdp=2,tensor=2), got {part!r}"
            )
        sizes[name] = int(size)
    return sizes


def make_mesh(spec: str | None = None, devices=None) -> Mesh:
    """A (data, fsdp, tensor) ``Mesh`` over all devices (of every process) from a mesh spec."""
    sizes = parse_mesh(spec)
    devices = jax.devices() if devices is None else devices
    total = math.prod(sizes.values())
    if total != len(devices):
        raise ValueError(
            f"mesh {spec!r}: the sizes multiply to {total}, but there are {len(devices)} devices "
            "(the product must equal the number of devices)"
        )
    grid = np.asarray(devices).reshape([sizes[a] for a in MESH_AXES])
    return Mesh(grid, MESH_AXES)


def path_string(path) -> str:
    """A pytree key path of an nnx.State as "a/b/0/c" (the trailing ``.value`` dropped)."""
    keys = []
    for entry in path:
        key = getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", entry)))
        keys.append(str(key))
    if keys and keys[-1] == "value":
        keys.pop()
    return "/".join(keys)


STACKED_BLOCKS = re.compile(r"(^|/)(h|layers)/(?!\d+/)")
"""Paths of the scanned blocks' parameters (``layers.stack_blocks``): their first dimension is the
``layers`` axis, which no mesh axis splits (each device holds its shard of every layer, and the
scan all-gathers one layer at a time)."""

LISTED_BLOCKS = re.compile(r"(^|/)(h|layers)/\d+/")
"""Paths of a list of blocks' parameters (``ModelConfig.scan_layers`` off): block l's parameters
are named as a stacked block's, without the layer axis."""


def logical_axes(path: str, ndim: int) -> tuple[str | None, ...]:
    """The logical names of a parameter's dimensions (all None when no rule matches). A stacked
    block parameter (``STACKED_BLOCKS``) is ``("layers", *its per-layer names)``."""
    if LISTED_BLOCKS.search(path):
        path = LISTED_BLOCKS.sub(r"\1", path)
    elif ndim and STACKED_BLOCKS.search(path):
        return ("layers", *logical_axes(STACKED_BLOCKS.sub(r"\1", path), ndim - 1))
    adapter = re.search(r"/lora_(a|b)$", path)
    if adapter and ndim == 2:  # A [d_in, r] splits like the kernel's rows, B [r, d_out] its columns
        rows, columns = logical_axes(path[: adapter.start()] + "/kernel", 2)
        return (rows, None) if adapter.group(1) == "a" else (None, columns)
    for pattern, names in PARAM_AXES:
        if re.search(pattern, path) and len(names) == ndim:
            return names
    return (None,) * ndim


def partition_spec(names, shape, mesh: Mesh) -> P:
    """The PartitionSpec of an array with these logical dimension names on ``mesh``: each name's
    mesh axis (``LOGICAL_TO_MESH``) where that axis has size > 1 and divides the dimension."""
    axes = []
    for name, size in zip(names, shape):
        axis = LOGICAL_TO_MESH.get(name)
        if axis is None or mesh.shape[axis] == 1 or size % mesh.shape[axis]:
            axes.append(None)
        else:
            axes.append(axis)
    return P(*axes)


def param_shardings(state: Any, mesh: Mesh) -> Any:
    """A NamedSharding for every array of ``state`` (an nnx.State or any pytree of parameters)."""

    def sharding(path, x):
        names = logical_axes(path_string(path), len(x.shape))
        return NamedSharding(mesh, partition_spec(names, x.shape, mesh))

    return jax.tree_util.tree_map_with_path(sharding, state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension over (data, fsdp); everything else whole."""
    return NamedSharding(mesh, P(BATCH_AXES))


def batch_divisor(mesh: Mesh) -> int:
    """How many ways the batch is split: data × fsdp."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def host_copy(tree: Any) -> Any:
    """Every array of ``tree`` as a whole NumPy array on the host. Sharded arrays that span
    several processes are all-gathered (a collective: every process must call this)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    def gather(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(gather, tree)


def host_model(module):
    """``module`` with its parameters gathered to the host (:func:`host_copy`), e.g. for
    ``save_pretrained``; every process must call it."""
    from flax import nnx

    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, host_copy(state))
