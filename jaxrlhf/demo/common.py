"""What the demo's runs share: the built-in review task and the tiny GPT-2 all its models share,
the annotated preference pairs, the reward model trained on them, the evaluation by the hidden gold
reward, one PPO run, and the presets every demo run starts from (each flag of ``jaxrlhf demo``
overrides one field).

The task (:mod:`jaxrlhf.data.demo_task`) hides a "gold" reward from the learner; simulated
annotators label pairs of base-policy samples with it, noisily. Everything the learner optimises is
learned from those labels, so the gold reward measures whether RLHF really helped.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrlhf.collect import collect_preferences
from jaxrlhf.config import option, require
from jaxrlhf.data.demo_task import DemoTask, build_demo_task
from jaxrlhf.data.preference import tokenize_pairs
from jaxrlhf.logging import MetricsLogger
from jaxrlhf.models import CausalLM
from jaxrlhf.rollout import sample, sequences
from jaxrlhf.train.dpo import DPOConfig
from jaxrlhf.train.grpo_config import GRPOConfig
from jaxrlhf.train.ppo import PPOConfig, PPOTrainer
from jaxrlhf.train.reward import (
    RewardConfig,
    normalize_reward_model,
    reward_model_from_policy,
    train_reward_model,
)
from jaxrlhf.train.sft import SFTConfig, tiny_model_config

TASKS = {
    "reviews": ("ppo", "dpo"),
    "arithmetic": ("grpo", "dr_grpo", "rloo"),
    "calculator": ("grpo", "dr_grpo", "rloo"),
}


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
    task: str = option(
        "reviews",
        "reviews (a learned reward; the default) | arithmetic (exact) | calculator (exact, with a "
        "calculator tool in the episode).",
    )
    algo: str = option(
        "ppo",
        "ppo (with and without KL) | dpo (vs PPO, reviews) | grpo | dr_grpo | rloo (arithmetic, "
        "calculator).",
    )

    lora_rank: int = option(
        0,
        "LoRA adapters of this rank for the RL stage (PPO, GRPO, DPO) instead of a full fine-tune "
        "(0); its learning rate is then multiplied by lora_lr_scale.",
    )
    lora_lr_scale: float = option(
        5.0,
        "With lora_rank > 0, the RL stage's learning rate (the preset's, or yours) times this: "
        "LoRA's best rate is several times full fine-tuning's (5× on the arithmetic demo, about "
        "10× in Schulman et al. 2025). 1 keeps the rate as given.",
    )

    def __post_init__(self):
        require(self.lora_rank >= 0, self, "lora_rank", "must be ≥ 0")
        require(self.lora_lr_scale > 0, self, "lora_lr_scale", "must be > 0")
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
DEMO_SFT = SFTConfig(
    steps=500, batch_size=64, learning_rate=3e-3, lr_schedule="cosine", warmup_steps=30
)
DEMO_REWARD = RewardConfig(
    epochs=2, batch_size=32, learning_rate=1e-3, lr_schedule="cosine", warmup_steps=10,
    eval_fraction=0.15,
)  # fmt: skip
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


def evaluate(
    task: DemoTask, actor: CausalLM, reward_fn: Callable, rng, config: PPOConfig, *, reference=None
) -> dict:
    """Sample one completion per held-out prompt; gold reward, learned reward, EOS rate, texts.

    With the ``reference`` policy also ``kl``: KL(π ‖ π_ref) of the sequences, estimated by the
    mean over the samples of Σₜ log π(aₜ|sₜ) − log π_ref(aₜ|sₜ) (unbiased: the samples are π's).
    """
    batch = task.prompt_batch(task.eval_prompts)
    rollout = sample_task(task, actor, batch, rng, config)
    tokens, mask = np.asarray(rollout.tokens), np.asarray(rollout.mask)
    texts = task.decode(tokens, mask)
    finished = task.finished(tokens, mask)
    gold = task.gold_reward(task.eval_prompts, texts, finished=finished)
    learned = np.asarray(reward_fn(batch.input_ids, batch.attention_mask, rollout))
    result = {
        "gold": float(gold.mean()),
        "learned": float(learned.mean()),
        "eos_rate": float(finished.mean()),
        "samples": list(zip(task.eval_prompts, texts, gold.tolist())),
    }
    if reference is not None:
        graphdef, state = nnx.split(reference)
        kl = _sequence_kl(state, batch.input_ids, batch.attention_mask, rollout,
                          graphdef=graphdef, temperature=config.temperature)  # fmt: skip
        result["kl"] = float(kl)
    return result


@functools.partial(jax.jit, static_argnames=("graphdef", "temperature"))
def _sequence_kl(state, prompt_ids, prompt_mask, rollout, *, graphdef, temperature):
    """mean over rows of Σₜ log π(aₜ|sₜ) − log π_ref(aₜ|sₜ): rollout.logprobs against the reference
    (jitted: one compile per shape, not one per evaluation)."""
    reference = nnx.merge(graphdef, state)
    ref_logprobs, _ = reference.response_logprobs(
        prompt_ids, prompt_mask, rollout.tokens, rollout.mask, temperature=temperature
    )  # [B, N]
    log_ratio = jnp.where(rollout.mask > 0, rollout.logprobs - ref_logprobs, 0.0)
    return jnp.mean(jnp.sum(log_ratio, axis=-1))


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
                ev = evaluate(task, trainer.actor(), trainer.reward_fn, eval_key, config,
                              reference=base)  # fmt: skip
                final.update(ev)
                record.update({"gold/score": ev["gold"], "eval/learned_score": ev["learned"],
                               "eval/kl": ev["kl"]})  # fmt: skip
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


GROUP_ALGOS = {"grpo": "grpo", "dr_grpo": "dr_grpo", "rloo": "rloo"}

DEMO_GRPO = GRPOConfig(
    num_iterations=60,
    batch_size=16,
    group_size=8,
    num_minibatches=2,
    epochs=1,
    learning_rate=1e-4,
    lr_schedule="constant",
    max_new_tokens=4,
    temperature=1.0,
)
DEMO_DPO = DPOConfig(
    epochs=2, batch_size=32, learning_rate=3e-4, lr_schedule="cosine", warmup_steps=10, beta=0.1,
    eval_fraction=0.15,
)  # fmt: skip
ARITHMETIC = {"num_train": 600, "num_eval": 200, "max_operand": 19}
"""The demo's arithmetic task: + and − on 0 … 19 (800 problems), 600 for training, 200 held out."""
ARITHMETIC_SFT = {"steps": 1000, "plus_sign_rate": 0.8}
"""Its warm-up: 1000 SFT steps on answers of a sloppy demonstrator who signs 80% of the non-negative
ones ("+42", which the exact reward rejects; :func:`jaxrlhf.tasks.arithmetic.signed_answers`)."""
