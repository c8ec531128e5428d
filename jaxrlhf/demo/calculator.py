"""The demo's tool-use run: GRPO on products the policy cannot compute, with a calculator to call.

    jaxrlhf demo --task calculator --algo grpo

A tiny GPT-2 is warmed up on a demonstrator who calls the calculator in 30% of its answers and
multiplies in its head (unlearnably, for this model) in the rest; GRPO with the exact reward then
teaches it when the tool pays. The episodes are sampled in turns (``tools.sample_turns``): the
calculator's answers are tokens of the episode, attended to but outside the loss (mask 0).
``summary.json`` holds the held-out accuracy and tool calls per episode before and after, and the
trained policy's accuracy when the tool answers nothing (what of the accuracy is the tool's).
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import numpy as np

from jaxrlhf.data.task import decode_rows
from jaxrlhf.logging import MetricsLogger
from jaxrlhf.report import markdown_table, plot_curves, write_report
from jaxrlhf.rollout import SamplingConfig
from jaxrlhf.train.grpo import GRPOTrainer
from jaxrlhf.train.grpo_config import GRPOConfig

CALCULATOR = {"num_train": 2000, "num_eval": 200}
"""The demo's calculator task: 3-digit × 2-digit products, 2000 for training, 200 held out."""
CALCULATOR_SFT = {"steps": 600, "tool_rate": 0.3}
"""Its warm-up: 600 SFT steps on a demonstrator who calls the calculator in 30% of its answers."""


def run_calculator(demo, grpo: GRPOConfig, *, group_advantage: str, progress: bool, echo) -> dict:
    """SFT from the demonstrator, then a critic-free algorithm with the calculator in the episode."""
    from jaxrlhf.tasks.calculator_task import build_calculator_task, sft_policy

    start = time.perf_counter()
    os.makedirs(demo.out_dir, exist_ok=True)
    echo("[demo] calculator task: SFT of the base policy on the demonstrator …")
    task = build_calculator_task(demo.seed, **CALCULATOR)
    base = sft_policy(task, seed=demo.seed, progress=progress, **CALCULATOR_SFT)
    before = task.evaluate(base)
    config = dataclasses.replace(
        grpo, advantage=group_advantage, max_new_tokens=task.max_new_tokens, seed=demo.seed
    )
    if demo.algo == "dr_grpo":
        config = dataclasses.replace(config, loss_aggregation="seq_mean_token_sum_norm")
    echo(f"[demo] {time.perf_counter() - start:5.0f} s  {demo.algo} with the calculator from "
         f"accuracy {before['accuracy']:.3f}, {before['tool_calls']:.2f} calls per episode …")  # fmt: skip
    ids, mask, _ = task.prompt_batch(task.train_prompts)
    trainer = GRPOTrainer.from_sft(
        config, base, ids, mask, reward_fn=task.reward_fn(), sampler=task.sampler(),
        eos_token_id=task.eos_token_id, pad_token_id=task.pad_token_id,
    )  # fmt: skip
    with MetricsLogger(os.path.join(demo.out_dir, f"metrics_{demo.algo}.jsonl")) as log:
        history = trainer.train(callback=log.log, progress=progress)
    policy = trainer.actor()
    after = task.evaluate(policy)
    without_tool = task.evaluate(policy, toolbox=task.toolbox(mute_tool=True))
    summary = {
        "task": "calculator",
        "algo": demo.algo,
        "held_out_accuracy": {"before": before["accuracy"], "after": after["accuracy"]},
        "tool_calls_per_episode": {"before": before["tool_calls"], "after": after["tool_calls"]},
        "held_out_accuracy_without_tool": without_tool["accuracy"],
        "num_eval_prompts": len(task.eval_prompts),
        "final_reward": history[-1]["reward"],
        "seconds": time.perf_counter() - start,
    }
    records = [{"step": i + 1, **m} for i, m in enumerate(history)]
    samples = episodes(task, policy, task.eval_prompts[: demo.num_samples_shown])
    _report(demo, summary, records, samples)
    echo(
        f"[demo] held-out accuracy {before['accuracy']:.3f} → {after['accuracy']:.3f} "
        f"({without_tool['accuracy']:.3f} with a tool that answers nothing), tool calls per "
        f"episode {before['tool_calls']:.2f} → {after['tool_calls']:.2f} ({summary['seconds']:.0f} s)"
    )
    return summary


def episodes(task, policy, prompts) -> list[dict]:
    """Greedy episodes of ``policy`` as text, the calculator's turns included."""
    if not prompts:
        return []
    ids, mask, _ = task.prompt_batch(list(prompts))
    config = SamplingConfig(max_new_tokens=task.max_new_tokens, greedy=True)
    rollout = task.sampler()(policy, ids, mask, config, jax.random.PRNGKey(0),
                             eos_token_id=task.eos_token_id, pad_token_id=task.pad_token_id)  # fmt: skip
    tokens, attention = np.asarray(rollout.tokens), np.asarray(rollout.attention_mask)
    texts = decode_rows(task.tokenizer, tokens, attention)
    rewards = task.reward(list(prompts), texts)
    return [{"prompt": p, "episode": t.replace("<", "&lt;"), "reward": r}
            for p, t, r in zip(prompts, texts, rewards)]  # fmt: skip


def _report(demo, summary: dict, records: list[dict], samples: list[dict]) -> None:
    import json

    with open(os.path.join(demo.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    sections = [("Result", "```json\n" + json.dumps(summary, indent=2) + "\n```")]
    if samples:
        table = markdown_table(samples, ["prompt", "episode", "reward"])
        sections.append(("Held-out episodes of the trained policy (greedy)", table))
    curves = {"reward": ("reward",), "tool_calls": ("tools/calls_per_episode",)}
    write_report(
        os.path.join(demo.out_dir, "report.md"),
        title=f"jaxrlhf demo: {summary['algo']} with a calculator",
        sections=sections,
        plots=plot_curves({demo.algo: records}, os.path.join(demo.out_dir, "plots"), curves=curves),
    )
