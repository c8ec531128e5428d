"""SFT examples: the three formats of supervised fine-tuning data, as token sequences with a loss mask.

| format | columns | the loss counts (``completion_only_loss=True``, the default) |
|---|---|---|
| text | ``text`` | every token (+ EOS) |
| prompt / completion | ``prompt`` + ``completion`` (text, or message lists) | the completion (+ EOS) only |
| conversational | ``messages`` (a list of role/content messages) | the assistant turns (+ EOS after a final one) only |

(The columns are renamed with ``--data-text-column``, ``--data-prompt-column``,
``--data-completion-column``, ``--data-messages-column``.) ``completion_only_loss=False`` counts
every token. A sequence is ``[tokens, EOS, pad …]`` (right-padded); ``loss_mask[b, t] = 1`` marks
the tokens t that are *targets* of the next-token loss. The prompt and the completion are tokenised
separately, as the PPO and reward-model batches tokenise them, and a chat is rendered turn by turn
(the tokenizer's chat template, else :func:`jaxrlhf.data.preference.render_chat`), so that each
assistant turn is exactly the text the template adds for it::

    "user: how was it ?\\nassistant:" │ " great .\\n" │ EOS          (messages)
     loss_mask 0 …                 0 │ 1 …       1 │ 1

Lengths: a prompt fits in ``max_prompt_length`` and a completion (+ EOS) in
``max_response_length``; a text or a chat in their sum. Sequences are padded to the longest present,
rounded up to a multiple of 8 (``padding="longest"``), or to that sum (``"max_length"``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from jaxrlhf.data.formats import _count, _report, template_note
from jaxrlhf.data.preference import (
    DataConfig,
    DataError,
    encode,
    encode_prompt,
    encode_response,
    eos_id,
    fit,
    pad_id,
    padded_length,
    render,
    right_pad,
    validate_field,
)
from jaxrlhf.data.sources import load_splits

logger = logging.getLogger(__name__)

SFT_FORMATS = ("messages", "prompt-completion", "text")


class SFTBatch(NamedTuple):
    """Right-padded SFT sequences and which of their tokens the loss counts."""

    input_ids: np.ndarray  # [N, T] int32
    attention_mask: np.ndarray  # [N, T] int32, 0 on the right padding
    loss_mask: np.ndarray  # [N, T] int32, 1 at the tokens that are targets of the loss
    num_truncated: int  # sequences that were cut


class SFTData(NamedTuple):
    """SFT rows (``text``; ``prompt`` + ``completion``; or ``messages``) of a training split and,
    when the dataset has one, of its held-out split."""

    train: list[dict]
    eval: list[dict] | None
    format: str  # one of SFT_FORMATS
    description: str  # the one line reported at load time


def detect_sft_format(columns, config: DataConfig, *, source: str = "dataset") -> str:
    """``"messages"`` if the messages column is present, else ``"prompt-completion"`` if the prompt
    and completion columns are, else ``"text"`` if the text column is; else a DataError."""
    if config.messages_column in columns:
        return "messages"
    if config.prompt_column in columns and config.completion_column in columns:
        return "prompt-completion"
    if config.text_column in columns:
        return "text"
    raise DataError(
        f"{source}: found columns {list(columns)}, but SFT data needs a {config.text_column!r} "
        f"column, {config.prompt_column!r} + {config.completion_column!r} columns, or a "
        f"{config.messages_column!r} column (name yours with --data-text-column, "
        "--data-prompt-column / --data-completion-column, --data-messages-column)"
    )


def sft_rows(data, config: DataConfig | None = None, *, source: str = "dataset"):
    """(rows with the canonical keys of their format, the format), validated; errors name the row
    and the column as the data has them."""
    config = config or DataConfig()
    columns = (
        list(data[0]) if isinstance(data, list) and data else getattr(data, "column_names", [])
    )
    if len(data) == 0:
        raise DataError(f"{source}: no rows")
    fmt = detect_sft_format(columns, config, source=source)
    names = {
        "messages": {"messages": config.messages_column},
        "prompt-completion": {
            "prompt": config.prompt_column,
            "completion": config.completion_column,
        },
        "text": {"text": config.text_column},
    }[fmt]
    rows = data if isinstance(data, list) else data.select_columns(list(names.values()))
    out, kind = [], {"messages": "chat", "text": "text"}.get(fmt)
    for i, row in enumerate(rows):
        example = {}
        for key, column in names.items():
            if column not in row:
                raise DataError(f"{source}: row {i}: missing column {column!r}")
            found = validate_field(row[column], f"{source}: row {i}, column {column!r}", kind=kind)
            kind = kind or found  # prompt / completion: all text, or all chats
            example[key] = row[column]
        out.append(example)
    return out, fmt


def load_sft_dataset(
    source: str | os.PathLike,
    config: DataConfig | None = None,
    *,
    report: Callable[[str], None] | None = None,
    tokenizer=None,
) -> SFTData:
    """Load SFT data (a file, a dataset directory or a Hub name) with its held-out split, if any;
    ``report`` receives the one-line description of the format (with ``tokenizer``, also whether
    chats will be rendered by the built-in template)."""
    config = config or DataConfig()
    source = os.fspath(source)
    train, held_out = load_splits(source, config)
    rows, fmt = sft_rows(train, config, source=source)
    eval_rows = None
    if held_out is not None and len(held_out):
        eval_rows, _ = sft_rows(held_out, config, source=f"{source} [{config.eval_split}]")
    loss = {
        "messages": "loss on the assistant turns",
        "prompt-completion": "loss on the completions",
        "text": "loss on every token",
    }[fmt]
    line = f"{source}: SFT {fmt} format ({loss} unless --no-sft-completion-only-loss); "
    line += _count(len(rows), "example")
    if template := template_note(tokenizer, "chat" if fmt == "messages" else "text"):
        line += f"; {template}"
    if eval_rows is not None:
        line += f" + {len(eval_rows)} held out (split {config.eval_split!r})"
    _report(report, line)
    return SFTData(rows, eval_rows, fmt, line)


def chat_segments(messages, tokenizer=None, *, where: str = "messages") -> list[tuple[str, bool]]:
    """The rendered chat cut into (text, is_assistant_turn) pieces whose concatenation is the
    whole rendering: each assistant turn is what the template adds for it after the generation
    prompt of the conversation before it."""
    pieces, done = [], ""
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:k], add_generation_prompt=True)
        after = render(tokenizer, messages[: k + 1], add_generation_prompt=False)
        if not (before.startswith(done) and after.startswith(before)):
            raise DataError(
                f"{where}: the chat template does not render the conversation before assistant "
                f"message {k} as a prefix of the conversation with it, so the turn cannot be "
                "located for the loss"
            )
        pieces += [(before[len(done) :], False), (after[len(before) :], True)]
        done = after
    full = render(tokenizer, messages, add_generation_prompt=False)
    if not full.startswith(done):
        raise DataError(f"{where}: the chat template renders a prefix of the chat differently")
    pieces.append((full[len(done) :], False))
    return [(text, is_turn) for text, is_turn in pieces if text]


def encode_sft(
    example: dict,
    tokenizer,
    config: DataConfig,
    *,
    completion_only_loss: bool = True,
    where: str = "example",
) -> tuple[list[int], list[int], bool]:
    """(token ids, 0/1 target flags, whether it was cut) of one SFT example (+ EOS)."""
    eos = eos_id(tokenizer, config)
    if "prompt" in example:
        prompt_ids, cut_p = encode_prompt(
            example["prompt"], tokenizer, config, f"{where}, column 'prompt'"
        )
        completion_ids, cut_c = encode_response(
            example["prompt"],
            example["completion"],
            tokenizer,
            config,
            f"{where}, column 'completion'",
            eos,
        )
        targets = [0] * len(prompt_ids) + [1] * len(completion_ids)
        ids = prompt_ids + completion_ids
        cut = cut_p or cut_c
    else:
        if "messages" in example:
            pieces = chat_segments(example["messages"], tokenizer, where=f"{where}, 'messages'")
        else:
            pieces = [(example["text"], True)]
        ids, targets = [], []
        for text, counted in pieces:
            piece = encode(tokenizer, text)
            ids += piece
            targets += [int(counted)] * len(piece)
        limit = config.max_prompt_length + config.max_response_length
        room = limit - int(eos is not None)
        ids, cut = fit(
            ids,
            room,
            keep="start",
            truncate=config.truncate,
            where=where,
            what=f"max_prompt_length + max_response_length = {limit}"
            + (" - 1 (room for EOS)" if eos is not None else ""),
        )
        targets = targets[: len(ids)]
        if eos is not None:
            ids, targets = ids + [eos], targets + [targets[-1] if targets else 1]
    if not completion_only_loss:
        targets = [1] * len(ids)
    return ids, targets, cut


def tokenize_sft(
    rows,
    tokenizer,
    config: DataConfig,
    *,
    completion_only_loss: bool = True,
    source: str = "dataset",
) -> SFTBatch:
    """SFT rows (from :func:`load_sft_dataset` / :func:`sft_rows`) → right-padded ``[N, T]`` ids,
    attention mask and loss mask (which tokens are targets: see the module table)."""
    sequences, targets, cut = [], [], 0
    for i, example in enumerate(rows):
        ids, flags, was_cut = encode_sft(
            example,
            tokenizer,
            config,
            completion_only_loss=completion_only_loss,
            where=f"{source}: row {i}",
        )
        sequences.append(ids)
        targets.append(flags)
        cut += was_cut
    if not sequences:
        raise DataError(f"{source}: no rows")
    if cut:
        logger.warning("%s: truncated %d of %d SFT examples", source, cut, len(sequences))
    limit = config.max_prompt_length + config.max_response_length
    T = padded_length(max(map(len, sequences)), limit, config.padding)
    ids, mask = right_pad(sequences, T, pad_id(tokenizer))  # [N, T] each
    loss_mask, _ = right_pad(targets, T, 0)  # [N, T] (the flags themselves, 0 on the padding)
    return SFTBatch(ids, mask, loss_mask, cut)
