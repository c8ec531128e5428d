"""The preference-data formats people have, detected from the columns, as prompt/chosen/rejected rows.

| format | columns | the prompt |
|---|---|---|
| explicit | ``prompt`` + ``chosen`` + ``rejected`` (text, or message lists) | the ``prompt`` column |
| implicit prompt, text (Anthropic HH-RLHF) | ``chosen`` + ``rejected``, each a whole ``"\\n\\nHuman: … \\n\\nAssistant: …"`` transcript | their longest shared prefix, cut back to the last ``"\\n\\nAssistant:"`` (inclusive) |
| implicit prompt, chat (UltraFeedback-binarized) | ``chosen`` + ``rejected`` message lists that repeat the conversation; a text ``prompt`` column, if any, is ignored | their shared leading messages, cut back to the last non-assistant message |
| scored | any of the above + ``score_chosen`` / ``score_rejected`` | (as above); pairs with equal scores are dropped and counted |

Other column names are mapped with ``DataConfig.prompt_column`` / ``chosen_column`` /
``rejected_column`` (``--data-prompt-column`` …). The format is reported in one line at load time
(``report``), e.g. ``"hh.jsonl: implicit-prompt format (text): prompt taken as the shared prefix of
'chosen' and 'rejected', up to the last '\\n\\nAssistant:'; 3 pairs"``.

A pair whose responses are identical, or that shares no prompt, is an error naming the row.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from typing import NamedTuple

from jaxrlhf.data.preference import DataConfig, DataError, is_chat, validate_field
from jaxrlhf.data.sources import load_splits

logger = logging.getLogger(__name__)

ASSISTANT_TURN = "\n\nAssistant:"  # where an HH-RLHF prompt ends (inclusive)
SCORE_COLUMNS = ("score_chosen", "score_rejected")


class PreferenceFormat(NamedTuple):
    """How a preference dataset's columns map to prompt / chosen / rejected."""

    implicit: bool  # the prompt is the shared start of chosen and rejected
    kind: str  # "text" or "chat" (the responses)
    scored: bool  # has score_chosen / score_rejected
    ignored_prompt: bool  # a text prompt column beside chat responses (UltraFeedback), unused

    def describe(self, config: DataConfig) -> str:
        c, r = config.chosen_column, config.rejected_column
        if not self.implicit:
            text = f"explicit-prompt format ({self.kind}): columns {config.prompt_column!r}, {c!r}, {r!r}"
        elif self.kind == "text":
            text = (
                f"implicit-prompt format (text): prompt taken as the shared prefix of {c!r} and "
                f"{r!r}, up to the last {ASSISTANT_TURN!r}"
            )
        else:
            text = (
                f"implicit-prompt format (chat): prompt taken as the shared leading messages of "
                f"{c!r} and {r!r}"
            )
            if self.ignored_prompt:
                text += f" (the text column {config.prompt_column!r} is not used)"
        if self.scored:
            text += f"; scored ({', '.join(SCORE_COLUMNS)})"
        return text


class PreferenceData(NamedTuple):
    """Preference rows (``prompt``, ``chosen``, ``rejected``, and when scored ``score_chosen``,
    ``score_rejected``) of a training split and, when the dataset has one, a held-out split."""

    train: list[dict]
    eval: list[dict] | None  # the dataset's own held-out split (config.eval_split), if any
    format: PreferenceFormat
    description: str  # the one line reported at load time


def _kind(value) -> str:
    return "chat" if is_chat(value) else "text"


def detect_preference_format(
    columns, first_row: dict, config: DataConfig, *, source: str = "dataset"
) -> PreferenceFormat:
    """The format of preference data from its column names and first row (see the module table)."""
    c, r, p = config.chosen_column, config.rejected_column, config.prompt_column
    missing = [name for name in (c, r) if name not in columns]
    if missing:
        raise DataError(
            f"{source}: missing column(s) {missing}; found {list(columns)} (preference data needs "
            "chosen and rejected responses, and optionally a prompt: name other columns with "
            "--data-chosen-column, --data-rejected-column, --data-prompt-column)"
        )
    kind = _kind(first_row[c])
    has_prompt = p in columns
    ignored = has_prompt and kind == "chat" and _kind(first_row[p]) == "text"
    scored = all(s in columns for s in SCORE_COLUMNS)
    return PreferenceFormat(
        implicit=not has_prompt or ignored, kind=kind, scored=scored, ignored_prompt=ignored
    )


def _same_message(a: dict, b: dict) -> bool:
    return a["role"] == b["role"] and a["content"] == b["content"]


def split_shared_prompt(chosen, rejected, *, where: str = "pair"):
    """(prompt, chosen response, rejected response) of a pair that repeats its prompt.

    Text (HH-RLHF transcripts): the prompt is the longest shared prefix, cut back to the last
    ``"\\n\\nAssistant:"`` inside it (inclusive). Chats: the shared leading messages, cut back to
    the last message that is not the assistant's. Identical responses or no shared prompt raise a
    DataError naming ``where``.
    """
    if chosen == rejected:
        raise DataError(f"{where}: chosen and rejected are identical")
    if isinstance(chosen, str):
        shared = os.path.commonprefix([chosen, rejected])
        cut = shared.rfind(ASSISTANT_TURN)
        if cut < 0:
            raise DataError(
                f"{where}: chosen and rejected share no prompt ending in {ASSISTANT_TURN!r} "
                f"(their shared prefix is {shared[:60]!r}); give a prompt column instead"
            )
        end = cut + len(ASSISTANT_TURN)
        return chosen[:end], chosen[end:], rejected[end:]
    k = 0
    while k < min(len(chosen), len(rejected)) and _same_message(chosen[k], rejected[k]):
        k += 1
    while k > 0 and chosen[k - 1]["role"] == "assistant":
        k -= 1
    if k == 0:
        raise DataError(
            f"{where}: chosen and rejected share no leading non-assistant message to be the prompt; "
            "give a prompt column instead"
        )
    return list(chosen[:k]), list(chosen[k:]), list(rejected[k:])


def _strip_repeated_prompt(prompt, response):
    """A chat response that starts with the prompt's messages, without them (else unchanged)."""
    if (
        is_chat(prompt)
        and is_chat(response)
        and len(response) > len(prompt)
        and all(_same_message(a, b) for a, b in zip(prompt, response))
    ):
        return list(response[len(prompt) :]), True
    return response, False


def _score(row: dict, column: str, where: str) -> float:
    value = row[column]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{where}, column {column!r}: expected a finite number, got {value!r}")
    return float(value)


def preference_rows(
    data, config: DataConfig | None = None, *, source: str = "dataset", drop_ties: bool = True
) -> tuple[list[dict], PreferenceFormat, str]:
    """Any supported preference layout (``datasets.Dataset`` or list of dicts) → rows with
    ``prompt``, ``chosen``, ``rejected`` (+ ``score_chosen``, ``score_rejected`` when scored),
    the detected format and a note of what was dropped or stripped.

    Errors name ``source``, the row and the column as the data has them.
    """
    config = config or DataConfig()
    columns = list(data[0]) if isinstance(data, list) else data.column_names
    if len(data) == 0:
        raise DataError(f"{source}: no rows")
    fmt = detect_preference_format(columns, dict(data[0]), config, source=source)
    c, r, p = config.chosen_column, config.rejected_column, config.prompt_column
    used = [c, r] + ([] if fmt.implicit else [p]) + (list(SCORE_COLUMNS) if fmt.scored else [])
    rows = data if isinstance(data, list) else data.select_columns(used)
    out, ties, stripped = [], 0, 0
    for i, row in enumerate(rows):
        where = f"{source}: row {i}"
        for column in used[: 2 if fmt.implicit else 3]:
            if column not in row:
                raise DataError(f"{where}: missing column {column!r}")
            validate_field(row[column], f"{where}, column {column!r}", kind=fmt.kind)
        if fmt.implicit:
            prompt, chosen, rejected = split_shared_prompt(row[c], row[r], where=where)
        else:
            prompt, chosen, rejected = row[p], row[c], row[r]
            if chosen == rejected:
                raise DataError(f"{where}: columns {c!r} and {r!r} are identical")
            chosen, cut_c = _strip_repeated_prompt(prompt, chosen)
            rejected, cut_r = _strip_repeated_prompt(prompt, rejected)
            stripped += cut_c or cut_r
        for column, value in ((c, chosen), (r, rejected)):
            validate_field(value, f"{where}, column {column!r} (after the prompt)", kind=fmt.kind)
        example = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        if fmt.scored:
            s_c, s_r = (_score(row, s, where) for s in SCORE_COLUMNS)
            if s_c < s_r:
                raise DataError(
                    f"{where}: score_chosen {s_c} < score_rejected {s_r} (the pair contradicts "
                    "its scores)"
                )
            if s_c == s_r and drop_ties:
                ties += 1
                continue
            example.update(score_chosen=s_c, score_rejected=s_r)
        out.append(example)
    notes = []
    if stripped:
        notes.append(f"responses repeating the prompt's messages stripped in {_count(stripped)}")
    if fmt.scored and drop_ties:
        notes.append(f"{_count(ties)} with equal scores dropped")
    if not out:
        raise DataError(f"{source}: no pairs left ({'; '.join(notes)})")
    return out, fmt, "; ".join(notes)


def _count(n: int, what: str = "pair") -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")


def template_note(tokenizer, kind: str | None) -> str:
    """The part of a format line that says how chats will be rendered: empty for text data or a
    tokenizer with a chat template (or none given); else that the built-in template is used."""
    if kind != "chat" or tokenizer is None or getattr(tokenizer, "chat_template", None):
        return ""
    return (
        "the tokenizer has no chat template: chats rendered with the built-in "
        "'role: content' template"
    )


def _report(report: Callable[[str], None] | None, line: str) -> None:
    (report or logger.info)(line)


def load_preference_dataset(
    source: str | os.PathLike,
    config: DataConfig | None = None,
    *,
    report: Callable[[str], None] | None = None,
    tokenizer=None,
) -> PreferenceData:
    """Load preference data in any supported format (a file, a dataset directory or a Hub name)
    as prompt/chosen/rejected rows, with the dataset's own held-out split when it has one.

    ``report`` receives the one-line description of the format (default: ``logging.info``); with
    ``tokenizer`` it also says when chats will be rendered by the built-in template.
    """
    config = config or DataConfig()
    source = os.fspath(source)
    train, held_out = load_splits(source, config)
    rows, fmt, note = preference_rows(train, config, source=source)
    eval_rows = None
    if held_out is not None and len(held_out):
        eval_source = f"{source} [{config.eval_split}]"
        eval_rows, _, _ = preference_rows(held_out, config, source=eval_source)
    notes = [n for n in (template_note(tokenizer, fmt.kind), note) if n]
    line = "; ".join([f"{source}: {fmt.describe(config)}", *notes, _count(len(rows))])
    if eval_rows is not None:
        line += f" + {len(eval_rows)} held out (split {config.eval_split!r})"
    _report(report, line)
    return PreferenceData(rows, eval_rows, fmt, line)


def load_prompt_dataset(
    source: str | os.PathLike,
    config: DataConfig | None = None,
    *,
    report: Callable[[str], None] | None = None,
    tokenizer=None,
) -> list[dict]:
    """Prompts (rows with a ``prompt``, text or chat) for PPO: the prompt column, or — for
    preference data without a usable one (HH-RLHF, UltraFeedback) — the implicit prompts.
    ``report`` and ``tokenizer`` as in :func:`load_preference_dataset`."""
    config = config or DataConfig()
    source = os.fspath(source)
    data, _ = load_splits(source, config)
    columns = data.column_names
    if len(data) == 0:
        raise DataError(f"{source}: no rows")
    implicit = False
    if config.chosen_column in columns and config.rejected_column in columns:
        implicit = detect_preference_format(columns, data[0], config, source=source).implicit
    if implicit:
        rows, fmt, _ = preference_rows(data, config, source=source, drop_ties=False)
        prompts = [{"prompt": row["prompt"]} for row in rows]
        how, kind = f"prompts from the {fmt.describe(config)}", fmt.kind
    else:
        p = config.prompt_column
        if p not in columns:
            raise DataError(
                f"{source}: missing column {p!r}; found {columns} (name the prompt column with "
                "--data-prompt-column)"
            )
        kind = None
        prompts = []
        for i, value in enumerate(data[p]):
            found = validate_field(value, f"{source}: row {i}, column {p!r}", kind=kind)
            kind = kind or found
            prompts.append({"prompt": value})
        how = f"prompts from column {p!r} ({kind})"
    notes = [n for n in (how, template_note(tokenizer, kind), _count(len(prompts), "prompt")) if n]
    _report(report, f"{source}: " + "; ".join(notes))
    return prompts
