"""Reading Hugging Face safetensors checkpoints: whole, or lazily a slice at a time, and each tensor
in our layout (``TensorSource``: transposed Linear kernels, per-layer tensors stacked for the scanned
blocks). ``hf.py`` maps them onto our models."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
from safetensors import SafetensorError, safe_open

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read: names the file or tensor at fault."""


class LazyTensor:
    """One tensor of a safetensors file, read on demand, whole or a slice at a time."""

    def __init__(self, file: str, key: str):
        self.file, self.key = file, key
        with safe_open(file, framework="flax") as f:
            self.shape = tuple(f.get_slice(key).get_shape())

    def read(self, index: tuple = ()) -> np.ndarray:
        """``tensor[index]`` (a tuple of slices), reading only those bytes from the file."""
        with safe_open(self.file, framework="flax") as f:
            piece = f.get_slice(self.key)
            return np.asarray(piece[index] if index else piece[:])


def read_safetensors(path: str | os.PathLike, *, lazy: bool = False) -> dict:
    """All tensors of a local HF checkpoint directory (single file or sharded) as jax arrays, or
    with ``lazy`` as :class:`LazyTensor` handles that read slices on demand (sharded loading).

    Refuses pickle checkpoints (``*.bin``, ``*.pt``, ``*.pth``): loading them runs arbitrary code.
    """
    path = os.fspath(path)
    single = os.path.join(path, WEIGHTS_NAME)
    index = os.path.join(path, WEIGHTS_INDEX_NAME)
    if os.path.exists(single):
        files = [single]
    elif os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no 'weight_map'")
        files = [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
        for file in files:
            if not os.path.exists(file):
                raise CheckpointError(f"shard {file} named in {index} does not exist")
    else:
        pickles = [
            os.path.basename(p)
            for ext in ("bin", "pt", "pth", "ckpt")
            for p in glob.glob(os.path.join(path, f"*.{ext}"))
        ]
        if pickles:
            raise CheckpointError(
                f"{path} holds only pickle checkpoint(s) {sorted(pickles)}; jaxrlhf reads safetensors "
                "only (pickle runs arbitrary code). Convert once with transformers: "
                "AutoModelForCausalLM.from_pretrained(path).save_pretrained(path, "
                "safe_serialization=True)"
            )
        raise CheckpointError(f"no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} in {path}")
    tensors = {}
    for file in files:
        try:
            with safe_open(file, framework="flax") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    tensors[key] = LazyTensor(file, key) if lazy else f.get_tensor(key)
        except SafetensorError as err:  # a truncated or corrupt file
            raise CheckpointError(
                f"{file}: not a readable safetensors file ({err}); it may be truncated: download "
                "or save it again"
            ) from err
    return tensors


def _take(tensors: dict, name: str, path: str):
    if name not in tensors:
        raise CheckpointError(f"tensor {name!r} is missing from the checkpoint at {path}")
    return tensors[name]


class TensorSource:
    """An HF tensor in our layout (transposed for Linear kernels: torch stores [out, in]), or with
    ``layers`` the per-layer tensors ``name.format(i=l)`` stacked on a leading axis [L, ...] (our
    scanned blocks). ``read(index)`` reads only the bytes of ``index`` (a tuple of slices in our
    layout) when the tensors are LazyTensors (sharded loading)."""

    def __init__(self, tensors: dict, name: str, *, transpose: bool, source: str, layers=None):
        self.name, self.transpose = name, transpose
        names = [name] if layers is None else [name.format(i=i) for i in range(layers)]
        self.parts = [_take(tensors, n, source) for n in names]
        shapes = {tuple(t.shape) for t in self.parts}
        if len(shapes) > 1:
            raise CheckpointError(f"{source}: the layers of {name!r} differ in shape: {shapes}")
        self.hf_shape = shapes.pop()  # one layer's shape as HF stores it
        self.stacked = layers is not None
        ours = self.hf_shape[::-1] if transpose else self.hf_shape
        self.shape = (layers, *ours) if self.stacked else ours

    def _layer(self, tensor, index: tuple):
        if isinstance(tensor, LazyTensor):
            piece = tensor.read(index[::-1] if self.transpose else index)
        else:
            piece = np.asarray(tensor)[index[::-1] if self.transpose else index]
        return piece.T if self.transpose else piece

    def read(self, index: tuple = ()) -> np.ndarray:
        index = tuple(index) or tuple(slice(None) for _ in self.shape)
        if not self.stacked:
            return self._layer(self.parts[0], index)
        layers = range(len(self.parts))[index[0]]
        return np.stack([self._layer(self.parts[i], index[1:]) for i in layers])
