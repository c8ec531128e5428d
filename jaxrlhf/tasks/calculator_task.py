"""An offline task where a tool pays: 3-digit × 2-digit products, with a calculator to call.

A prompt is ``a*b=`` with a in 100 … 999 and b in 10 … 99 (81 000 problems; a seeded draw without
replacement gives disjoint training and held-out prompts). A tiny GPT-2 cannot multiply in its
head, but it can learn to copy: a tool episode is ::

    123*45=<tool_call>123*45</tool_call><tool_response>5535</tool_response>5535<eos>

where ``<tool_response>…</tool_response>`` is written by the host (the calculator,
:func:`jaxrlhf.tools.calculator`), not by the policy.

**Tokenizer** (:func:`calculator_tokenizer`): :func:`~jaxrlhf.tasks.arithmetic.char_tokenizer`'s
characters (digits, ``+ - * =``) and the four markers of :class:`jaxrlhf.tools.ToolConfig` as
single, non-special tokens (so ``skip_special_tokens=True`` keeps them and drops ``<eos>``).

**Demonstrator** (:meth:`CalculatorTask.sft_batch`): a seeded ``tool_rate`` fraction of the
examples call the tool as above, the rest answer directly with the right product (which the tiny
model cannot learn, so its direct answers are mostly wrong). The SFT loss mask has holes: 1 at the
policy's tokens (the call, the final answer, EOS), 0 at the prompt and at the tool's response —
:func:`jaxrlhf.train.sft.counted_targets` multiplies the masks, so a mask with holes is honoured
and the warm-up never learns to write a tool's answer itself, as the RL loss never does.

**Reward** (:func:`correctness_reward`, :func:`format_reward`): the final answer is the text after
the last ``</tool_response>`` (the whole completion when no tool answered); 1 when it is exactly
the product, and a 0.1 format bonus when it is a number. A right number inside the tool's
response only scores 0: the policy must say it. Calls are never rewarded as such.

**Evaluation** (:meth:`CalculatorTask.evaluate`): greedy episodes through
:func:`jaxrlhf.tools.sample_turns` → held-out accuracy and tool calls per episode; with
``toolbox=task.toolbox(mute_tool=True)`` the tool answers ``""``, which measures how much of the
accuracy is the tool's.

Measured (2000 training / 200 held-out prompts, :func:`sft_policy` 600 steps at tool_rate 0.3, then
GRPO: 40 iterations, batch 16 × group 8, 2 minibatches, lr 1e-4 constant, temperature 1,
correctness + 0.1 · format, ``sample_turns`` with the calculator, max_turns 1; 2 shared CPU cores):
held-out greedy accuracy before → after 0.25 → 0.99, 0.19 → 0.895, 0.095 → 0.87 (seeds 0, 1, 2), tool
calls per episode 0.26 / 0.235 / 0.15 → 1.0, with a mute tool (answers ``""``) 0.0 before and after;
the warm-up's direct answers are never right, so the accuracy before is its tool calls that copy
well. 57–67 s in all (SFT 36–48 s). With tool_rate 0.4 (seed 0): 0.46 → 0.98. With 400 SFT steps
(seed 1): 0.155 → 0.84 in 29 s (the copy is learnt less well).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np

from jaxrlhf.data.preference import (
    DataConfig,
    PromptBatch,
    encode,
    left_pad,
    right_pad,
    tokenize_prompts,
)
from jaxrlhf.data.sft import SFTBatch
from jaxrlhf.data.task import TaskTokens, decode_rows
from jaxrlhf.tasks.arithmetic_problems import char_tokenizer
from jaxrlhf.tools import Toolbox, ToolConfig, calculator

MARKERS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")
"""The markers of :class:`jaxrlhf.tools.ToolConfig`'s defaults, one token each."""
CALL_START, CALL_END, RESPONSE_START, RESPONSE_END = MARKERS
A_RANGE = (100, 999)
B_RANGE = (10, 99)
FORMAT_WEIGHT = 0.1
TOOL_RATE = 0.3
"""Default fraction of the demonstrator's examples that call the tool."""

_PROMPT = re.compile(r"\s*(\d+)\*(\d+)=\s*")
_NUMBER = re.compile(r"-?[0-9]+")


def calculator_tokenizer():
    """:func:`char_tokenizer` (``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``<unk>`` 3, digits, ``+-*=``)
    plus the four tool markers as single tokens (ids 18 … 21), left padding."""
    tokenizer = char_tokenizer()
    tokenizer.add_tokens(list(MARKERS))
    return tokenizer


def mute(call: str) -> str:
    """A tool that answers nothing (the ablation: how much of the accuracy is the tool's)."""
    return ""


# ----------------------------------------------------------------------------------------------
# Problems and rewards
# ----------------------------------------------------------------------------------------------


def answer(prompt: str) -> str:
    """``"123*45="`` → ``"5535"`` (a ValueError for text that is not such a prompt)."""
    match = _PROMPT.fullmatch(prompt)
    if match is None:
        raise ValueError(f"not a product prompt 'a*b=': {prompt!r}")
    return str(int(match[1]) * int(match[2]))


def problems(indices: Sequence[int] | np.ndarray) -> list[str]:
    """The prompts with these indices: index = (a − 100) · 90 + (b − 10)."""
    n_b = B_RANGE[1] - B_RANGE[0] + 1
    return [
        f"{A_RANGE[0] + i // n_b}*{B_RANGE[0] + i % n_b}=" for i in np.asarray(indices).tolist()
    ]


def problem_space_size() -> int:
    return (A_RANGE[1] - A_RANGE[0] + 1) * (B_RANGE[1] - B_RANGE[0] + 1)


def final_answer(completion: str) -> str:
    """The text after the last ``</tool_response>`` (the whole completion without one), cut at a
    literal ``<eos>``, stripped."""
    text = completion.rsplit(RESPONSE_END, 1)[-1]
    return text.split("<eos>", 1)[0].strip()


def _check(prompts, completions) -> None:
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")


def correctness_reward(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """1.0 where the final answer (:func:`final_answer`) is exactly the product, else 0.0."""
    _check(prompts, completions)
    return [float(final_answer(c) == answer(p)) for p, c in zip(prompts, completions)]


def format_reward(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """1.0 where the final answer is a number (``-?[0-9]+``), else 0.0."""
    _check(prompts, completions)
    return [float(_NUMBER.fullmatch(final_answer(c)) is not None) for c in completions]


def reward(prompts: Sequence[str], completions: Sequence[str], *, format_weight=FORMAT_WEIGHT):
    """correctness + w · format: 1.1 right, 0.1 a wrong number, 0 anything else."""
    right, formatted = correctness_reward(prompts, completions), format_reward(prompts, completions)
    return [float(np.float32(r + format_weight * f)) for r, f in zip(right, formatted)]


def demonstration(prompt: str, use_tool: bool) -> tuple[str, str, str]:
    """The demonstrator's episode as (the policy's call, the tool's response, the policy's answer):
    ``("<tool_call>123*45</tool_call>", "<tool_response>5535</tool_response>", "5535")`` with the
    tool, ``("", "", "5535")`` without."""
    result = answer(prompt)
    if not use_tool:
        return "", "", result
    expression = prompt.strip().rstrip("=")
    return f"{CALL_START}{expression}{CALL_END}", f"{RESPONSE_START}{result}{RESPONSE_END}", result


# ----------------------------------------------------------------------------------------------
# The task bundle
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class CalculatorTask(TaskTokens):
    """Tokenizer, disjoint prompts and widths of the calculator task (:func:`build_calculator_task`)."""

    seed: int
    tokenizer: object
    train_prompts: tuple[str, ...]
    eval_prompts: tuple[str, ...]
    data_config: DataConfig  # P = 7 ("999*99="), R = the longest tool episode + EOS

    def answer(self, prompt: str) -> str:
        return answer(prompt)

    def toolbox(self, *, mute_tool: bool = False, max_turns: int = 1) -> Toolbox:
        """The calculator (or, with ``mute_tool``, a tool answering ``""``) with the default
        markers; ``max_turns`` calls answered per episode."""
        config = ToolConfig(max_turns=max_turns, max_response_tokens=16)
        return Toolbox([mute if mute_tool else calculator], config)

    def prompt_batch(self, prompts: Sequence[str] | None = None) -> PromptBatch:
        prompts = self.train_prompts if prompts is None else prompts
        return tokenize_prompts({"prompt": list(prompts)}, self.tokenizer, self.data_config)

    def tool_choices(self, n: int, tool_rate: float, seed: int = 0) -> np.ndarray:
        """[n] bool: which of the demonstrator's examples call the tool (seeded)."""
        if not 0.0 <= tool_rate <= 1.0:
            raise ValueError(f"tool_rate = {tool_rate}: must be in [0, 1]")
        return np.random.default_rng([self.seed, seed, 11]).random(n) < tool_rate

    def sft_batch(self, prompts=None, *, tool_rate: float = TOOL_RATE, seed: int = 0) -> SFTBatch:
        """The demonstrator's examples as ``[N, P + R]`` rows (prompt left-padded to P, the
        episode right-padded to R, the layout of a rollout); ``loss_mask`` 1 at the policy's
        tokens (call, answer, EOS), 0 at the prompt and the tool's response."""
        prompts = self.train_prompts if prompts is None else list(prompts)
        uses = self.tool_choices(len(prompts), tool_rate, seed)
        P, R, tok = self.max_prompt_length, self.max_new_tokens, self.tokenizer
        rows, weights = [], []
        for prompt, use in zip(prompts, uses):
            call, response, result = demonstration(prompt, bool(use))
            parts = [(encode(tok, call), 1), (encode(tok, response), 0), (encode(tok, result), 1)]
            rows.append([i for ids, _ in parts for i in ids] + [self.eos_token_id])
            weights.append([w for ids, w in parts for _ in ids] + [1])
        if max(map(len, rows)) > R:
            raise ValueError(f"an episode is longer than its {R} tokens")
        prompt_ids, prompt_mask = left_pad([encode(tok, p) for p in prompts], P, self.pad_token_id)
        episode_ids, episode_mask = right_pad(rows, R, self.pad_token_id)  # [N, R]
        episode_loss, _ = right_pad(weights, R, 0)  # [N, R]
        input_ids = np.concatenate([prompt_ids, episode_ids], axis=1)  # [N, P + R]
        attention_mask = np.concatenate([prompt_mask, episode_mask], axis=1)
        loss_mask = np.concatenate([np.zeros_like(prompt_mask), episode_loss], axis=1)
        return SFTBatch(input_ids, attention_mask, loss_mask, 0)

    def reward(self, prompts, completions) -> list[float]:
        return reward(prompts, completions)

    def reward_fn(self, *, format_weight: float = FORMAT_WEIGHT):
        """The GRPO trainer's ``reward_fn``: correctness + w · format on the decoded episode."""
        from jaxrlhf.train.grpo_rewards import text_reward_fn

        return text_reward_fn(
            [correctness_reward, format_reward], self.tokenizer, weights=[1.0, format_weight]
        )

    def sampler(self, toolbox: Toolbox | None = None):
        """``sample_turns`` with the task's toolbox and tokenizer (GRPOTrainer's ``sampler``)."""
        import functools

        from jaxrlhf.tools import sample_turns

        box = self.toolbox() if toolbox is None else toolbox
        return functools.partial(sample_turns, toolbox=box, tokenizer=self.tokenizer)

    def evaluate(self, model, prompts=None, *, toolbox: Toolbox | None = None, batch_size=256):
        """Greedy episodes through ``sample_turns`` → ``{"accuracy", "tool_calls"}`` (mean
        correctness of the final answer, an episode counted only when it reached EOS; mean calls
        per episode). Batches are padded to ``batch_size`` rows so one program serves all."""
        import jax

        from jaxrlhf.rollout import SamplingConfig

        prompts = list(self.eval_prompts if prompts is None else prompts)
        sample_fn = self.sampler(toolbox)
        config = SamplingConfig(max_new_tokens=self.max_new_tokens, greedy=True)
        ids, mask, _ = self.prompt_batch(prompts)
        batch_size = min(batch_size, len(prompts))
        correct, calls = [], []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            n, width = len(chunk), ids.shape[1]
            rows = slice(start, start + batch_size)
            rollout = sample_fn(
                model, np.resize(ids[rows], (batch_size, width)),
                np.resize(mask[rows], (batch_size, width)), config, jax.random.PRNGKey(0),
                eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
            )  # fmt: skip
            tokens = np.asarray(rollout.tokens)[:n]
            attention = np.asarray(rollout.attention_mask)[:n]
            finished = np.any((tokens == self.eos_token_id) & (np.asarray(rollout.mask)[:n] > 0), 1)
            texts = decode_rows(self.tokenizer, tokens, attention)
            correct += [r * f for r, f in zip(correctness_reward(chunk, texts), finished)]
            calls += np.asarray(rollout.tool_calls)[:n].tolist()
        return {"accuracy": float(np.mean(correct)), "tool_calls": float(np.mean(calls))}


def build_calculator_task(seed: int = 0, *, num_train: int = 2000, num_eval: int = 200):
    """The task for ``seed``: tokenizer and disjoint train / held-out prompts (a seeded draw
    without replacement from the 81 000 products)."""
    total = problem_space_size()
    if num_train < 1 or num_eval < 1 or num_train + num_eval > total:
        raise ValueError(
            f"num_train = {num_train}, num_eval = {num_eval}: need ≥ 1 each, ≤ {total}"
        )
    rng = np.random.default_rng(np.random.SeedSequence([seed, 3]))
    prompts = problems(rng.choice(total, size=num_train + num_eval, replace=False))
    widest = f"{A_RANGE[1]}*{B_RANGE[1]}="
    call, response, result = demonstration(widest, True)
    tokenizer = calculator_tokenizer()
    episode = len(encode(tokenizer, call + response + result)) + 1  # + EOS
    config = DataConfig(
        max_prompt_length=len(widest), max_response_length=episode, padding="max_length"
    )
    return CalculatorTask(
        seed=seed,
        tokenizer=tokenizer,
        train_prompts=tuple(prompts[:num_train]),
        eval_prompts=tuple(prompts[num_train:]),
        data_config=config,
    )


def sft_policy(task: CalculatorTask, *, steps=600, seed=0, batch_size=64, learning_rate=3e-3,
               tool_rate: float = TOOL_RATE, progress=False):  # fmt: skip
    """A tiny GPT-2 (:func:`jaxrlhf.train.sft.tiny_model_config`) fine-tuned on the demonstrator's
    examples (:meth:`CalculatorTask.sft_batch`, loss on the policy's tokens only), the start of the
    RL run: 600 steps learn to copy the call and the tool's answer (measured in the module
    docstring) but not to multiply."""
    from flax import nnx

    from jaxrlhf.models import CausalLM
    from jaxrlhf.train.sft import SFTConfig, tiny_model_config, train_sft

    ids, mask, loss_mask, _ = task.sft_batch(tool_rate=tool_rate, seed=seed)
    width = task.max_prompt_length + task.max_new_tokens
    model = CausalLM(tiny_model_config(task.vocab_size, max_position_embeddings=width),
                     rngs=nnx.Rngs(seed))  # fmt: skip
    config = SFTConfig(steps=steps, batch_size=min(batch_size, len(ids)),
                       learning_rate=learning_rate, warmup_steps=steps // 10,
                       lr_schedule="cosine", seed=seed)  # fmt: skip
    policy, _ = train_sft(model, ids, mask, config, loss_mask=loss_mask, progress=progress)
    return policy
