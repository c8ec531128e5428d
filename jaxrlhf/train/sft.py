"""Supervised fine-tuning: the base policy learns the corpus by next-token prediction.

    L(θ) = − Σ_{b,t} m_{b,t+1} · log π_θ(x_{b,t+1} | x_{b,≤t}) / Σ_{b,t} m_{b,t+1}

over a batch of right- (or left-) padded sequences x [B, T] with mask m (1 = real token); a target
counts only when both it and its context token are real. This is the "SFT" stage before RLHF
(Ouyang et al. 2022, arXiv:2203.02155 §3.5): the policy that PPO starts from and the reference it
is kept close to.

Training runs through the trainers' one train step (``jaxrlhf.train.state``): the loss is a
:class:`NextTokenLoss`, a (sum, count) pair of the negative log-likelihood, so SFT gets the same
data parallelism (pmap / shard_map), gradient-norm logging, buffer donation and orbax resume as PPO.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import chex
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrlhf.config import option, require
from jaxrlhf.rl import masked_sum, token_logprobs
from jaxrlhf.train.loop import LoopConfig, fit
from jaxrlhf.train.optim import OptimizerConfig
from jaxrlhf.train.state import Means, init_train_state, make_train_step


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTConfig(LoopConfig):
    """Hyperparameters of supervised fine-tuning on a text corpus."""

    steps: int = option(300, "Number of optimiser steps.")
    batch_size: int = option(64, "Sequences per step.")
    learning_rate: float = option(3e-3, "Peak AdamW learning rate (cosine decay).")
    warmup_steps: int = option(30, "Linear learning-rate warm-up steps.")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    max_grad_norm: float = option(1.0, "Clip the global gradient norm to this value (0: no clip).")
    seed: int = option(0, "Seed of the batch shuffling.")

    def __post_init__(self):
        super().__post_init__()
        require(self.steps >= 1, self, "steps", "must be >= 1")
        require(self.batch_size >= 1, self, "batch_size", "must be >= 1")
        require(self.learning_rate > 0, self, "learning_rate", "must be > 0")
        require(0 <= self.warmup_steps < self.steps, self, "warmup_steps", "must be in [0, steps)")
        require(self.weight_decay >= 0, self, "weight_decay", "must be >= 0")
        require(self.max_grad_norm >= 0, self, "max_grad_norm", "must be >= 0")

    @property
    def optimizer(self) -> OptimizerConfig:
        return OptimizerConfig(
            learning_rate=self.learning_rate,
            total_steps=self.steps,
            schedule="cosine",
            warmup_steps=self.warmup_steps,
            max_grad_norm=self.max_grad_norm if self.max_grad_norm > 0 else None,
            weight_decay=self.weight_decay,
        )


def tiny_model_config(vocab_size: int, *, max_position_embeddings: int = 64, **overrides):
    """The demo's tiny GPT-2 (2 layers, width 64, 4 heads); ``overrides`` replace any field."""
    from jaxrlhf.models import ModelConfig

    fields = {
        "family": "gpt2",
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "num_layers": 2,
        "num_heads": 4,
        "max_position_embeddings": max_position_embeddings,
    }
    return ModelConfig(**{**fields, **overrides})


def next_token_terms(logits, input_ids, attention_mask) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(Σ −log π(x_{t+1} | x_≤t), number of predicted tokens): the SFT loss as a (sum, count) pair.

    Args:
      logits: [B, T, V] float32; logits[:, t] predict input_ids[:, t + 1].
      input_ids: [B, T] int.
      attention_mask: [B, T] 0/1.
    """
    chex.assert_rank([logits, input_ids, attention_mask], [3, 2, 2])
    chex.assert_equal_shape([input_ids, attention_mask])
    logprobs = token_logprobs(logits[:, :-1], input_ids[:, 1:])  # [B, T-1]
    mask = attention_mask[:, 1:] * attention_mask[:, :-1]  # [B, T-1]
    return -masked_sum(logprobs, mask), jnp.sum(mask.astype(jnp.float32))


def next_token_loss(logits, input_ids, attention_mask):
    """Masked next-token cross-entropy (the SFT loss in the module docstring): the mean negative
    log-likelihood per predicted token (0 when no token is predicted)."""
    total, count = next_token_terms(logits, input_ids, attention_mask)
    return total / jnp.maximum(count, 1.0)


@dataclasses.dataclass(frozen=True)
class NextTokenLoss:
    """The SFT loss of a CausalLM (``graphdef``) on a batch (input_ids, attention_mask)."""

    graphdef: Any
    weights: tuple[tuple[str, float], ...] = (("sft/nll", 1.0),)

    def __call__(self, params, batch) -> Means:
        ids, mask = batch
        lm = nnx.merge(self.graphdef, params)
        return {"sft/nll": next_token_terms(lm(ids, mask), ids, mask)}


def train_sft(
    model,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    config: SFTConfig,
    *,
    progress: bool = True,
) -> tuple[Any, dict[str, Any]]:
    """Train a CausalLM on fixed-shape sequences by next-token prediction.

    Args:
      model: a ``jaxrlhf.models.CausalLM`` (not modified; a trained copy is returned).
      input_ids: [N, T] int token ids (padded).
      attention_mask: [N, T] 0/1.
      config: the hyperparameters (and devices / checkpoints: a run with ``checkpoint_dir``
        resumes from the latest checkpoint there).
      progress: show a tqdm progress bar.
    Returns:
      (trained model, metrics) with metrics["loss"] the per-step training loss (list of floats)
      and metrics["grad_norm"].
    """
    chex.assert_rank([input_ids, attention_mask], 2)
    chex.assert_equal_shape([input_ids, attention_mask])
    if len(input_ids) < config.batch_size:
        raise ValueError(
            f"SFTConfig.batch_size = {config.batch_size}: larger than the {len(input_ids)} sequences"
        )
    graphdef, params = nnx.split(model)
    stepper = make_train_step(
        NextTokenLoss(graphdef),
        config.optimizer,
        parallelism=config.parallelism,
        num_devices=config.num_devices,
    )
    state, history = fit(
        stepper,
        init_train_state(params, config.optimizer),
        (np.asarray(input_ids), np.asarray(attention_mask)),
        batch_size=config.batch_size,
        steps=config.steps,
        seed=config.seed,
        config=config,
        desc="sft",
        progress=progress,
    )
    metrics = {name: [m[name] for m in history] for name in ("loss", "grad_norm")}
    return nnx.merge(graphdef, state.params), metrics
