"""The demo's other algorithms: GRPO / Dr. GRPO / RLOO on the built-in arithmetic task (an exact
reward), and DPO on the review task (compared with PPO on the same preference pairs).

    jaxrlhf demo --task arithmetic --algo grpo      # held-out accuracy before → after
    jaxrlhf demo --algo dpo                         # gold reward: SFT → DPO, and → PPO
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax

from jaxrlhf.demo.common import (
    ARITHMETIC,
    ARITHMETIC_SFT,
    GROUP_ALGOS,
    build_task,
    demo_pairs,
    evaluate,
    run_ppo,
    train_demo_reward_model,
)
from jaxrlhf.logging import MetricsLogger
from jaxrlhf.report import markdown_table, plot_curves, write_report
from jaxrlhf.train.dpo import DPOConfig, train_dpo
from jaxrlhf.train.grpo import GRPOTrainer, text_reward_fn
from jaxrlhf.train.grpo_config import GRPOConfig


def run_arithmetic(demo, grpo: GRPOConfig, *, progress: bool, echo) -> dict:
    """SFT a tiny policy on a little arithmetic (from a demonstrator with a habit), then a critic-free
    algorithm with the exact reward (correctness + 0.1 · format); held-out greedy accuracy and the
    fraction of well-formed answers before and after."""
    from jaxrlhf.tasks.arithmetic import build_arithmetic_task, sft_policy

    start = time.perf_counter()
    os.makedirs(demo.out_dir, exist_ok=True)
    echo("[demo] arithmetic task: SFT of the base policy …")
    task = build_arithmetic_task(demo.seed, **ARITHMETIC)
    base = sft_policy(task, seed=demo.seed, progress=progress, **ARITHMETIC_SFT)
    before = task.evaluate(base, with_format=True)
    config = dataclasses.replace(
        grpo, advantage=GROUP_ALGOS[demo.algo], max_new_tokens=task.max_new_tokens
    )
    if demo.algo == "dr_grpo":
        config = dataclasses.replace(config, loss_aggregation="seq_mean_token_sum_norm")
    echo(
        f"[demo] {time.perf_counter() - start:5.0f} s  {demo.algo} from accuracy "
        f"{before['accuracy']:.3f} …"
    )
    reward_fn = text_reward_fn(
        [task.correctness_reward, task.format_reward], task.tokenizer, weights=[1.0, 0.1]
    )
    batch = task.prompt_batch(task.train_prompts)
    trainer = GRPOTrainer.from_sft(
        config, base, batch[0], batch[1], reward_fn=reward_fn,
        eos_token_id=task.eos_token_id, pad_token_id=task.pad_token_id,
    )  # fmt: skip
    with MetricsLogger(os.path.join(demo.out_dir, f"metrics_{demo.algo}.jsonl")) as log:
        history = trainer.train(callback=log.log, progress=progress)
    after = task.evaluate(trainer.actor(), with_format=True)
    summary = {
        "task": "arithmetic",
        "algo": demo.algo,
        "held_out_accuracy": {"before": before["accuracy"], "after": after["accuracy"]},
        "held_out_well_formed": {"before": before["format"], "after": after["format"]},
        "num_eval_prompts": len(task.eval_prompts),
        "final_reward": history[-1]["reward"],
        "lora_rank": config.lora_rank,  # 0: a full fine-tune
        "learning_rate": config.learning_rate,
        "seconds": time.perf_counter() - start,
    }
    records = [{"step": i + 1, **m} for i, m in enumerate(history)]
    _report(demo, summary, {demo.algo: records}, {"reward": ("reward",)})
    echo(
        f"[demo] held-out accuracy {before['accuracy']:.3f} → {after['accuracy']:.3f}, well-formed "
        f"answers {before['format']:.3f} → {after['format']:.3f} ({summary['seconds']:.0f} s)"
    )
    return summary


def run_dpo(demo, sft, reward, ppo, dpo: DPOConfig, *, progress: bool, echo) -> dict:
    """The review task: SFT → annotated pairs → DPO on those pairs, and PPO (with the reward model
    trained on the same pairs) for comparison; gold reward of each policy on held-out prompts."""
    from flax import nnx

    from jaxrlhf.models import CausalLM
    from jaxrlhf.train.experience import reward_model_fn
    from jaxrlhf.train.sft import train_sft

    start = time.perf_counter()
    os.makedirs(demo.out_dir, exist_ok=True)
    task, model_config = build_task(demo, ppo)
    echo("[demo] SFT, annotated pairs, reward model …")
    base = CausalLM(model_config, rngs=nnx.Rngs(demo.seed))
    base, _ = train_sft(base, *task.corpus_batch(), sft, progress=progress)
    collected = demo_pairs(task, base, demo)  # once: the reward model and DPO share the pairs
    reward_model, _ = train_demo_reward_model(
        task, base, demo, reward, ppo, progress=progress, pairs=collected
    )
    pairs = collected[0]
    eval_key = jax.random.split(jax.random.PRNGKey(demo.seed))[1]
    reward_fn = reward_model_fn(reward_model)
    results = {"base policy (SFT)": evaluate(task, base, reward_fn, eval_key, ppo)}
    echo(f"[demo] {time.perf_counter() - start:5.0f} s  DPO (β = {dpo.beta}) …")
    policy, dpo_metrics = train_dpo(base, pairs, dpo, progress=progress)
    results[f"DPO, β = {dpo.beta}"] = evaluate(task, policy, reward_fn, eval_key, ppo)
    echo(f"[demo] {time.perf_counter() - start:5.0f} s  PPO (β = {ppo.kl_coef}) for comparison …")
    _, _, results[f"PPO, β = {ppo.kl_coef}"] = run_ppo(
        "kl", task, base, reward_model, ppo, demo, progress=progress
    )
    summary = {
        "task": "reviews",
        "algo": "dpo",
        "dpo_held_out_implicit_reward_accuracy": dpo_metrics["eval_accuracy"][-1],
        "policies": {
            name: {
                "gold_reward": r["gold"],
                "learned_reward": r["learned"],
                "eos_rate": r["eos_rate"],
            }
            for name, r in results.items()
        },
        "seconds": time.perf_counter() - start,
    }
    records = [{"step": i + 1, "loss": loss} for i, loss in enumerate(dpo_metrics["loss"])]
    _report(demo, summary, {"dpo": records}, {"dpo loss": ("loss",)})
    echo(f"[demo] done in {summary['seconds']:.0f} s")
    return summary


def _report(demo, summary: dict, runs: dict, curves: dict) -> None:
    with open(os.path.join(demo.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    sections = [("Result", "```json\n" + json.dumps(summary, indent=2) + "\n```")]
    if "policies" in summary:
        rows = [{"policy": k, **v} for k, v in summary["policies"].items()]
        table = markdown_table(rows, ["policy", "gold_reward", "learned_reward", "eos_rate"])
        sections.insert(0, ("Policies (held-out prompts)", table))
    write_report(
        os.path.join(demo.out_dir, "report.md"),
        title=f"jaxrlhf demo: {summary['algo']} on the {summary['task']} task",
        sections=sections,
        plots=plot_curves(runs, os.path.join(demo.out_dir, "plots"), curves=curves),
    )
