"""Metrics sinks: JSON lines always, TensorBoard when a writer package is installed."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any


def _plain(value: Any) -> Any:
    """A JSON-friendly Python scalar (jax/numpy scalars → float/int; NaN/inf → None)."""
    try:
        value = value.item()
    except AttributeError:
        pass
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLogger:
    """Appends one JSON object per step to ``path``; mirrors scalars to TensorBoard if available.

    In a multi-process run (``jax.distributed``) only process 0 writes; elsewhere it does nothing,
    so every process can run the same code.
    """

    def __init__(self, path: str | os.PathLike, *, tensorboard_dir: str | None = None):
        import jax

        self.path = os.fspath(path)
        self._file = self._tb = None
        if jax.process_index() != 0:
            return
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())
        if tensorboard_dir is not None:
            try:
                from tensorboardX import SummaryWriter  # optional
            except ImportError:
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(tensorboard_dir)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        if self._file is None:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a JSONL metrics file, in order."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
