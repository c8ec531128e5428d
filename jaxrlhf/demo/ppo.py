"""The default demo: the whole RLHF pipeline of InstructGPT (Ouyang et al. 2022) on the built-in
review task, offline, in minutes on a CPU.

    corpus ──SFT──▶ base policy ──samples──▶ simulated annotators ──pairs──▶ reward model (Bradley-Terry)
                         │                                                        │
                         └──────────── PPO (actor + critic, frozen reference, learned reward) ◀┘
                                        ├─ with the KL penalty:  gold reward up, KL small
                                        └─ without it (β = 0):   learned reward up, gold reward down

The gold reward the annotators used is hidden from the learner, so it measures whether RLHF really
helped, and shows reward hacking when the policy may wander far from the reference.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable

import jax
import numpy as np
from flax import nnx

from jaxrlhf.data.demo_task import DemoTask
from jaxrlhf.demo.common import (
    DemoConfig,
    build_task,
    evaluate,
    run_ppo,
    train_demo_reward_model,
)
from jaxrlhf.models import CausalLM
from jaxrlhf.report import markdown_table, plot_against_sqrt_kl, plot_curves, write_report
from jaxrlhf.train.experience import reward_model_fn
from jaxrlhf.train.ppo import PPOConfig
from jaxrlhf.train.reward import RewardConfig
from jaxrlhf.train.sft import SFTConfig, train_sft

OVER_OPTIMISATION = (
    "The plot `gold_and_proxy_vs_sqrt_kl` sets each run's gold and proxy (learned) reward against "
    "d = √KL(π ‖ π_SFT), the KL of its held-out samples at each evaluation (the SFT policy at d = 0), "
    "as Gao, Schulman & Hilton (2022) plot over-optimisation: the proxy rises with d, while the gold "
    "reward rises, peaks and falls once the policy exploits the reward model's errors. The KL "
    "penalty keeps d small; without it (β = 0) the run goes far past the gold optimum. Chapter 12 "
    "(`notebooks/12_over_optimisation.py`) fits Gao's forms to such curves and adds best-of-n."
)


def ppo_settings(ppo: PPOConfig, demo: DemoConfig) -> list[tuple[str, PPOConfig, str]]:
    """(name, config, label) of the demo's PPO runs: with the KL penalty, and (optionally) without."""
    settings = [("kl", ppo, f"PPO, β = {ppo.kl_coef}")]
    if demo.run_without_kl:
        no_kl = dataclasses.replace(ppo, kl_coef=0.0, adaptive_kl=False)
        settings.append(("no_kl", no_kl, "PPO, β = 0"))
    return settings


def run_ppo_demo(
    demo: DemoConfig,
    sft: SFTConfig,
    reward: RewardConfig,
    ppo: PPOConfig,
    *,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> dict:
    """SFT → annotated pairs → reward model → PPO with (and without) the KL penalty; writes
    ``report.md``, plots, metrics and models under ``demo.out_dir`` and returns the summary (also
    written as ``summary.json``)."""
    start = time.perf_counter()
    os.makedirs(demo.out_dir, exist_ok=True)

    def stage(label: str):
        echo(f"[demo] {time.perf_counter() - start:5.0f} s  {label} …")

    stage("building the task (corpus, tokenizer, prompts)")
    task, model_config = build_task(demo, ppo)
    stage("SFT: training the base policy on the corpus")
    base = CausalLM(model_config, rngs=nnx.Rngs(demo.seed))
    base, sft_metrics = train_sft(base, *task.corpus_batch(), sft, progress=progress)
    stage("preference pairs (simulated annotators) → reward model (Bradley-Terry)")
    reward_model, rm_summary = train_demo_reward_model(
        task, base, demo, reward, ppo, progress=progress
    )
    stage("evaluating the base policy")
    eval_key = jax.random.split(jax.random.PRNGKey(demo.seed))[1]
    results = {
        "base policy (SFT)": evaluate(task, base, reward_model_fn(reward_model), eval_key, ppo)
    }
    runs, final_kl, exported = {}, {}, None
    for name, config, label in ppo_settings(ppo, demo):
        stage(label + (" (reward hacking)" if config.kl_coef == 0 else " with the KL penalty"))
        trainer, records, results[label] = run_ppo(
            name, task, base, reward_model, config, demo, progress=progress
        )
        runs[label], final_kl[label] = records, records[-1]["objective/kl"]
        exported = exported or trainer  # the exported policy is the KL-penalised one
    if demo.save_models:
        stage("exporting the PPO policy and the reward model (Hugging Face format)")
        export_models(demo, task, exported.actor(), reward_model)
    summary = summarize(rm_summary, results, final_kl, sft_metrics, time.perf_counter() - start)
    with open(os.path.join(demo.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    _write_demo_report(demo, ppo, summary, results, runs)
    echo(f"[demo] done in {summary['seconds']:.0f} s")
    return summary


def summarize(rm_summary, results, final_kl, sft_metrics, seconds) -> dict:
    """The demo's summary.json: the reward model, each policy's rewards, KL and EOS rate."""
    return {
        "reward_model": rm_summary,
        "policies": {
            name: {
                "gold_reward": r["gold"],
                "learned_reward": r["learned"],
                "eos_rate": r["eos_rate"],
                "kl_to_reference": final_kl.get(name, 0.0),
            }
            for name, r in results.items()
        },
        "sft_final_loss": float(np.mean(sft_metrics["loss"][-20:])),
        "seconds": seconds,
    }


def export_models(demo: DemoConfig, task: DemoTask, policy: CausalLM, reward_model) -> None:
    """The PPO policy and the reward model as Hugging Face directories under ``demo.out_dir``."""
    from jaxrlhf.models.hf import save_pretrained

    for model, name in ((policy, "policy"), (reward_model, "reward_model")):
        save_pretrained(model, os.path.join(demo.out_dir, name), tokenizer=task.tokenizer)


def _write_demo_report(demo, ppo, summary, results, runs) -> str:
    rm = summary["reward_model"]
    rows = [{"policy": name, **values} for name, values in summary["policies"].items()]
    policy_table = markdown_table(
        rows, ["policy", "gold_reward", "learned_reward", "kl_to_reference", "eos_rate"]
    )
    samples = []
    for name, r in results.items():
        samples.append(f"**{name}**\n")
        for prompt, text, gold in r["samples"][: demo.num_samples_shown]:
            samples.append(f"- `{prompt}` → `{text}` (gold {gold:+.0f})")
        samples.append("")
    sections = [
        (
            "Reward model",
            (
                f"Held-out pairwise accuracy **{rm['held_out_accuracy']:.3f}** on "
                f"{rm['num_eval_pairs']} annotated pairs (trained on {rm['num_train_pairs']}). "
                f"The gold reward ties on {rm['gold_tie_fraction']:.3f} of the pairs (a coin flip "
                "for the annotators); on the others the noisy annotators pick the gold-better "
                f"response {rm['annotator_gold_agreement']:.3f} of the time."
            ),
        ),
        (
            "Policies (held-out prompts)",
            policy_table
            + "\n\n`gold_reward` is the hidden reward the annotators used; `learned_reward` is the "
            "reward model's (normalised) score; `kl_to_reference` is the mean per-sequence KL "
            "(`objective/kl`) at the last PPO iteration.",
        ),
        ("Samples", "\n".join(samples)),
        ("Run", f"{summary['seconds']:.0f} s in total. Config: PPO {ppo}."),
    ]
    plots = plot_curves(runs, os.path.join(demo.out_dir, "plots"))
    start = results["base policy (SFT)"]
    over = plot_against_sqrt_kl(runs, start, os.path.join(demo.out_dir, "plots", "gold_vs_kl.png"))
    if over:
        plots["gold_and_proxy_vs_sqrt_kl"] = over
        sections.insert(2, ("Over-optimisation", OVER_OPTIMISATION))
    return write_report(
        os.path.join(demo.out_dir, "report.md"),
        title="jaxrlhf demo: RLHF with PPO on the built-in review task",
        sections=sections,
        plots=plots,
    )
