"""Preference and prompt datasets: loading, validation, chat rendering and fixed-shape batches.

Two kinds of data feed RLHF:

* **preference data** (reward-model training): columns ``prompt``, ``chosen``, ``rejected``;
* **prompt data** (PPO rollouts): a ``prompt`` column.

Each field is either plain text or a chat, i.e. a list of ``{"role": ..., "content": ...}`` messages
(trl's "conversational" format: the prompt holds the conversation so far, ``chosen``/``rejected`` the
assistant turn(s) that follow). Files are read through the ``datasets`` library: ``.json``, ``.jsonl``,
``.parquet``, ``.csv`` or a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``.

Rendering chats. With a tokenizer that has a ``chat_template``, the chat is rendered by
``tokenizer.apply_chat_template``; otherwise by the simple template of :func:`render_chat`::

    user: How are you?\\n
    assistant: Fine.\\n

A prompt chat is rendered with a generation prompt (a final ``"assistant:"``), and a response is the
rendering of prompt + response minus the rendering of the prompt, so that prompt text + response
text is exactly the rendered conversation.

Batches (numpy, fixed shapes so that jitted steps compile once):

* prompts are LEFT-padded to ``[N, P]`` (P = ``max_prompt_length``), so generation appends on the right;
* a prompt/response pair is ``[N, P + R]``: the prompt left-padded to P, then the response
  (followed by EOS) right-padded to R. The models compute positions as ``cumsum(mask) - 1``, so
  padding on both sides is harmless, and the reward model reads its score at the last position
  where the mask is 1 (the EOS).

Over-long examples raise an error naming the row and column unless ``truncate=True``: prompts then
keep their last ``max_prompt_length`` tokens, responses their first ``max_response_length - 1``
tokens (+ EOS); the number of truncated fields is returned (``num_truncated``) and logged.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

from jaxrlhf.config import option, require

logger = logging.getLogger(__name__)

PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")
PROMPT_COLUMNS = ("prompt",)
FILE_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(ValueError):
    """Bad input data; the message names the file, row and column."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """How text examples become fixed-shape token batches."""

    max_prompt_length: int = option(32, "Prompt length P in tokens (prompts are left-padded to P).")
    max_response_length: int = option(
        32, "Response length R in tokens, EOS included (responses are right-padded to R)."
    )
    truncate: bool = option(
        False,
        "Truncate over-long examples (prompts keep their end, responses their start) "
        "instead of raising an error; the count is reported.",
    )
    append_eos: bool = option(
        True,
        "Append the tokenizer's EOS to every response (the reward model reads its score there).",
    )

    def __post_init__(self):
        require(self.max_prompt_length >= 1, self, "max_prompt_length", "must be >= 1")
        require(
            self.max_response_length >= 1 + int(self.append_eos),
            self,
            "max_response_length",
            "must leave room for at least one token before EOS",
        )


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def load_dataset_file(path: str | os.PathLike, *, split: str = "train"):
    """Load a local ``.json``/``.jsonl``/``.parquet``/``.csv`` file or a ``save_to_disk`` directory.

    A saved ``DatasetDict`` directory yields its ``split``. Errors name the path.
    """
    import datasets

    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        try:
            data = datasets.load_from_disk(path)
        except Exception as e:  # datasets raises FileNotFoundError for non-dataset dirs
            raise DataError(f"{path}: not a dataset directory written by save_to_disk ({e})") from e
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise DataError(f"{path}: no split {split!r} (has {sorted(data)})")
            data = data[split]
        return data
    ext = os.path.splitext(path)[1].lower()
    if ext not in FILE_FORMATS:
        raise DataError(
            f"{path}: unsupported file type {ext!r} (use one of {sorted(FILE_FORMATS)} "
            "or a save_to_disk directory)"
        )
    try:
        return datasets.load_dataset(FILE_FORMATS[ext], data_files=path, split="train")
    except Exception as e:
        raise DataError(f"{path}: could not be read as {FILE_FORMATS[ext]} ({e})") from e


def _check_columns(data, columns: Sequence[str], source: str):
    missing = [c for c in columns if c not in data.column_names]
    if missing:
        raise DataError(
            f"{source}: missing column(s) {missing}; found {data.column_names} "
            f"(expected {list(columns)})"
        )


def load_preference_dataset(path: str | os.PathLike, *, split: str = "train"):
    """Load and validate preference data (``prompt``, ``chosen``, ``rejected`` columns)."""
    data = load_dataset_file(path, split=split)
    validate_examples(data, PREFERENCE_COLUMNS, source=os.fspath(path))
    return data


def load_prompt_dataset(path: str | os.PathLike, *, split: str = "train"):
    """Load and validate prompt-only data (a ``prompt`` column) for PPO."""
    data = load_dataset_file(path, split=split)
    validate_examples(data, PROMPT_COLUMNS, source=os.fspath(path))
    return data


# ----------------------------------------------------------------------------------------------
# Validation and chat rendering
# ----------------------------------------------------------------------------------------------


def _is_chat(value: Any) -> bool:
    return isinstance(value, (list, tuple))


def _validate_field(value: Any, where: str):
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: empty text")
        return
    if _is_chat(value):
        if len(value) == 0:
            raise DataError(f"{where}: empty message list")
        for j, message in enumerate(value):
            if not isinstance(message, dict) or not {"role", "content"} <= set(message):
                raise DataError(
                    f"{where}: message {j} must be a dict with 'role' and 'content', got {message!r}"
                )
            for key in ("role", "content"):
                if not isinstance(message[key], str) or not message[key].strip():
                    raise DataError(f"{where}: message {j} has an empty or non-string {key!r}")
        return
    raise DataError(
        f"{where}: expected a non-empty string or a list of {{'role', 'content'}} messages, "
        f"got {type(value).__name__} {value!r}"
    )


def validate_examples(data, columns: Sequence[str], *, source: str = "dataset"):
    """Check that ``data`` (a ``datasets.Dataset`` or a list of dicts) has ``columns`` and that
    every field is a non-empty string or a list of messages, all rows of one kind.

    Raises ``DataError("<source>: row i, column 'c': ...")``.
    """
    if isinstance(data, list):
        for i, row in enumerate(data):
            missing = [c for c in columns if c not in row]
            if missing:
                raise DataError(f"{source}: row {i}: missing column(s) {missing}")
    else:
        _check_columns(data, columns, source)
    rows = data if isinstance(data, list) else data.select_columns(list(columns))
    if len(rows) == 0:
        raise DataError(f"{source}: no rows")
    kind = None
    for i, row in enumerate(rows):
        for c in columns:
            where = f"{source}: row {i}, column {c!r}"
            _validate_field(row[c], where)
            row_kind = "chat" if _is_chat(row[c]) else "text"
            if kind is None:
                kind = row_kind
            elif row_kind != kind:
                raise DataError(f"{where}: is {row_kind} but earlier fields are {kind}")


def render_chat(messages: Sequence[dict], *, add_generation_prompt: bool = False) -> str:
    """The built-in chat template: one ``"{role}: {content}\\n"`` line per message, then
    ``"assistant:"`` when ``add_generation_prompt``."""
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return text + ("assistant:" if add_generation_prompt else "")


def _render(tokenizer, messages, *, add_generation_prompt: bool) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if template:
        return tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
    return render_chat(messages, add_generation_prompt=add_generation_prompt)


def render_prompt(prompt, tokenizer=None) -> str:
    """Text of a prompt: itself, or its chat rendered with a generation prompt."""
    if isinstance(prompt, str):
        return prompt
    return _render(tokenizer, prompt, add_generation_prompt=True)


def render_response(prompt, response, tokenizer=None, *, where: str = "response") -> str:
    """Text of a response: itself, or the rendering of prompt+response minus that of the prompt."""
    if isinstance(response, str):
        return response
    prompt_text = render_prompt(prompt, tokenizer)
    full = _render(tokenizer, list(prompt) + list(response), add_generation_prompt=False)
    if not full.startswith(prompt_text):
        raise DataError(
            f"{where}: the chat template does not render the prompt as a prefix of "
            "prompt + response, so the response cannot be split off"
        )
    return full[len(prompt_text) :]


# ----------------------------------------------------------------------------------------------
# Tokenisation
# ----------------------------------------------------------------------------------------------


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (a transformers or a ``tokenizers`` tokenizer)."""
    import tokenizers

    if isinstance(tokenizer, tokenizers.Tokenizer):
        return tokenizer.encode(text, add_special_tokens=False).ids
    return list(tokenizer.encode(text, add_special_tokens=False))


def decode(tokenizer, ids: Sequence[int]) -> str:
    """Text of token ids, special tokens skipped."""
    return tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


def special_id(tokenizer, name: str) -> int | None:
    """``pad_token_id`` / ``eos_token_id`` of a transformers tokenizer, or of a ``tokenizers``
    tokenizer whose vocabulary has ``<pad>`` / ``<eos>``."""
    value = getattr(tokenizer, f"{name}_token_id", None)
    if value is None and hasattr(tokenizer, "token_to_id"):
        value = tokenizer.token_to_id(f"<{name}>")
    return value


def pad_id(tokenizer) -> int:
    """The id used for padding: the pad token, else EOS, else 0."""
    for name in ("pad", "eos"):
        value = special_id(tokenizer, name)
        if value is not None:
            return int(value)
    return 0


class PromptBatch(NamedTuple):
    """Left-padded prompts."""

    input_ids: np.ndarray  # [N, P] int32
    attention_mask: np.ndarray  # [N, P] int32, 0 on the left padding
    num_truncated: int  # prompts that were cut to P tokens


class PairBatch(NamedTuple):
    """Prompt + chosen / rejected response sequences (prompt left-padded, response right-padded)."""

    chosen_ids: np.ndarray  # [N, P + R] int32
    chosen_mask: np.ndarray  # [N, P + R] int32
    rejected_ids: np.ndarray  # [N, P + R] int32
    rejected_mask: np.ndarray  # [N, P + R] int32
    num_truncated: int  # fields (prompts or responses) that were cut


def _fit(ids: list[int], length: int, *, keep: str, truncate: bool, where: str, what: str):
    if len(ids) <= length:
        return ids, False
    if not truncate:
        raise DataError(
            f"{where}: {len(ids)} tokens > {what}={length} "
            "(shorten it, raise the limit or set truncate=True)"
        )
    return (ids[-length:] if keep == "end" else ids[:length]), True


def left_pad(rows: Sequence[Sequence[int]], length: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """``[N, length]`` ids and 0/1 mask, each row right-aligned (padding on the left)."""
    ids = np.full((len(rows), length), pad, np.int32)  # [N, L]
    mask = np.zeros((len(rows), length), np.int32)  # [N, L]
    for i, row in enumerate(rows):
        if len(row):
            ids[i, length - len(row) :] = row
            mask[i, length - len(row) :] = 1
    return ids, mask


def right_pad(
    rows: Sequence[Sequence[int]], length: int, pad: int
) -> tuple[np.ndarray, np.ndarray]:
    """``[N, length]`` ids and 0/1 mask, each row left-aligned (padding on the right)."""
    ids = np.full((len(rows), length), pad, np.int32)  # [N, L]
    mask = np.zeros((len(rows), length), np.int32)  # [N, L]
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return ids, mask


def _rows(data, columns):
    if isinstance(data, dict):
        n = len(data[columns[0]])
        return [{c: data[c][i] for c in columns} for i in range(n)]
    if isinstance(data, list):
        return data
    return list(data.select_columns(list(columns)))


def tokenize_prompts(
    data, tokenizer, config: DataConfig, *, source: str = "dataset"
) -> PromptBatch:
    """Prompt column of ``data`` (Dataset, list of dicts or dict of lists) → left-padded ``[N, P]``."""
    rows = _rows(data, PROMPT_COLUMNS)
    validate_examples(rows, PROMPT_COLUMNS, source=source)
    P = config.max_prompt_length
    encoded, cut = [], 0
    for i, row in enumerate(rows):
        where = f"{source}: row {i}, column 'prompt'"
        ids, was_cut = _fit(
            encode(tokenizer, render_prompt(row["prompt"], tokenizer)),
            P,
            keep="end",
            truncate=config.truncate,
            where=where,
            what="max_prompt_length",
        )
        encoded.append(ids)
        cut += was_cut
    if cut:
        logger.warning("%s: truncated %d of %d prompts to %d tokens", source, cut, len(rows), P)
    ids, mask = left_pad(encoded, P, pad_id(tokenizer))
    return PromptBatch(ids, mask, cut)


def tokenize_pairs(data, tokenizer, config: DataConfig, *, source: str = "dataset") -> PairBatch:
    """Preference data → prompt+chosen and prompt+rejected sequences ``[N, P + R]`` with masks.

    Each sequence is ``[pad … pad, prompt, response, EOS, pad … pad]``: the prompt is left-padded
    to P, the response (+ EOS when ``config.append_eos``) right-padded to R.
    """
    rows = _rows(data, PREFERENCE_COLUMNS)
    validate_examples(rows, PREFERENCE_COLUMNS, source=source)
    P, R = config.max_prompt_length, config.max_response_length
    eos = special_id(tokenizer, "eos")
    if config.append_eos and eos is None:
        raise DataError("the tokenizer has no EOS token but DataConfig.append_eos=True")
    prompts, chosen, rejected, cut = [], [], [], 0
    for i, row in enumerate(rows):
        ids, was_cut = _fit(
            encode(tokenizer, render_prompt(row["prompt"], tokenizer)),
            P,
            keep="end",
            truncate=config.truncate,
            where=f"{source}: row {i}, column 'prompt'",
            what="max_prompt_length",
        )
        prompts.append(ids)
        cut += was_cut
        for column, out in (("chosen", chosen), ("rejected", rejected)):
            where = f"{source}: row {i}, column {column!r}"
            text = render_response(row["prompt"], row[column], tokenizer, where=where)
            ids, was_cut = _fit(
                encode(tokenizer, text),
                R - int(config.append_eos),
                keep="start",
                truncate=config.truncate,
                where=where,
                what="max_response_length - 1 (room for EOS)"
                if config.append_eos
                else "max_response_length",
            )
            out.append(ids + ([int(eos)] if config.append_eos else []))
            cut += was_cut
    if cut:
        logger.warning("%s: truncated %d fields of %d pairs", source, cut, len(rows))
    pad = pad_id(tokenizer)
    prompt_ids, prompt_mask = left_pad(prompts, P, pad)  # [N, P]
    out = []
    for responses in (chosen, rejected):
        response_ids, response_mask = right_pad(responses, R, pad)  # [N, R]
        out.append(np.concatenate([prompt_ids, response_ids], axis=1))  # [N, P + R]
        out.append(np.concatenate([prompt_mask, response_mask], axis=1))  # [N, P + R]
    return PairBatch(*out, cut)


def iterate_batches(
    arrays: dict[str, np.ndarray] | Sequence[np.ndarray],
    batch_size: int,
    rng: np.random.Generator | None,
    *,
    drop_last: bool = True,
) -> Iterator:
    """One epoch of minibatches of equal-length arrays, shuffled by ``rng`` (in order if None).

    Yields the same container type (dict or tuple) with each array indexed by the batch rows.
    """
    if isinstance(arrays, dict):
        keys, values = list(arrays), list(arrays.values())
    else:
        keys, values = None, list(arrays)
    n = len(values[0])
    if any(len(v) != n for v in values):
        raise ValueError("iterate_batches: arrays have different lengths")
    order = rng.permutation(n) if rng is not None else np.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        index = order[start : start + batch_size]
        batch = [v[index] for v in values]
        yield dict(zip(keys, batch)) if keys is not None else tuple(batch)
