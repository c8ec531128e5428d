"""Preference and prompt examples: the data config, validation, chat rendering and fixed-shape batches.

Two kinds of data feed RLHF:

* **preference data** (reward-model training): ``prompt``, ``chosen``, ``rejected``;
* **prompt data** (PPO rollouts): ``prompt``.

Each field is either plain text or a chat, i.e. a list of ``{"role": ..., "content": ...}`` messages
(trl's "conversational" format: the prompt holds the conversation so far, ``chosen``/``rejected`` the
assistant turn(s) that follow). Reading files and Hub datasets is :mod:`jaxrlhf.data.sources`; the
formats people have (implicit prompts, scores, renamed columns) become these columns in
:mod:`jaxrlhf.data.formats`; SFT examples are :mod:`jaxrlhf.data.sft`.

Rendering chats. With a tokenizer that has a ``chat_template``, the chat is rendered by
``tokenizer.apply_chat_template``; otherwise by the simple template of :func:`render_chat`::

    user: How are you?\\n
    assistant: Fine.\\n

A prompt chat is rendered with a generation prompt (a final ``"assistant:"``), and a response is the
rendering of prompt + response minus the rendering of the prompt, so that prompt text + response
text is exactly the rendered conversation.

Batches (numpy, fixed shapes so that jitted steps compile once per run):

* prompts are LEFT-padded to ``[N, P]``, so generation appends on the right;
* a prompt/response pair is ``[N, P + R]``: the prompt left-padded to P, then the response
  (followed by EOS) right-padded to R. The models compute positions as ``cumsum(mask) - 1``, so
  padding on both sides is harmless, and the reward model reads its score at the last position
  where the mask is 1 (the EOS).

P and R are the longest prompt / response present, rounded up to a multiple of 8 and capped by
``max_prompt_length`` / ``max_response_length`` (``padding="longest"``, the default: three-token
prompts are not padded to 32 positions, and a run compiles one program per width), or exactly those
limits (``padding="max_length"``).

Over-long examples raise an error naming the row, the column and the flags that fix it unless
``truncate=True``: prompts then keep their last ``max_prompt_length`` tokens, responses their first
``max_response_length - 1`` tokens (+ EOS); the number of truncated fields is returned
(``num_truncated``) and logged.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from typing import Any, Literal, NamedTuple

import numpy as np

from jaxrlhf.config import option, require

logger = logging.getLogger(__name__)

PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")
PROMPT_COLUMNS = ("prompt",)
PAD_MULTIPLE = 8  # padding="longest" rounds widths up to a multiple of this


class DataError(ValueError):
    """Bad input data; the message names the file, row and column."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the data comes from, which columns hold what, and how examples become token batches."""

    max_prompt_length: int = option(32, "Longest prompt P in tokens (prompts are left-padded).")
    max_response_length: int = option(
        32, "Longest response R in tokens, EOS included (responses are right-padded)."
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
    padding: Literal["longest", "max_length"] = option(
        "longest",
        "Pad to the longest example present, rounded up to a multiple of 8 and capped by the max "
        "lengths (longest), or always to the max lengths (max_length).",
    )
    prompt_column: str = option("prompt", "Column of the prompts (preference, PPO and SFT data).")
    chosen_column: str = option("chosen", "Column of the preferred responses.")
    rejected_column: str = option("rejected", "Column of the dispreferred responses.")
    completion_column: str = option(
        "completion", "Column of the completions (SFT prompt/completion data)."
    )
    text_column: str = option("text", "Column of whole texts (SFT text data).")
    messages_column: str = option("messages", "Column of chats (SFT conversational data).")
    split: str = option("train", "Split of a dataset directory or Hub dataset to train on.")
    eval_split: str | None = option(
        "test",
        "Held-out split, used when the dataset has it (else a seeded fraction of the training "
        "split is held out); None: never.",
    )
    config: str | None = option(None, "Configuration (subset) name of a Hub dataset.")

    def __post_init__(self):
        require(self.max_prompt_length >= 1, self, "max_prompt_length", "must be >= 1")
        require(
            self.max_response_length >= 1 + int(self.append_eos),
            self,
            "max_response_length",
            "must leave room for at least one token before EOS",
        )
        require(
            self.padding in ("longest", "max_length"),
            self,
            "padding",
            "must be 'longest' or 'max_length'",
        )
        for name in (
            "prompt_column",
            "chosen_column",
            "rejected_column",
            "completion_column",
            "text_column",
            "messages_column",
            "split",
        ):
            require(bool(getattr(self, name)), self, name, "must be a non-empty name")


def padded_length(longest: int, limit: int, padding: str) -> int:
    """The width that rows of at most ``longest`` tokens are padded to: ``limit`` for
    ``padding="max_length"``; else ``longest`` rounded up to a multiple of 8, at most ``limit``."""
    if padding == "max_length":
        return limit
    return min(limit, max(1, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE))


# ----------------------------------------------------------------------------------------------
# Validation and chat rendering
# ----------------------------------------------------------------------------------------------


def is_chat(value: Any) -> bool:
    """Whether a field is a chat (a list of messages) rather than text."""
    return isinstance(value, (list, tuple))


def validate_field(value: Any, where: str, *, kind: str | None = None) -> str:
    """Check one field (a non-empty string or a non-empty list of role/content messages) and
    return its kind, ``"text"`` or ``"chat"``; ``kind`` requires one of them."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: empty text")
        found = "text"
    elif is_chat(value):
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
        found = "chat"
    else:
        raise DataError(
            f"{where}: expected a non-empty string or a list of {{'role', 'content'}} messages, "
            f"got {type(value).__name__} {value!r}"
        )
    if kind is not None and found != kind:
        expected = "a list of messages" if kind == "chat" else "a string"
        raise DataError(f"{where}: expected {expected}, got {found}")
    return found


def validate_examples(data, columns: Sequence[str], *, source: str = "dataset") -> str | None:
    """Check that ``data`` (a ``datasets.Dataset`` or a list of dicts) has ``columns`` and that
    every field is a non-empty string or a list of messages, all rows of one kind.

    Raises ``DataError("<source>: row i, column 'c': ...")``; returns the kind ("text" / "chat").
    """
    if isinstance(data, list):
        for i, row in enumerate(data):
            missing = [c for c in columns if c not in row]
            if missing:
                raise DataError(f"{source}: row {i}: missing column(s) {missing}")
    else:
        missing = [c for c in columns if c not in data.column_names]
        if missing:
            raise DataError(
                f"{source}: missing column(s) {missing}; found {data.column_names} "
                f"(expected {list(columns)})"
            )
    rows = data if isinstance(data, list) else data.select_columns(list(columns))
    if len(rows) == 0:
        raise DataError(f"{source}: no rows")
    kind = None
    for i, row in enumerate(rows):
        for c in columns:
            where = f"{source}: row {i}, column {c!r}"
            row_kind = validate_field(row[c], where)
            if kind is None:
                kind = row_kind
            elif row_kind != kind:
                raise DataError(f"{where}: is {row_kind} but earlier fields are {kind}")
    return kind


def render_chat(messages: Sequence[dict], *, add_generation_prompt: bool = False) -> str:
    """The built-in chat template: one ``"{role}: {content}\\n"`` line per message, then
    ``"assistant:"`` when ``add_generation_prompt``."""
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return text + ("assistant:" if add_generation_prompt else "")


def render(tokenizer, messages, *, add_generation_prompt: bool, tools=None) -> str:
    """A chat as text: the tokenizer's chat template when it has one (``tools``: JSON schemas the
    template lists for the model, ``tools.tool_schema``), else :func:`render_chat`."""
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    template = getattr(tokenizer, "chat_template", None)
    if template:
        return tokenizer.apply_chat_template(messages, tokenize=False, tools=tools or None,
                                             add_generation_prompt=add_generation_prompt)  # fmt: skip
    return render_chat(messages, add_generation_prompt=add_generation_prompt)


def render_prompt(prompt, tokenizer=None, tools=None) -> str:
    """Text of a prompt: itself, or its chat rendered with a generation prompt."""
    if isinstance(prompt, str):
        return prompt
    return render(tokenizer, prompt, add_generation_prompt=True, tools=tools)


def render_response(prompt, response, tokenizer=None, *, where: str = "response") -> str:
    """Text of a response: itself, or the rendering of prompt+response minus that of the prompt."""
    if isinstance(response, str):
        return response
    prompt_text = render_prompt(prompt, tokenizer)
    full = render(tokenizer, list(prompt) + list(response), add_generation_prompt=False)
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


def eos_id(tokenizer, config: DataConfig) -> int | None:
    """The EOS id appended to responses (None when ``config.append_eos`` is off)."""
    if not config.append_eos:
        return None
    eos = special_id(tokenizer, "eos")
    if eos is None:
        raise DataError(
            "the tokenizer has no EOS token but DataConfig.append_eos=True (pass --no-data-append-eos)"
        )
    return int(eos)


class PromptBatch(NamedTuple):
    """Left-padded prompts."""

    input_ids: np.ndarray  # [N, P] int32
    attention_mask: np.ndarray  # [N, P] int32, 0 on the left padding
    num_truncated: int  # prompts that were cut to max_prompt_length tokens


class PairBatch(NamedTuple):
    """Prompt + chosen / rejected response sequences (prompt left-padded, response right-padded)."""

    chosen_ids: np.ndarray  # [N, P + R] int32
    chosen_mask: np.ndarray  # [N, P + R] int32
    rejected_ids: np.ndarray  # [N, P + R] int32
    rejected_mask: np.ndarray  # [N, P + R] int32
    num_truncated: int  # fields (prompts or responses) that were cut
    prompt_length: int = 0  # P: columns before it hold the prompt, from it on the response


# What each limit is called on the command line (the data layer's errors name the fix).
LIMIT_FLAGS = {
    "max_prompt_length": "--data-max-prompt-length",
    "max_response_length": "--data-max-response-length",
}


def fit(ids: list[int], limit: int, *, keep: str, truncate: bool, where: str, what: str):
    """(``ids`` cut to ``limit`` tokens keeping the "start" or "end", whether it was cut); an
    error naming ``where`` and the flags that fix it when too long and not ``truncate``."""
    if len(ids) <= limit:
        return ids, False
    if not truncate:
        flags = " and ".join(flag for name, flag in LIMIT_FLAGS.items() if name in what)
        raise DataError(
            f"{where}: {len(ids)} tokens > {what} (raise {flags}, or cut it with --data-truncate)"
        )
    return (ids[-limit:] if keep == "end" else ids[:limit]), True


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


def encode_prompt(prompt, tokenizer, config: DataConfig, where: str, tools=None):
    """Token ids of a (rendered) prompt within ``max_prompt_length``, and whether it was cut."""
    P = config.max_prompt_length
    return fit(
        encode(tokenizer, render_prompt(prompt, tokenizer, tools)),
        P,
        keep="end",
        truncate=config.truncate,
        where=where,
        what=f"max_prompt_length={P}",
    )


def encode_response(
    prompt, response, tokenizer, config: DataConfig, where: str, eos: int | None
) -> tuple[list[int], bool]:
    """Token ids of a (rendered) response + EOS within ``max_response_length``, and whether it
    was cut (responses keep their start; the EOS is always kept)."""
    R = config.max_response_length
    room = R - int(eos is not None)
    ids, cut = fit(
        encode(tokenizer, render_response(prompt, response, tokenizer, where=where)),
        room,
        keep="start",
        truncate=config.truncate,
        where=where,
        what=f"max_response_length={R} - 1 (room for EOS)"
        if eos is not None
        else f"max_response_length={R}",
    )
    return ids + ([eos] if eos is not None else []), cut


def tokenize_prompts(
    data, tokenizer, config: DataConfig, *, source: str = "dataset", tools=None
) -> PromptBatch:
    """Prompt column of ``data`` (Dataset, list of dicts or dict of lists) → left-padded ``[N, P]``,
    P the longest prompt rounded up to a multiple of 8 (at most ``max_prompt_length``), or
    ``max_prompt_length`` with ``padding="max_length"``."""
    rows = _rows(data, PROMPT_COLUMNS)
    validate_examples(rows, PROMPT_COLUMNS, source=source)
    encoded, cut = [], 0
    for i, row in enumerate(rows):
        ids, was_cut = encode_prompt(
            row["prompt"], tokenizer, config, f"{source}: row {i}, column 'prompt'", tools
        )
        encoded.append(ids)
        cut += was_cut
    if cut:
        logger.warning(
            "%s: truncated %d of %d prompts to %d tokens",
            source,
            cut,
            len(rows),
            config.max_prompt_length,
        )
    P = padded_length(max(map(len, encoded)), config.max_prompt_length, config.padding)
    ids, mask = left_pad(encoded, P, pad_id(tokenizer))
    return PromptBatch(ids, mask, cut)


def tokenize_pairs(data, tokenizer, config: DataConfig, *, source: str = "dataset") -> PairBatch:
    """Preference data (``prompt``, ``chosen``, ``rejected``; see :mod:`jaxrlhf.data.formats` for
    other layouts) → prompt+chosen and prompt+rejected sequences ``[N, P + R]`` with masks.

    Each sequence is ``[pad … pad, prompt, response, EOS, pad … pad]``: the prompt is left-padded
    to P, the response (+ EOS when ``config.append_eos``) right-padded to R (P, R: the longest
    present, rounded up to a multiple of 8 and capped by the max lengths; or the max lengths).
    """
    rows = _rows(data, PREFERENCE_COLUMNS)
    validate_examples(rows, PREFERENCE_COLUMNS, source=source)
    eos = eos_id(tokenizer, config)
    prompts, chosen, rejected, cut = [], [], [], 0
    for i, row in enumerate(rows):
        ids, was_cut = encode_prompt(
            row["prompt"], tokenizer, config, f"{source}: row {i}, column 'prompt'"
        )
        prompts.append(ids)
        cut += was_cut
        for column, out in (("chosen", chosen), ("rejected", rejected)):
            where = f"{source}: row {i}, column {column!r}"
            ids, was_cut = encode_response(
                row["prompt"], row[column], tokenizer, config, where, eos
            )
            out.append(ids)
            cut += was_cut
    if cut:
        logger.warning("%s: truncated %d fields of %d pairs", source, cut, len(rows))
    pad = pad_id(tokenizer)
    P = padded_length(max(map(len, prompts)), config.max_prompt_length, config.padding)
    R = padded_length(max(map(len, chosen + rejected)), config.max_response_length, config.padding)
    prompt_ids, prompt_mask = left_pad(prompts, P, pad)  # [N, P]
    out = []
    for responses in (chosen, rejected):
        response_ids, response_mask = right_pad(responses, R, pad)  # [N, R]
        out.append(np.concatenate([prompt_ids, response_ids], axis=1))  # [N, P + R]
        out.append(np.concatenate([prompt_mask, response_mask], axis=1))  # [N, P + R]
    return PairBatch(*out, cut, P)


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
