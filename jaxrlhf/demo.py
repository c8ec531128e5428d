"""The default demo: the seed's whole RLHF pipeline on a built-in task, offline, in minutes on a CPU.

    corpus ──SFT──▶ base policy ──samples──▶ simulated annotators ──pairs──▶ reward model (Bradley-Terry)
                         │                                                        │
                         └──────────── PPO (actor + critic, frozen reference, learned reward) ◀┘
                                        ├─ with the KL penalty:  gold reward up, KL small
                                        └─ without it (β = 0):   learned reward up, gold reward down

The task (:mod:`jaxrlhf.data.demo_task`) hides a "gold" reward from the learner; the annotators label
pairs of base-policy samples with it, noisily. Everything the learner optimises is learned from
those labels, so the gold reward measures whether RLHF really helped — and shows reward hacking when
the policy is allowed to wander far from the reference.
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

from jaxrlhf.collect import collect_preferences
from jaxrlhf.config import option, require
from jaxrlhf.data.demo_task import DemoTask, build_demo_task
from jaxrlhf.data.preference import tokenize_pairs
from jaxrlhf.logging import MetricsLogger
from jaxrlhf.models import CausalLM
from jaxrlhf.report import markdown_table, plot_curves, write_report
from jaxrlhf.rollout import sample, sequences
from jaxrlhf.train.experience import reward_model_fn
from jaxrlhf.train.ppo import PPOConfig, PPOTrainer
from jaxrlhf.train.reward import (
    RewardConfig,
    normalize_reward_model,
    reward_model_from_policy,
    train_reward_model,
)
from jaxrlhf.train.sft import SFTConfig, tiny_model_config, train_sft

TASKS = {"reviews": ("ppo", "dpo"), "arithmetic": ("grpo", "dr_grpo", "rloo")}


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """The built-in demo task and what the demo runs (SFT, reward model and PPO have their own)."""

    out_dir: str = option("runs/demo", "Where the metrics, report, plots and models are written.")
    seed: int = option(0, "Seed of the task, the models and the sampling.")
    hidden_size: int = option(64, "Width of the tiny GPT-2 (all four models share its shape).")
    num_layers: int = option(2, "Transformer blocks of the tiny GPT-2.")
    num_sentences: int = option(4000, "Sentences in the SFT corpus of the built-in task.")
    num_prompts: int = option(512, "PPO training prompts of the built-in task.")
    num_eval_prompts: int = option(
        128, "Held-out prompts on which gold and learned rewards are measured."
    )
    num_pairs: int = option(2048, "Preference pairs labelled by the simulated annotators.")
    eval_every: int = option(5, "Measure the gold reward every this many PPO iterations.")
    run_without_kl: bool = option(True, "Also run PPO with kl_coef = 0 to show reward hacking.")
    num_samples_shown: int = option(6, "Completions shown in the report before and after PPO.")
    save_models: bool = option(True, "Export the policy and reward model (Hugging Face format).")
    task: str = option("reviews", "reviews (a learned reward; the default) | arithmetic (exact).")
    algo: str = option(
        "ppo",
        "ppo (with and without KL) | dpo (vs PPO, reviews) | grpo | dr_grpo | rloo (arithmetic).",
    )

    def __post_init__(self):
        for name in ("hidden_size", "num_layers", "num_sentences", "num_prompts", "num_pairs"):
            require(getattr(self, name) >= 1, self, name, "must be ≥ 1")
        require(self.num_eval_prompts >= 2, self, "num_eval_prompts", "must be ≥ 2")
        require(self.eval_every >= 1, self, "eval_every", "must be ≥ 1")
        require(self.num_samples_shown >= 0, self, "num_samples_shown", "must be ≥ 0")
        require(self.task in TASKS, self, "task", f"must be one of {tuple(TASKS)}")
        require(
            self.algo in TASKS[self.task],
            self,
            "algo",
            f"must be one of {TASKS[self.task]} for task {self.task!r}",
        )


# The presets the demo runs with (each flag of `jaxrlhf demo` overrides one field).
DEMO_SFT = SFTConfig(steps=500, batch_size=64, learning_rate=3e-3, warmup_steps=30)
DEMO_REWARD = RewardConfig(epochs=2, batch_size=32, learning_rate=1e-3, eval_fraction=0.15)
DEMO_PPO = PPOConfig(
    num_iterations=40,
    batch_size=64,
    num_minibatches=2,
    ppo_epochs=2,
    max_new_tokens=24,
    learning_rate=3e-4,
    lr_schedule="constant",
    kl_coef=0.1,
    kl_estimator="k1",
    vf_coef=0.1,
    lam=0.95,
    gamma=1.0,
)


def sample_task(task: DemoTask, actor: CausalLM, batch, rng, config: PPOConfig):
    """One completion per prompt of ``batch``, sampled as PPO samples (length, temperature)."""
    return sample(
        actor, batch.input_ids, batch.attention_mask, config.sampling, rng,
        eos_token_id=task.eos_token_id, pad_token_id=task.pad_token_id,
    )  # fmt: skip


def evaluate(task: DemoTask, actor: CausalLM, reward_fn: Callable, rng, config: PPOConfig) -> dict:
    """Sample one completion per held-out prompt; gold reward, learned reward, EOS rate, texts."""
    batch = task.prompt_batch(task.eval_prompts)
    rollout = sample_task(task, actor, batch, rng, config)
    tokens, mask = np.asarray(rollout.tokens), np.asarray(rollout.mask)
    texts = task.decode(tokens, mask)
    finished = task.finished(tokens, mask)
    gold = task.gold_reward(task.eval_prompts, texts, finished=finished)
    learned = np.asarray(reward_fn(batch.input_ids, batch.attention_mask, rollout))
    return {
        "gold": float(gold.mean()),
        "learned": float(learned.mean()),
        "eos_rate": float(finished.mean()),
        "samples": list(zip(task.eval_prompts, texts, gold.tolist())),
    }


def run_ppo(
    name: str,
    task: DemoTask,
    base: CausalLM,
    reward_model,
    config: PPOConfig,
    demo: DemoConfig,
    *,
    progress: bool,
) -> tuple[PPOTrainer, list[dict], dict]:
    """PPO from the base policy against the reward model; gold reward every ``eval_every``.

    Each run checkpoints (when asked) into its own ``<checkpoint_dir>/<name>``. Returns the
    trainer, the metric records and the evaluation after the last iteration.
    """
    if config.checkpoint_dir:
        config = dataclasses.replace(
            config, checkpoint_dir=os.path.join(config.checkpoint_dir, name)
        )
    prompts = task.prompt_batch()
    trainer = PPOTrainer.from_sft(
        config, base, prompts.input_ids, prompts.attention_mask, reward_model=reward_model,
        eos_token_id=task.eos_token_id, pad_token_id=task.pad_token_id,
    )  # fmt: skip
    records: list[dict] = []
    final: dict = {}
    eval_key = jax.random.PRNGKey(demo.seed + 2)
    with MetricsLogger(os.path.join(demo.out_dir, f"metrics_{name}.jsonl")) as log:

        def callback(iteration: int, metrics: dict) -> None:
            record = dict(metrics)
            if iteration % demo.eval_every == 0 or iteration == config.num_iterations:
                ev = evaluate(task, trainer.actor(), trainer.reward_fn, eval_key, config)
                final.update(ev)
                record.update({"gold/score": ev["gold"], "eval/learned_score": ev["learned"]})
            log.log(iteration, record)
            records.append({"step": iteration, **record})

        trainer.train(callback=callback, progress=progress)
    return trainer, records, final


def build_task(demo: DemoConfig, ppo: PPOConfig) -> tuple[DemoTask, object]:
    """The built-in task and the tiny GPT-2 config that all four models share."""
    task = build_demo_task(
        demo.seed,
        num_sentences=demo.num_sentences,
        num_prompts=max(demo.num_prompts, ppo.batch_size),
        num_eval_prompts=demo.num_eval_prompts,
        max_response_length=ppo.max_new_tokens + 1,  # + the EOS appended to annotated responses
    )
    model_config = tiny_model_config(
        task.vocab_size,
        hidden_size=demo.hidden_size,
        num_layers=demo.num_layers,
        max_position_embeddings=task.data_config.max_prompt_length + ppo.max_new_tokens + 8,
    )
    return task, model_config


def demo_pairs(task, base, demo):
    """The annotated pairs of base-policy samples (tokenised), as the reward model and DPO see them;
    also written as the demo's data files (runs/demo/data/*.jsonl, the README's examples)."""
    key = jax.random.PRNGKey(demo.seed)
    dataset, pair_info = collect_preferences(
        task, base, jax.random.split(key)[0], num_pairs=demo.num_pairs, seed=demo.seed
    )
    task.write_data_files(os.path.join(demo.out_dir, "data"), dataset)
    # Re-tokenising decoded text can add a token or two; cut those (the data code counts them).
    pair_config = dataclasses.replace(task.data_config, truncate=True)
    pairs = tokenize_pairs(dataset, task.tokenizer, pair_config)
    return pairs, pair_info


def train_demo_reward_model(
    task, base, demo, reward: RewardConfig, ppo: PPOConfig, *, progress, pairs=None
):
    """Annotated pairs of base-policy samples (``pairs``: those of :func:`demo_pairs`, collected
    here when None) → Bradley-Terry reward model → normalised on the base policy's samples.
    Returns (reward model, summary of the reward model)."""
    key = jax.random.PRNGKey(demo.seed)
    pairs, pair_info = pairs or demo_pairs(task, base, demo)
    gold_c, gold_r = pair_info["gold_chosen"], pair_info["gold_rejected"]
    untied = gold_c != gold_r  # pairs where the gold reward has a preference at all
    reward_model = reward_model_from_policy(base, seed=demo.seed)
    reward_model, rm_metrics = train_reward_model(reward_model, pairs, reward, progress=progress)
    prompts = task.prompt_batch()
    rollout = sample_task(task, base, prompts, jax.random.fold_in(key, 7), ppo)
    seq_ids, seq_mask = (
        np.asarray(x) for x in sequences(prompts.input_ids, prompts.attention_mask, rollout)
    )
    reward_model, norm_stats = normalize_reward_model(reward_model, seq_ids, seq_mask)
    return reward_model, {
        "held_out_accuracy": float(rm_metrics["eval_accuracy"][-1]),
        "num_train_pairs": int(rm_metrics["num_train_pairs"]),
        "num_eval_pairs": int(rm_metrics["num_eval_pairs"]),
        "annotator_gold_agreement": float(np.mean(gold_c[untied] > gold_r[untied]))
        if untied.any()
        else 0.0,
        "gold_tie_fraction": float(1.0 - untied.mean()),
        **norm_stats,
    }


def ppo_settings(ppo: PPOConfig, demo: DemoConfig) -> list[tuple[str, PPOConfig, str]]:
    """(name, config, label) of the demo's PPO runs: with the KL penalty, and (optionally) without."""
    settings = [("kl", ppo, f"PPO, β = {ppo.kl_coef}")]
    if demo.run_without_kl:
        no_kl = dataclasses.replace(ppo, kl_coef=0.0, adaptive_kl=False)
        settings.append(("no_kl", no_kl, "PPO, β = 0"))
    return settings


def run_demo(
    demo: DemoConfig = DemoConfig(),
    sft: SFTConfig = DEMO_SFT,
    reward: RewardConfig = DEMO_REWARD,
    ppo: PPOConfig = DEMO_PPO,
    *,
    grpo=None,
    dpo=None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> dict:
    """Run the whole demo; writes ``report.md``, plots, metrics and models under ``demo.out_dir``.

    Returns the summary (also written as ``summary.json``). ``demo.algo`` other than "ppo" runs
    :mod:`jaxrlhf.demo_algorithms` (with ``grpo`` / ``dpo`` settings, their presets by default).
    """
    if demo.algo != "ppo":
        from jaxrlhf import demo_algorithms as other

        if demo.algo == "dpo":
            return other.run_dpo(demo, sft, reward, ppo, dpo or other.DEMO_DPO,
                                 progress=progress, echo=echo)  # fmt: skip
        return other.run_arithmetic(demo, grpo or other.DEMO_GRPO, progress=progress, echo=echo)
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
    echo(
        f"[demo] done in {summary['seconds']:.0f} s; report: {os.path.join(demo.out_dir, 'report.md')}"
    )
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
    return write_report(
        os.path.join(demo.out_dir, "report.md"),
        title="jaxrlhf demo: RLHF with PPO on the built-in review task",
        sections=sections,
        plots=plots,
    )
