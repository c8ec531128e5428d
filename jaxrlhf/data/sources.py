"""Where data comes from: a local file, a dataset directory, or a dataset on the Hugging Face Hub.

``load_splits(source, config)`` returns (training split, held-out split or None):

* a ``.json`` / ``.jsonl`` / ``.parquet`` / ``.csv`` file: one split (the held-out rows are then a
  seeded fraction, drawn by the trainer);
* a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``;
* any other directory (a folder of data files, e.g. a downloaded Hub repository with
  ``train.jsonl`` / ``test.jsonl`` or ``data/train-*.parquet``): ``datasets.load_dataset(dir)``;
* otherwise a Hub dataset name (``Anthropic/hh-rlhf``): ``datasets.load_dataset(name,
  config.config)``, as users expect. Offline (``HF_HUB_OFFLINE=1`` / ``HF_DATASETS_OFFLINE=1``) a
  name resolves through the ``datasets`` cache or, failing that, a snapshot in the Hugging Face Hub
  cache (``huggingface-cli download --repo-type dataset NAME``); a name found in neither is a
  :class:`DataError` naming it, not a stack of HTTP retries.

The held-out split is ``config.eval_split`` (default ``test``) when the dataset has it.
"""

from __future__ import annotations

import contextlib
import json
import os

from jaxrlhf.data.preference import DataConfig, DataError

FILE_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def _offline() -> bool:
    import datasets

    return bool(datasets.config.HF_HUB_OFFLINE)


def _pick(data, source: str, split: str, eval_split: str | None):
    """(train, eval or None) from a Dataset (one split: ``train``) or a DatasetDict."""
    import datasets

    if isinstance(data, datasets.Dataset):
        if split != "train":
            raise DataError(f"{source}: has a single split, so --data-split {split!r} is not in it")
        return data, None
    if split not in data:
        raise DataError(
            f"{source}: no split {split!r} (has {sorted(data)}; choose one with --data-split)"
        )
    use_eval = eval_split is not None and eval_split != split and eval_split in data
    held_out = data[eval_split] if use_eval else None
    return data[split], held_out


def _is_saved_dataset(path: str) -> bool:
    return any(
        os.path.exists(os.path.join(path, name)) for name in ("state.json", "dataset_dict.json")
    )


def _looks_like_a_path(source: str) -> bool:
    """Whether ``source`` was meant as a local path (so a missing one is "no such file")."""
    if source.startswith((".", "/", "~")) or (os.sep != "/" and os.sep in source):
        return True
    return os.path.splitext(source)[1].lower() in FILE_FORMATS or source.count("/") > 1


def check_utf8(path: str) -> None:
    """Raise a DataError naming the line and byte where ``path`` stops being UTF-8 text (the
    json and csv readers would otherwise fail later, far from the file, or not at all)."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{path}: line {number}, byte {err.start + 1}: not UTF-8 text "
                    f"({err.reason}, {line[err.start : err.start + 1]!r}); save the file as UTF-8"
                ) from None


@contextlib.contextmanager
def quiet_datasets():
    """``datasets`` without its own log lines (its ``ERROR:datasets…`` line would come before our
    error saying the same) and, off a terminal, without progress bars; restored afterwards."""
    import datasets

    from jaxrlhf.logging import is_terminal

    verbosity = datasets.logging.get_verbosity()
    bars_were_on = not datasets.utils.are_progress_bars_disabled()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    if not is_terminal():
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars_were_on:
            datasets.enable_progress_bars()


def first_bad_json_line(path: str) -> str | None:
    """``"line N, column C: <the parser's message>"`` for the first line of a JSON-lines file that is not
    one JSON value (blank lines are allowed), else None."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as err:
                    return f"line {number}, column {err.colno}: {err.msg}"
    return None


def _read_file(path: str):
    import datasets

    ext = os.path.splitext(path)[1].lower()
    if ext not in FILE_FORMATS:
        raise DataError(
            f"{path}: unsupported file type {ext!r} (use one of {sorted(FILE_FORMATS)}, "
            "a dataset directory or a Hub dataset name)"
        )
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: the file is empty (no rows)")
    if FILE_FORMATS[ext] in ("json", "csv"):  # text formats
        check_utf8(path)
    try:
        with quiet_datasets():
            return datasets.load_dataset(FILE_FORMATS[ext], data_files=path, split="train")
    except Exception as e:
        where = first_bad_json_line(path) if ext == ".jsonl" else None
        reason = f"{where}; {_reason(e)}" if where else _reason(e)
        raise DataError(f"{path}: could not be read as {FILE_FORMATS[ext]} ({reason})") from e


def _reason(error: Exception) -> str:
    """The message of the reader's own error under ``datasets``' generic wrapper."""
    import datasets

    if isinstance(error, datasets.exceptions.DatasetGenerationError):
        cause = error.__cause__ or error.__context__
        if cause is not None:
            return f"{type(cause).__name__}: {cause}"
    return str(error)


def _read_directory(path: str, config: DataConfig):
    import datasets

    if _is_saved_dataset(path):
        try:
            return datasets.load_from_disk(path)
        except Exception as e:
            raise DataError(f"{path}: a save_to_disk directory that could not be read ({e})") from e
    try:
        with quiet_datasets():
            return datasets.load_dataset(path, config.config)
    except Exception as e:
        raise DataError(
            f"{path}: not a dataset directory (neither written by save_to_disk nor a folder of "
            f"json/jsonl/parquet/csv data files: {type(e).__name__}: {e})"
        ) from e


def _read_hub(name: str, config: DataConfig):
    """A Hub dataset through ``datasets.load_dataset``; offline, a cached snapshot of its repo."""
    import datasets

    try:
        with quiet_datasets():
            return datasets.load_dataset(name, config.config)
    except Exception as e:  # noqa: BLE001 — every failure becomes one error naming the dataset
        error = e
    if _offline():
        from huggingface_hub import snapshot_download

        try:
            folder = snapshot_download(name, repo_type="dataset", local_files_only=True)
        except Exception:  # noqa: BLE001 — not in the Hub cache either
            raise DataError(
                f"{name}: no such local file or directory, and the Hub dataset {name!r} is not in "
                "the local cache while offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set): "
                "download it first, or give a path"
            ) from error
        return _read_directory(folder, config)
    raise DataError(
        f"{name}: no such local file or directory, and the Hub dataset {name!r} could not be "
        f"loaded ({type(error).__name__}: {error})"
    ) from error


def load_splits(source: str | os.PathLike, config: DataConfig | None = None):
    """(training split, held-out split or None) of a local file, a dataset directory or a Hub
    dataset name (``config.split``, ``config.eval_split``, ``config.config``). Errors name
    ``source``."""
    config = config or DataConfig()
    source = os.fspath(source)
    if os.path.isfile(source):
        if config.split != "train":
            raise DataError(f"{source}: a single file has one split; --data-split does not apply")
        return _read_file(source), None
    if os.path.isdir(source):
        data = _read_directory(source, config)
    elif _looks_like_a_path(source):
        raise DataError(f"{source}: no such file or directory")
    else:
        data = _read_hub(source, config)
    return _pick(data, source, config.split, config.eval_split)


def load_dataset_file(path: str | os.PathLike, *, split: str = "train"):
    """Load a local ``.json``/``.jsonl``/``.parquet``/``.csv`` file or a dataset directory (its
    ``split``) as one ``datasets.Dataset``. Errors name the path."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or directory")
    return load_splits(path, DataConfig(split=split, eval_split=None))[0]
