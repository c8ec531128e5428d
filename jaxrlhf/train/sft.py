"""Supervised fine-tuning: the base policy learns the corpus by next-token prediction.

    L(θ) = − Σ_{b,t} m_{b,t+1} · log π_θ(x_{b,t+1} | x_{b,≤t}) / Σ_{b,t} m_{b,t+1}

over a batch of right- (or left-) padded sequences x [B, T] with mask m (1 = real token); a target
counts only when both it and its context token are real. This is the "SFT" stage before RLHF
(Ouyang et al. 2022, arXiv:2203.02155 §3.5): the policy that PPO starts from and the reference it
is kept close to.

The step is jitted once: the model is split into a graph definition and its parameters
(``nnx.split``) outside ``jax.jit``, merged back inside the pure step, and the new parameters are
returned (the Flax NNX performance-guide pattern).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from jaxrlhf.config import option, require
from jaxrlhf.data.preference import iterate_batches
from jaxrlhf.rl import masked_mean, token_logprobs
from jaxrlhf.train.optim import make_optimizer


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTConfig:
    """Hyperparameters of supervised fine-tuning on a text corpus."""

    steps: int = option(300, "Number of optimiser steps.")
    batch_size: int = option(64, "Sequences per step.")
    learning_rate: float = option(3e-3, "Peak AdamW learning rate (cosine decay).")
    warmup_steps: int = option(30, "Linear learning-rate warm-up steps.")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    max_grad_norm: float = option(1.0, "Clip the global gradient norm to this value (0: no clip).")
    seed: int = option(0, "Seed of the batch shuffling.")

    def __post_init__(self):
        require(self.steps >= 1, self, "steps", "must be >= 1")
        require(self.batch_size >= 1, self, "batch_size", "must be >= 1")
        require(self.learning_rate > 0, self, "learning_rate", "must be > 0")
        require(0 <= self.warmup_steps < self.steps, self, "warmup_steps", "must be in [0, steps)")
        require(self.weight_decay >= 0, self, "weight_decay", "must be >= 0")
        require(self.max_grad_norm >= 0, self, "max_grad_norm", "must be >= 0")


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


def next_token_loss(logits, input_ids, attention_mask):
    """Masked next-token cross-entropy (the SFT loss in the module docstring).

    Args:
      logits: [B, T, V] float32; logits[:, t] predict input_ids[:, t + 1].
      input_ids: [B, T] int.
      attention_mask: [B, T] 0/1.
    Returns:
      scalar mean negative log-likelihood per predicted token.
    """
    chex.assert_rank([logits, input_ids, attention_mask], [3, 2, 2])
    chex.assert_equal_shape([input_ids, attention_mask])
    logprobs = token_logprobs(logits[:, :-1], input_ids[:, 1:])  # [B, T-1]
    mask = attention_mask[:, 1:] * attention_mask[:, :-1]  # [B, T-1]
    return -masked_mean(logprobs, mask)


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
      config: the hyperparameters.
      progress: show a tqdm progress bar.
    Returns:
      (trained model, metrics) with metrics["loss"] the per-step training loss (list of floats).
    """
    chex.assert_rank([input_ids, attention_mask], 2)
    chex.assert_equal_shape([input_ids, attention_mask])
    if len(input_ids) < config.batch_size:
        raise ValueError(
            f"SFTConfig.batch_size = {config.batch_size}: larger than the {len(input_ids)} sequences"
        )
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    optimizer = make_optimizer(
        learning_rate=config.learning_rate,
        total_steps=config.steps,
        schedule="cosine",
        warmup_steps=config.warmup_steps,
        max_grad_norm=config.max_grad_norm if config.max_grad_norm > 0 else None,
        weight_decay=config.weight_decay,
    )
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, ids, mask):
        def loss_fn(params):
            lm = nnx.merge(graphdef, params, rest)
            return next_token_loss(lm(ids, mask), ids, mask)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(config.seed)
    losses: list[float] = []
    batches = iter(())
    bar = tqdm(range(config.steps), desc="sft", disable=not progress, leave=False)
    for i in bar:
        batch = next(batches, None)
        if batch is None:  # a new epoch, reshuffled
            batches = iterate_batches((input_ids, attention_mask), config.batch_size, rng)
            batch = next(batches)
        ids, mask = (jnp.asarray(x) for x in batch)
        params, opt_state, loss = step(params, opt_state, ids, mask)
        losses.append(float(loss))
        if i % 20 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    return nnx.merge(graphdef, params, rest), {"loss": losses}
