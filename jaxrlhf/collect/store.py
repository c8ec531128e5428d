"""The files of ``jaxrlhf collect``: candidate pairs, labels and skipped pairs, crash-safe.

Next to the output file ``OUT`` (what ``train-rm`` reads) live two side files:

* ``OUT.candidates.jsonl``: the sampled pairs ``{"pair_id", "prompt", "a", "b", ...}``, written
  once (temp file + ``os.replace``), so that a restart shows the same pairs;
* ``OUT.skipped.jsonl``: pairs labelled ``tie`` or ``skip`` (no preference: not training data).

``OUT`` holds one line per preference: ``prompt``, ``chosen``, ``rejected`` and the provenance
``labeler``, ``policy``, ``temperature``, ``pair_id``, ``sampled_at``, ``labeled_at``. Every label is
one complete line appended with a single write, then flushed and fsynced, so a crash or a closed
tab loses at most the label being made; a torn last line (a crash inside the write) is dropped with
a warning when the store is opened again. Undo rewrites the file without its last label (temp file
+ ``os.replace``). A lock file keeps a second ``collect`` off the same ``OUT``.
"""

from __future__ import annotations

import datetime
import json
import os
import tempfile
import threading
from collections.abc import Sequence

CHOICES = ("left", "right", "tie", "skip")  # left: a ≻ b, right: b ≻ a; tie, skip: not training
# What every candidate row records about how it was sampled (a restart must ask for the same).
SAMPLING_KEYS = ("policy", "prompts", "num_samples", "temperature", "max_new_tokens", "seed")


def candidates_path(out: str) -> str:
    return f"{out}.candidates.jsonl"


def skipped_path(out: str) -> str:
    return f"{out}.skipped.jsonl"


def now_utc() -> str:
    """The current time, ISO 8601 in UTC with microseconds (sorts as text)."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds")


def read_jsonl(path: str, *, repair: bool = False) -> list[dict]:
    """The rows of a JSON-lines file ([] if it does not exist).

    A last line without its newline that does not parse is what a crash inside a write leaves:
    with ``repair`` it is cut off the file (and reported on stderr); any other bad line raises a
    ValueError naming the file and the line.
    """
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        text = f.read()
    lines = text.split("\n")
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            torn = number == len(lines) and not text.endswith("\n")
            if torn and repair:
                import sys

                print(f"{path}: dropping a torn last line (an interrupted write): {line[:60]!r}",
                      file=sys.stderr)  # fmt: skip
                rewrite_jsonl(path, rows)
                return rows
            raise ValueError(f"{path}: line {number} is not JSON: {err}") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}: line {number} is not a JSON object")  # noqa: TRY004 (data)
        rows.append(row)
    return rows


def _fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rewrite_jsonl(path: str, rows: Sequence[dict]) -> None:
    """Replace ``path`` by ``rows`` atomically: a temp file in the same directory, fsync,
    ``os.replace`` (readers see the old file or the new one, never a mix)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(path)


def append_jsonl(path: str, row: dict) -> None:
    """Append one complete line with a single write, then flush and fsync."""
    line = json.dumps(row, ensure_ascii=False) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def write_candidates(out: str, pairs: Sequence[dict], sampling: dict) -> list[dict]:
    """Write ``OUT.candidates.jsonl`` once: each pair ``{"prompt", "a", "b"}`` numbered
    (``pair_id``) and stamped with ``sampling`` (the SAMPLING_KEYS) and ``sampled_at``."""
    missing = [k for k in SAMPLING_KEYS if k not in sampling]
    if missing:
        raise ValueError(f"write_candidates: sampling lacks {missing}")
    stamp = now_utc()
    rows = [
        {"pair_id": i, "prompt": p["prompt"], "a": p["a"], "b": p["b"], **sampling,
         "sampled_at": stamp}
        for i, p in enumerate(pairs)
    ]  # fmt: skip
    rewrite_jsonl(candidates_path(out), rows)
    return rows


def check_sampling(out: str, rows: Sequence[dict], sampling: dict) -> None:
    """Refuse to continue ``OUT`` with other sampling settings than its candidates were made with."""
    if not rows:
        return
    changed = [
        f"{k} (candidates {rows[0].get(k)!r}, now {sampling[k]!r})"
        for k in SAMPLING_KEYS
        if k in sampling and rows[0].get(k) != sampling[k]
    ]
    if changed:
        raise ValueError(
            f"{candidates_path(out)} was sampled with other settings: {'; '.join(changed)}; "
            "give the same flags to continue, or another --out to start over"
        )


class LabelStore:
    """The labels of one ``OUT`` (thread-safe): which candidate pairs are done, the next one,
    labelling, and undo of the last label (in either file, also after a restart)."""

    def __init__(self, out: str):
        self.out = out
        self.lock = threading.RLock()
        self.candidates = read_jsonl(candidates_path(out))
        if not self.candidates:
            raise ValueError(f"{candidates_path(out)}: no candidate pairs")
        self.by_id = {}
        for number, row in enumerate(self.candidates, 1):
            for key in ("pair_id", "prompt", "a", "b"):
                if key not in row:
                    raise ValueError(f"{candidates_path(out)}: line {number} has no {key!r}")
            self.by_id[row["pair_id"]] = row
        self.done: dict[int, str] = {}  # pair_id → the file its label is in
        self.kind: dict[int, str] = {}  # pair_id → "preference", "tie" or "skip"
        labelled = []
        for path in (out, skipped_path(out)):
            for number, row in enumerate(read_jsonl(path, repair=True), 1):
                pair_id = row.get("pair_id")
                if pair_id not in self.by_id:
                    raise ValueError(
                        f"{path}: line {number}: pair_id {pair_id!r} is not in "
                        f"{candidates_path(out)} (a label file of another run?)"
                    )
                if pair_id in self.done:
                    raise ValueError(f"{path}: line {number}: pair {pair_id} is labelled twice")
                self.done[pair_id] = path
                self.kind[pair_id] = row.get("label", "preference")
                labelled.append((row.get("labeled_at", ""), pair_id))
        self.history = [pair_id for _, pair_id in sorted(labelled)]  # oldest label first

    # ------------------------------------------------------------------------------- reading

    @property
    def total(self) -> int:
        return len(self.candidates)

    def pending(self) -> list[dict]:
        """The candidate rows not yet labelled, in file order."""
        with self.lock:
            return [row for row in self.candidates if row["pair_id"] not in self.done]

    def next_pair(self) -> dict | None:
        with self.lock:
            return next((r for r in self.candidates if r["pair_id"] not in self.done), None)

    def counts(self) -> dict:
        """How many pairs are labelled (and how), of how many."""
        with self.lock:
            kinds = list(self.kind.values())
            return {
                "labeled": len(self.done),
                "total": self.total,
                "preferences": kinds.count("preference"),
                "ties": kinds.count("tie"),
                "skips": kinds.count("skip"),
            }

    # ------------------------------------------------------------------------------- writing

    def label(self, pair_id: int, choice: str, *, labeler: str) -> dict:
        """Record ``choice`` (one of CHOICES) for a pending pair; returns the line written.

        ``left``/``right`` append ``{"prompt", "chosen", "rejected", ...}`` to OUT; ``tie`` and
        ``skip`` append ``{"prompt", "a", "b", "label", ...}`` to OUT.skipped.jsonl.
        """
        if choice not in CHOICES:
            raise ValueError(f"choice {choice!r}: expected one of {', '.join(CHOICES)}")
        with self.lock:
            if pair_id not in self.by_id:
                raise KeyError(f"pair {pair_id!r} is not a candidate of {self.out}")
            if pair_id in self.done:
                raise ValueError(f"pair {pair_id} is already labelled")
            pair = self.by_id[pair_id]
            provenance = {
                "labeler": labeler,
                "policy": pair.get("policy"),
                "temperature": pair.get("temperature"),
                "pair_id": pair_id,
                "sampled_at": pair.get("sampled_at"),
                "labeled_at": now_utc(),
            }
            if choice in ("left", "right"):
                chosen, rejected = (
                    (pair["a"], pair["b"]) if choice == "left" else (pair["b"], pair["a"])
                )
                row = {
                    "prompt": pair["prompt"],
                    "chosen": chosen,
                    "rejected": rejected,
                    **provenance,
                }
                path = self.out
            else:
                row = {"prompt": pair["prompt"], "a": pair["a"], "b": pair["b"], "label": choice,
                       **provenance}  # fmt: skip
                path = skipped_path(self.out)
            append_jsonl(path, row)
            self.done[pair_id] = path
            self.kind[pair_id] = "preference" if path == self.out else choice
            self.history.append(pair_id)
            return row

    def undo(self) -> int | None:
        """Remove the last label (from whichever file holds it); returns its pair_id, or None when
        nothing is labelled. The file is rewritten atomically."""
        with self.lock:
            if not self.history:
                return None
            pair_id = self.history.pop()
            path = self.done.pop(pair_id)
            del self.kind[pair_id]
            rows = read_jsonl(path)
            rewrite_jsonl(path, [row for row in rows if row.get("pair_id") != pair_id])
            return pair_id


class OutputLock:
    """An exclusive lock on ``OUT.lock`` for the life of a ``with`` block (released by the OS if
    the process dies), so that two ``collect`` processes never write the same files."""

    def __init__(self, out: str):
        self.path = f"{out}.lock"
        self.file = None

    def __enter__(self):
        import fcntl

        self.file = open(self.path, "w")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.close()
            raise ValueError(
                f"{self.path}: another `jaxrlhf collect` is writing {self.path[:-5]}; stop it first"
            ) from None
        return self

    def __exit__(self, *exc):
        self.file.close()
        return False
