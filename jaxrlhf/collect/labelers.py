"""Labelers that need no person: a Python rule, or a trained reward model (AI feedback).

``jaxrlhf collect --labeler SPEC`` labels every pending candidate pair with one of them:

* ``rule:module:function`` — ``function(prompt, a, b)`` returns the index of the preferred
  response: ``0`` (a ≻ b), ``1`` (b ≻ a) or ``None`` (no preference: a tie, kept out of the training
  data). ``prompt``, ``a`` and ``b`` are as stored: texts, or for chat prompts the message lists.
  E.g. ``rule:jaxrlhf.collect.labelers:demo_annotator``, the demo's simulated annotators.
* ``reward-model:DIR`` — a reward model written by ``train-rm``; the response with the higher score
  r(x, y) is preferred (equal scores: a tie).
"""

from __future__ import annotations

import importlib
import json
import zlib
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

RuleFn = Callable[[object, object, object], "int | None"]


class Labeler(NamedTuple):
    """``name`` (recorded in every label line) and ``choose(pairs) -> choices``: the candidate rows
    ``{"prompt", "a", "b"}`` → one of ``"left"`` (a ≻ b), ``"right"`` (b ≻ a), ``"tie"`` each."""

    name: str
    choose: Callable[[Sequence[dict]], list[str]]


def _text(response) -> str:
    """A response's text (a chat turn's content)."""
    return response if isinstance(response, str) else "".join(m["content"] for m in response)


def demo_annotator(prompt: str, a: str, b: str, *, tau: float = 1.0) -> int:
    """The demo's simulated annotator as a rule: P(a ≻ b) = σ((gold_a − gold_b) / τ), with the
    gold reward of :mod:`jaxrlhf.data.demo_task`. The coin is seeded by the pair's text (CRC-32), so
    the same pair always gets the same label. Returns 0 (a) or 1 (b)."""
    from jaxrlhf.data.demo_task import gold_reward, preference_probability

    gold = gold_reward([prompt, prompt], [_text(a), _text(b)])  # [2]
    p_a = float(preference_probability(gold[0], gold[1], tau=tau))
    seed = zlib.crc32(json.dumps([prompt, a, b]).encode("utf-8"))
    return 0 if np.random.default_rng(seed).random() < p_a else 1


def rule_labeler(spec: str) -> Labeler:
    """``module:function`` (the part after ``rule:``) → a Labeler calling ``function(prompt, a, b)``
    on each pair; its return is checked to be 0, 1 or None (naming the spec and the pair)."""
    parts = spec.split(":")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"--labeler rule:{spec}: expected rule:module:function")
    try:
        fn = getattr(importlib.import_module(parts[0]), parts[1])
    except (ImportError, AttributeError) as err:
        raise ValueError(f"--labeler rule:{spec}: {err}") from None

    def choose(pairs):
        choices = []
        for pair in pairs:
            winner = fn(pair["prompt"], pair["a"], pair["b"])
            if winner is None:
                choices.append("tie")
            elif winner in (0, 1) and not isinstance(winner, bool):
                choices.append("left" if winner == 0 else "right")
            else:
                raise ValueError(
                    f"--labeler rule:{spec} returned {winner!r} for pair {pair.get('pair_id')}: "
                    "expected 0 (a preferred), 1 (b preferred) or None (tie)"
                )
        return choices

    return Labeler(f"rule:{spec}", choose)


def reward_model_labeler(directory: str, data_config, *, batch_size: int = 32) -> Labeler:
    """A reward model as the labeler: prefer the response with the higher r(x, y); equal: a tie.

    ``directory`` holds a ``train-rm`` reward model and its tokenizer; ``data_config`` gives the
    prompt / response lengths of the scored sequences (its flags are named on overflow).
    """
    import jax
    from flax import nnx

    from jaxrlhf.data.preference import tokenize_pairs
    from jaxrlhf.models.hf import from_pretrained
    from jaxrlhf.models.tokenizer import load_tokenizer

    model = from_pretrained(directory, head="reward")
    tokenizer = load_tokenizer(directory)
    graphdef, state = nnx.split(model)

    @jax.jit
    def scores(state, ids, mask):
        return nnx.merge(graphdef, state)(ids, mask)  # [B]

    def choose(pairs):
        choices = []
        for start in range(0, len(pairs), batch_size):
            rows = [{"prompt": p["prompt"], "chosen": p["a"], "rejected": p["b"]}
                    for p in pairs[start : start + batch_size]]  # fmt: skip
            batch = tokenize_pairs(rows, tokenizer, data_config, source="candidate pairs")
            r_a = np.asarray(scores(state, batch.chosen_ids, batch.chosen_mask))  # [B]
            r_b = np.asarray(scores(state, batch.rejected_ids, batch.rejected_mask))  # [B]
            choices += ["left" if x > y else "right" if y > x else "tie" for x, y in zip(r_a, r_b)]
        return choices

    return Labeler(f"reward-model:{directory}", choose)


def load_labeler(spec: str, data_config=None) -> Labeler:
    """``rule:module:function`` or ``reward-model:DIR`` → a Labeler (errors name the spec)."""
    kind, _, rest = spec.partition(":")
    if kind == "rule" and rest:
        return rule_labeler(rest)
    if kind == "reward-model" and rest:
        from jaxrlhf.data.preference import DataConfig

        return reward_model_labeler(rest, data_config or DataConfig())
    raise ValueError(f"--labeler {spec!r}: expected rule:module:function or reward-model:DIR")
