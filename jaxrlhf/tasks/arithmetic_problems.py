"""The arithmetic task's pieces without a model: character tokenizer, problems, exact rewards.

The task itself (:class:`~jaxrlhf.tasks.arithmetic.ArithmeticTask`), the reward definitions and the
measurements are described in :mod:`jaxrlhf.tasks.arithmetic`, which re-exports every name here.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import numpy as np

from jaxrlhf.models.tokenizer import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN

UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)  # ids 0, 1, 2, 3
OPERATIONS = ("+", "-", "*")
CHARACTERS = "0123456789" + "".join(OPERATIONS) + "="
FORMAT_WEIGHT = 0.1
"""Weight of the format reward in :func:`reward` (a wrong number still beats garbage)."""

_PROMPT = re.compile(r"\s*(\d+)([+\-*])(\d+)=\s*")
_NUMBER = re.compile(r"-?[0-9]+")
_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


# ----------------------------------------------------------------------------------------------
# The tokenizer
# ----------------------------------------------------------------------------------------------


def char_tokenizer(characters: str = CHARACTERS, path: str | os.PathLike | None = None):
    """A character-level tokenizer: one token per character of ``characters``, after the special
    tokens ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``<unk>`` 3 (any other character encodes to
    ``<unk>``). Special tokens are not added automatically; ``"<eos>"`` in a text is the EOS token.

    Args:
      characters: the alphabet, distinct single characters.
      path: if given, the tokenizer is also saved there with ``save_pretrained``.
    Returns:
      a transformers ``PreTrainedTokenizerFast`` with pad/bos/eos/unk set and ``padding_side="left"``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if len(set(characters)) != len(characters) or not characters:
        raise ValueError(f"characters must be distinct and non-empty, got {characters!r}")
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *characters))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # 1 char each
    tokenizer.decoder = decoders.Fuse()  # join tokens without spaces
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="left",
    )
    if path is not None:
        wrapped.save_pretrained(os.fspath(path))
    return wrapped


# ----------------------------------------------------------------------------------------------
# Problems
# ----------------------------------------------------------------------------------------------


def parse_prompt(prompt: str) -> tuple[int, str, int]:
    """``"17+25="`` → ``(17, "+", 25)``; a ValueError for text that is not such a prompt."""
    match = _PROMPT.fullmatch(prompt)
    if match is None:
        raise ValueError(f"not an arithmetic prompt 'a+b=', 'a-b=' or 'a*b=': {prompt!r}")
    return int(match[1]), match[2], int(match[3])


def answer(prompt: str) -> str:
    """The right completion of a prompt (without EOS): ``"3-17="`` → ``"-14"``."""
    a, op, b = parse_prompt(prompt)
    return str(_APPLY[op](a, b))


def _operand_limits(operations, max_operand: int, max_factor: int) -> list[tuple[str, int]]:
    return [(op, (max_factor if op == "*" else max_operand) + 1) for op in operations]


def problem_space_size(
    operations: Sequence[str] = ("+", "-"), *, max_operand: int = 99, max_factor: int = 12
) -> int:
    """Number of distinct prompts: Σ over the operations of (largest operand + 1)²."""
    return sum(n * n for _, n in _operand_limits(operations, max_operand, max_factor))


def problems(
    indices: Sequence[int] | np.ndarray,
    operations: Sequence[str] = ("+", "-"),
    *,
    max_operand: int = 99,
    max_factor: int = 12,
) -> list[str]:
    """The prompts with these indices in the problem space: operation blocks in the order of
    ``operations``, inside a block index = a · (limit + 1) + b."""
    blocks = _operand_limits(operations, max_operand, max_factor)
    prompts = []
    for index in np.asarray(indices, np.int64).tolist():
        for op, n in blocks:
            if index < n * n:
                prompts.append(f"{index // n}{op}{index % n}=")
                break
            index -= n * n
        else:
            raise ValueError(f"problem index out of range: {index}")
    return prompts


# ----------------------------------------------------------------------------------------------
# Rewards: fn(prompts, completions) -> list[float]
# ----------------------------------------------------------------------------------------------


def _answer_text(completion: str) -> str:
    """The completion up to a literal ``<eos>`` (if any), without surrounding whitespace."""
    return completion.split(EOS_TOKEN, 1)[0].strip()


def _check(prompts, completions, finished) -> None:
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if finished is not None and len(finished) != len(completions):
        raise ValueError(f"{len(finished)} finished flags for {len(completions)} completions")


def format_reward(
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    finished: Sequence[bool] | np.ndarray | None = None,
) -> list[float]:
    """1.0 where the completion is a number, ``-?[0-9]+`` (digits only, one optional leading minus),
    else 0.0; with ``finished``, also 0.0 where the completion did not reach EOS.

    Args:
      prompts: N prompt texts (unused: the format does not depend on the question).
      completions: N completion texts (special tokens skipped; a literal ``<eos>`` ends the text).
      finished: optional N booleans, whether each completion ended with EOS.
    """
    _check(prompts, completions, finished)
    out = [float(_NUMBER.fullmatch(_answer_text(c)) is not None) for c in completions]
    if finished is not None:
        out = [r * bool(f) for r, f in zip(out, finished)]
    return out


def correctness_reward(
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    finished: Sequence[bool] | np.ndarray | None = None,
) -> list[float]:
    """1.0 where the completion is exactly the result of the prompt in canonical decimal (``"42"``,
    ``"-14"``; not ``"042"``, ``"+42"`` or ``"-0"``), else 0.0; with ``finished``, also 0.0 where
    the completion did not reach EOS. Arguments as :func:`format_reward`."""
    _check(prompts, completions, finished)
    out = [float(_answer_text(c) == answer(p)) for p, c in zip(prompts, completions)]
    if finished is not None:
        out = [r * bool(f) for r, f in zip(out, finished)]
    return out


def reward(
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    finished: Sequence[bool] | np.ndarray | None = None,
    format_weight: float = FORMAT_WEIGHT,
) -> list[float]:
    """correctness + w · format (w = 0.1): 1.1 right, 0.1 a wrong number, 0.0 anything else.
    Arguments as :func:`format_reward`; the values are float32-representable fractions."""
    correct = correctness_reward(prompts, completions, finished=finished)
    formatted = format_reward(prompts, completions, finished=finished)
    return [float(np.float32(c + format_weight * f)) for c, f in zip(correct, formatted)]
