"""Metrics sinks (JSON lines always, TensorBoard when a writer package is installed) and the one-line
notes the library says to the user."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TextIO


def note(line: str) -> None:
    """One line of information for the user: on stderr (stdout stays for results), process 0 only."""
    import jax

    if jax.process_index() == 0:
        print(line, file=sys.stderr, flush=True)


def is_terminal(file: TextIO | None = None) -> bool:
    """Whether ``file`` (default stderr) is an interactive terminal, where a redrawn bar reads well."""
    file = sys.stderr if file is None else file
    try:
        return file.isatty()
    except (AttributeError, ValueError):  # a closed or file-like stream without isatty
        return False


class ProgressLines:
    """Progress as plain lines for logs and pipes: one line about every ``every`` of the run or
    ``interval_s`` seconds, whichever comes first, and one at the end.

    A redrawn bar (tqdm) written to a file leaves one ``\\r`` frame per update; this writes
    ``desc: 40/100 iterations (40%), 12.3 s, loss=0.41`` instead. ``clock`` is injectable for tests.
    """

    def __init__(
        self,
        iterable: Iterable,
        *,
        total: int,
        initial: int = 0,
        desc: str = "",
        what: str = "steps",
        file: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        every: float = 0.1,
        interval_s: float = 30.0,
    ):
        self.iterable, self.total, self.done = iterable, int(total), int(initial)
        self.desc, self.what, self.file, self.clock = desc, what, file, clock
        self.stride = max(1, math.ceil(every * max(self.total - self.done, 1)))
        self.interval_s, self.postfix = interval_s, ""
        self._start = self._last_time = clock()
        self._last_done = self.done

    def set_postfix(self, values: Mapping[str, Any] | None = None, **more: Any) -> None:
        """Key=value pairs shown at the end of the next line (tqdm's ``set_postfix``)."""
        items = {**(values or {}), **more}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def line(self) -> str:
        percent = f" ({100 * self.done // self.total}%)" if self.total else ""
        text = f"{self.desc}: {self.done}/{self.total} {self.what}{percent}"
        text += f", {self.clock() - self._start:.1f} s"
        return text + (f", {self.postfix}" if self.postfix else "")

    def _maybe_print(self, force: bool = False) -> None:
        now = self.clock()
        due = self.done - self._last_done >= self.stride or now - self._last_time >= self.interval_s
        if (force or due) and self.done != self._last_done:
            print(self.line(), file=self.file or sys.stderr, flush=True)
            self._last_done, self._last_time = self.done, now

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item  # the caller runs the step and may set_postfix before the count moves on
            self.done += 1
            self._maybe_print(force=self.done >= self.total)
        self._maybe_print(force=True)


def progress(
    iterable: Iterable,
    *,
    total: int,
    initial: int = 0,
    desc: str = "",
    what: str = "steps",
    disable: bool = False,
    file: TextIO | None = None,
    **plain: Any,
):
    """Progress over ``iterable`` for a long loop: a tqdm bar on a terminal, plain lines
    (:class:`ProgressLines`) in a log file or a pipe, nothing when ``disable`` or off process 0.

    Both have ``set_postfix(**values)``. ``plain`` goes to :class:`ProgressLines` (``clock``,
    ``every``, ``interval_s``).
    """
    import jax

    if disable or jax.process_index() != 0:
        return _Quiet(iterable)
    if is_terminal(file):
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, initial=initial, desc=desc, file=file)
    return ProgressLines(
        iterable, total=total, initial=initial, desc=desc, what=what, file=file, **plain
    )


class _Quiet:
    """No progress: the iterable with a ``set_postfix`` that does nothing."""

    def __init__(self, iterable: Iterable):
        self.iterable = iterable

    def __iter__(self) -> Iterator:
        return iter(self.iterable)

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass


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
