"""Supervised warm-up of a tiny policy on the arithmetic task, the start of an RL run.

:func:`sft_policy` fine-tunes the tiny GPT-2 on ``prompt answer EOS`` examples;
:func:`signed_answers` writes the examples with a sloppy demonstrator's ``"+"`` habit. Both are
re-exported by :mod:`jaxrlhf.tasks.arithmetic` (measurements in its docstring).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxrlhf.tasks.arithmetic_problems import answer


def signed_answers(prompts: Sequence[str], plus_sign_rate: float, *, seed: int = 0) -> list[str]:
    """The right answers of ``prompts``, a seeded ``plus_sign_rate`` fraction of the non-negative
    ones written with a ``"+"`` (``"42"`` → ``"+42"``): a demonstrator's habit (rate 0: canonical)."""
    if not 0.0 <= plus_sign_rate <= 1.0:
        raise ValueError(f"plus_sign_rate = {plus_sign_rate}: must be in [0, 1]")
    signs = np.random.default_rng([seed, 7]).random(len(prompts)) < plus_sign_rate
    answers = [answer(p) for p in prompts]
    return [("+" + a if s and not a.startswith("-") else a) for a, s in zip(answers, signs)]


def sft_policy(
    task,  # jaxrlhf.tasks.arithmetic.ArithmeticTask
    *,
    steps: int = 1600,
    seed: int = 0,
    batch_size: int = 64,
    learning_rate: float = 3e-3,
    num_examples: int | None = None,
    plus_sign_rate: float = 0.0,
    progress: bool = False,
):
    """A tiny GPT-2 (:func:`jaxrlhf.train.sft.tiny_model_config`: 2 layers, width 64) fine-tuned for
    ``steps`` steps on ``prompt answer EOS`` examples (loss on the answer and EOS only), the start
    of an RL run.

    The defaults stop before the model has learnt the task, so that the held-out greedy accuracy
    (:meth:`ArithmeticTask.evaluate`) leaves room for RL: 20–50% on the default task, in about 30 s
    on one CPU core (measurements in the module docstring); more steps raise it.

    Args:
      task: the :class:`~jaxrlhf.tasks.arithmetic.ArithmeticTask` (its training prompts are the
        examples).
      steps: optimiser steps (cosine decay, 10% warm-up).
      seed: the initial parameters and the batch order.
      batch_size, learning_rate: as :class:`jaxrlhf.train.sft.SFTConfig`.
      num_examples: train on only the first this many training prompts (None: all).
      plus_sign_rate: fraction of the non-negative answers written with a ``"+"`` in the examples
        (:func:`signed_answers`; a habit the exact reward penalises).
      progress: show a progress bar.
    Returns:
      the trained ``jaxrlhf.models.CausalLM``.
    """
    from flax import nnx

    from jaxrlhf.models import CausalLM
    from jaxrlhf.train.sft import SFTConfig, tiny_model_config, train_sft

    prompts = task.train_prompts[:num_examples]
    completions = signed_answers(prompts, plus_sign_rate, seed=seed)
    ids, mask, loss_mask, _ = task.sft_batch(prompts, completions)  # [N, P + R] each
    width = task.max_prompt_length + task.max_new_tokens
    model_config = tiny_model_config(task.vocab_size, max_position_embeddings=max(16, width))
    model = CausalLM(model_config, rngs=nnx.Rngs(seed))
    config = SFTConfig(
        steps=steps,
        batch_size=min(batch_size, len(prompts)),
        learning_rate=learning_rate,
        warmup_steps=steps // 10,
        lr_schedule="cosine",
        seed=seed,
    )
    policy, _ = train_sft(model, ids, mask, config, loss_mask=loss_mask, progress=progress)
    return policy
