"""A built-in task with an exact reward: short arithmetic, for GRPO-style training (no reward model).

Everything is generated offline and deterministically from a seed, like the demo task
(:mod:`jaxrlhf.data.demo_task`), but here the reward is *verifiable*: a program checks the answer.

**Problems.** A prompt is ``a OP b =`` written without spaces, the answer is the result in decimal,
then EOS::

    "17+25="  →  "42"        "3-17="  →  "-14"        "7*8="  →  "56"   (with "*" enabled)

Operands of ``+`` and ``−`` are 0 … ``max_operand`` (default 99), those of ``×`` 0 … ``max_factor``
(default 12; ``×`` is off by default). Subtraction may go below zero, so answers can carry a leading
``-``. The whole problem space (``(max_operand + 1)²`` problems per additive operation, e.g. 20 000
for ``+`` and ``−`` up to 99) is indexed, and a seeded draw without replacement picks the training
prompts and, disjoint from them, the held-out prompts.

**Tokenizer.** One token per character (:func:`char_tokenizer`): ``<pad>`` 0, ``<bos>`` 1, ``<eos>``
2, ``<unk>`` 3, then the digits, ``+ - * =``; left padding. It is a transformers
``PreTrainedTokenizerFast``, so ``save_pretrained(..., tokenizer=task.tokenizer)`` writes it next to
a model and ``AutoTokenizer.from_pretrained`` reads it back.

**Rewards** (each ``fn(prompts, completions) -> list[float]``, the signature of the GRPO trainer's
rules; completions are the decoded texts, special tokens skipped)::

    format(c)       = 1  if c matches  -?[0-9]+   (digits only, at most one leading minus), else 0
    correctness(p, c) = 1  if c is exactly the decimal result of p (no leading zeros, no "+"), else 0
    reward(p, c)    = correctness(p, c) + 0.1 · format(c)

so a right answer earns 1.1, a wrong number 0.1 and anything else (``"42+"``, ``""``, ``"4 2"``) 0.
Surrounding whitespace is ignored. A completion text that still holds the literal ``"<eos>"`` (decoded
without skipping special tokens) is cut there; given ``finished`` (whether each completion reached
EOS; :meth:`ArithmeticTask.finished`), an unfinished completion scores 0 on both.

**Warm-up.** :func:`sft_policy` (in :mod:`jaxrlhf.tasks.arithmetic_warmup`) fine-tunes the tiny GPT-2 (:func:`jaxrlhf.train.sft.tiny_model_config`)
on ``prompt answer EOS`` examples of the training prompts, the loss on the answer and EOS only. Its
defaults stop early on purpose, with the held-out greedy accuracy well below 100%, so that RL on the
exact reward has room to improve it.

**A sloppy demonstrator** (``plus_sign_rate``): imitation copies the habits of its data. With
``plus_sign_rate=0.8`` the SFT examples write 80% of the non-negative answers with a sign (``"+42"``),
which the exact reward does not accept (neither correctness nor format). Imitation alone learns the
habit (greedy decoding then signs most answers); only a reward can unlearn it, and an unlearned habit
carries over to prompts the RL run never saw. This is the demo's setting for GRPO / RLOO (see
``jaxrlhf.demo.algorithms``): the held-out accuracy rises because the policy stops signing answers,
and is then bounded by how much arithmetic the SFT taught (measured there).

Measured (default task: ``+``/``−`` on 0 … 99, 4000 training and 500 held-out prompts; tiny GPT-2,
batch 64, lr 3e-3): the held-out greedy accuracy jumps late (a plateau near a loss of 1 nat while
the carries are not yet learnt): ≈ 5% after 300 steps, 13% after 1000, 20–50% after 1600 (the
default; seeds 0, 1, 2 → 0.51, 0.49, 0.23 on one core, 0.20, 0.37, 0.21 on two threads: the
jump's timing is sensitive to float rounding), 64–72% after 2000–3000. The 1600 steps take 26–30 s
of CPU time on one core, compilation included; evaluating 500 prompts ≈ 1.5 s. Operands 0 … 19 learn
in a tenth of the steps (300 steps: 0 → 60% held-out).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np

from jaxrlhf.data.preference import (
    DataConfig,
    PromptBatch,
    decode,
    encode,
    left_pad,
    right_pad,
    tokenize_prompts,
)
from jaxrlhf.data.sft import SFTBatch
from jaxrlhf.data.task import TaskTokens
from jaxrlhf.tasks.arithmetic_problems import (
    CHARACTERS,
    FORMAT_WEIGHT,
    OPERATIONS,
    SPECIAL_TOKENS,
    UNK_TOKEN,
    answer,
    char_tokenizer,
    correctness_reward,
    format_reward,
    parse_prompt,
    problem_space_size,
    problems,
    reward,
)
from jaxrlhf.tasks.arithmetic_warmup import sft_policy, signed_answers

__all__ = [
    "CHARACTERS",
    "FORMAT_WEIGHT",
    "OPERATIONS",
    "SPECIAL_TOKENS",
    "UNK_TOKEN",
    "ArithmeticTask",
    "answer",
    "build_arithmetic_task",
    "char_tokenizer",
    "correctness_reward",
    "format_reward",
    "parse_prompt",
    "problem_space_size",
    "problems",
    "reward",
    "sft_policy",
    "signed_answers",
]


# ----------------------------------------------------------------------------------------------
# The task bundle
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class ArithmeticTask(TaskTokens):
    """Everything an RL run on arithmetic needs, built by :func:`build_arithmetic_task`."""

    seed: int
    tokenizer: object  # transformers.PreTrainedTokenizerFast (<pad> 0, <bos> 1, <eos> 2, <unk> 3)
    train_prompts: tuple[str, ...]  # RL / SFT prompts
    eval_prompts: tuple[str, ...]  # held-out prompts, disjoint from train_prompts
    data_config: DataConfig  # prompt width P and response width R (answer + EOS), fixed
    operations: tuple[str, ...]
    max_operand: int
    max_factor: int

    def answer(self, prompt: str) -> str:
        """:func:`answer`: the right completion of ``prompt`` (without EOS)."""
        return answer(prompt)

    def prompt_batch(self, prompts: Sequence[str] | None = None) -> PromptBatch:
        """Prompts (default: the training prompts) left-padded to ``[N, P]``."""
        prompts = self.train_prompts if prompts is None else prompts
        return tokenize_prompts({"prompt": list(prompts)}, self.tokenizer, self.data_config)

    def sft_batch(
        self, prompts: Sequence[str] | None = None, completions: Sequence[str] | None = None
    ) -> SFTBatch:
        """Supervised examples ``prompt answer EOS`` (default: every training prompt with its
        right answer) as ``[N, P + R]`` rows: the prompt left-padded to P, the answer + EOS
        right-padded to R (the layout of a rollout), ``loss_mask`` 1 at the answer and EOS.

        Args:
          prompts: prompt texts (default: ``train_prompts``).
          completions: their answers (default: the right ones); e.g. wrong ones to add noise.
        """
        prompts = self.train_prompts if prompts is None else list(prompts)
        if completions is None:
            completions = [answer(p) for p in prompts]
        if len(completions) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        P, R = self.max_prompt_length, self.max_new_tokens
        prompt_rows = [encode(self.tokenizer, p) for p in prompts]
        answer_rows = [encode(self.tokenizer, c) + [self.eos_token_id] for c in completions]
        for rows, width, what in ((prompt_rows, P, "prompt"), (answer_rows, R, "answer + EOS")):
            if max(map(len, rows)) > width:
                raise ValueError(f"an {what} is longer than its {width} tokens")
        prompt_ids, prompt_mask = left_pad(prompt_rows, P, self.pad_token_id)  # [N, P]
        answer_ids, answer_mask = right_pad(answer_rows, R, self.pad_token_id)  # [N, R]
        input_ids = np.concatenate([prompt_ids, answer_ids], axis=1)  # [N, P + R]
        attention_mask = np.concatenate([prompt_mask, answer_mask], axis=1)  # [N, P + R]
        loss_mask = np.concatenate([np.zeros_like(prompt_mask), answer_mask], axis=1)  # [N, P + R]
        return SFTBatch(input_ids, attention_mask, loss_mask, 0)

    def decode(self, tokens: np.ndarray, mask: np.ndarray | None = None) -> list[str]:
        """Texts of ``[N, T]`` token ids (positions where ``mask`` is 0 dropped, special tokens
        skipped)."""
        tokens = np.asarray(tokens)
        mask = np.ones_like(tokens) if mask is None else np.asarray(mask)
        return [decode(self.tokenizer, row[m > 0]) for row, m in zip(tokens, mask)]

    def finished(self, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """``[N]`` bool: whether each completion contains EOS at a valid position."""
        return np.any((np.asarray(tokens) == self.eos_token_id) & (np.asarray(mask) > 0), axis=-1)

    def format_reward(self, prompts, completions, *, finished=None) -> list[float]:
        """:func:`format_reward`."""
        return format_reward(prompts, completions, finished=finished)

    def correctness_reward(self, prompts, completions, *, finished=None) -> list[float]:
        """:func:`correctness_reward`."""
        return correctness_reward(prompts, completions, finished=finished)

    def reward(self, prompts, completions, *, finished=None) -> list[float]:
        """:func:`reward`: correctness + 0.1 · format."""
        return reward(prompts, completions, finished=finished)

    def accuracy(self, prompts: Sequence[str], completions: Sequence[str], *, finished=None):
        """Fraction of completions that are the right answer (mean :func:`correctness_reward`)."""
        values = correctness_reward(prompts, completions, finished=finished)
        return float(np.mean(values)) if values else 0.0

    def evaluate(
        self,
        model,
        prompts: Sequence[str] | None = None,
        *,
        batch_size: int = 256,
        with_format: bool = False,
    ):
        """Greedy held-out accuracy of ``model`` (a CausalLM) on ``prompts`` (default:
        ``eval_prompts``), answers sampled with :func:`jaxrlhf.rollout.sample` (greedy, up to
        ``max_new_tokens``) and counted right only when they end with EOS. Batches are padded to
        ``batch_size`` rows (repeating some) so that one program serves all. With ``with_format``,
        ``{"accuracy": …, "format": …}``, the second the mean :func:`format_reward` (well-formed
        answers, right or wrong)."""
        import jax

        from jaxrlhf.rollout import SamplingConfig, sample

        prompts = list(self.eval_prompts if prompts is None else prompts)
        config = SamplingConfig(max_new_tokens=self.max_new_tokens, greedy=True)
        ids, mask, _ = self.prompt_batch(prompts)  # [N, P]
        batch_size = min(batch_size, len(prompts))
        correct, formatted = [], []
        for start in range(0, len(prompts), batch_size):
            rows = slice(start, start + batch_size)
            n = len(prompts[rows])
            batch_ids = np.resize(ids[rows], (batch_size, ids.shape[1]))  # [B, P], rows repeated
            batch_mask = np.resize(mask[rows], (batch_size, ids.shape[1]))  # [B, P]
            rollout = sample(
                model,
                batch_ids,
                batch_mask,
                config,
                jax.random.PRNGKey(0),
                eos_token_id=self.eos_token_id,
                pad_token_id=self.pad_token_id,
            )
            tokens, response_mask = np.asarray(rollout.tokens)[:n], np.asarray(rollout.mask)[:n]
            texts = self.decode(tokens, response_mask)
            finished = self.finished(tokens, response_mask)
            correct += correctness_reward(prompts[rows], texts, finished=finished)
            formatted += format_reward(prompts[rows], texts, finished=finished)
        accuracy = float(np.mean(correct)) if correct else 0.0
        if with_format:
            return {"accuracy": accuracy, "format": float(np.mean(formatted)) if formatted else 0.0}
        return accuracy

    def write_data_files(self, directory: str) -> dict[str, str]:
        """The task's data as the files a user would bring: ``sft.jsonl`` (prompt / completion: the
        training prompts with their answers, for ``jaxrlhf sft``) and ``prompts.jsonl`` (the
        training prompts) and ``eval_prompts.jsonl``. Returns the paths by name."""
        os.makedirs(directory, exist_ok=True)
        files = {
            "sft": [{"prompt": p, "completion": answer(p)} for p in self.train_prompts],
            "prompts": [{"prompt": p} for p in self.train_prompts],
            "eval_prompts": [{"prompt": p} for p in self.eval_prompts],
        }
        paths = {}
        for name, rows in files.items():
            paths[name] = os.path.join(directory, f"{name}.jsonl")
            with open(paths[name], "w", encoding="utf-8") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
        return paths


def build_arithmetic_task(
    seed: int = 0,
    *,
    num_train: int = 4000,
    num_eval: int = 500,
    max_operand: int = 99,
    operations: Sequence[str] = ("+", "-"),
    max_factor: int = 12,
) -> ArithmeticTask:
    """The arithmetic task for ``seed``: tokenizer and disjoint train / held-out prompts
    (deterministic: a seeded draw without replacement from the problem space).

    Args:
      seed: the draw of the prompts.
      num_train, num_eval: prompts in each split; together at most :func:`problem_space_size`.
      max_operand: largest operand of ``+`` and ``-`` (the smallest is 0).
      operations: a subset of ``("+", "-", "*")``.
      max_factor: largest operand of ``*`` (only used with ``"*"`` in ``operations``).
    """
    operations = tuple(operations)
    if not operations or len(set(operations)) != len(operations):
        raise ValueError(f"operations must be distinct and non-empty, got {operations!r}")
    if not set(operations) <= set(OPERATIONS):
        raise ValueError(f"operations must be among {OPERATIONS}, got {operations!r}")
    if max_operand < 1 or max_factor < 1:
        raise ValueError(f"max_operand = {max_operand}, max_factor = {max_factor}: must be ≥ 1")
    if num_train < 1 or num_eval < 1:
        raise ValueError(f"num_train = {num_train}, num_eval = {num_eval}: must be ≥ 1")
    space = {"operations": operations, "max_operand": max_operand, "max_factor": max_factor}
    total = problem_space_size(**space)
    if num_train + num_eval > total:
        raise ValueError(
            f"num_train + num_eval = {num_train + num_eval}: more than the {total} distinct "
            f"problems of {operations} with these operands"
        )
    rng = np.random.default_rng(np.random.SeedSequence(seed))
    indices = rng.choice(total, size=num_train + num_eval, replace=False)  # distinct
    prompts = problems(indices, **space)
    # Widths from the problem space, not the draw: every task of these settings has one shape.
    largest = {op: (max_factor if op == "*" else max_operand) for op in operations}
    widest_prompt = max(len(f"{n}{op}{n}=") for op, n in largest.items())
    widest_answer = max(
        max(len(answer(f"{n}{op}{n}=")), len(answer(f"0{op}{n}="))) for op, n in largest.items()
    )
    config = DataConfig(
        max_prompt_length=widest_prompt,
        max_response_length=widest_answer + 1,  # + EOS
        padding="max_length",
    )
    return ArithmeticTask(
        seed=seed,
        tokenizer=char_tokenizer(),
        train_prompts=tuple(prompts[:num_train]),
        eval_prompts=tuple(prompts[num_train:]),
        data_config=config,
        operations=operations,
        max_operand=max_operand,
        max_factor=max_factor,
    )
