"""Supervised fine-tuning: the base policy learns the corpus by next-token prediction.

    L(θ) = − Σ_{b,t} w_{b,t+1} · log π_θ(x_{b,t+1} | x_{b,≤t}) / Σ_{b,t} w_{b,t+1},
    w_{b,t+1} = m_{b,t} · m_{b,t+1} · ℓ_{b,t+1}

over a batch of right- (or left-) padded sequences x [B, T] with mask m (1 = real token): a target
counts only when both it and its context token are real, and — with a loss mask ℓ — only where ℓ
marks it (the completion of a prompt/completion pair, the assistant turns of a chat: trl's
``completion_only_loss``; no ℓ: every real token). This is the "SFT" stage before RLHF
(Ouyang et al. 2022, arXiv:2203.02155 §3.5): the policy that PPO starts from and the reference it
is kept close to. The data side (formats, loss masks) is :mod:`jaxrlhf.data.sft`.

Training runs through the trainers' one train step (``jaxrlhf.train.state``): the loss is a
:class:`NextTokenLoss`, a (sum, count) pair of the negative log-likelihood, so SFT gets the same
data parallelism (pmap / shard_map), gradient-norm logging, buffer donation and orbax resume as PPO.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrlhf.config import option, require
from jaxrlhf.models.lora import split_trainable
from jaxrlhf.rl import masked_sum, token_logprobs
from jaxrlhf.train.loop import LoopConfig, fit
from jaxrlhf.train.optim import (
    SCHEDULES,
    OptimizerConfig,
    fit_supervised_batch,
    note_warmup,
    supervised_adamw,
)
from jaxrlhf.train.state import Means, init_train_state


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTConfig(LoopConfig):
    """Hyperparameters of supervised fine-tuning on a text corpus."""

    steps: int = option(
        300,
        "Number of optimiser steps (trl counts epochs, 3 by default; we count steps: about "
        "epochs × sequences / batch_size).",
    )
    batch_size: int = option(
        8,
        "Sequences per step, over all devices (trl's default: per_device_train_batch_size 8 on "
        "one device); more than the data has: all of it.",
    )
    learning_rate: float = option(2e-5, "Peak AdamW learning rate (trl's default).")
    lr_schedule: str = option(
        "linear", "Learning-rate schedule after the warm-up: constant | linear (trl's) | cosine."
    )
    warmup_steps: int = option(
        0, "Linear learning-rate warm-up steps (trl's default); at most the run's steps − 1."
    )
    weight_decay: float = option(0.0, "AdamW weight decay.")
    max_grad_norm: float = option(1.0, "Clip the global gradient norm to this value (0: no clip).")
    seed: int = option(0, "Seed of the batch shuffling and the held-out split.")
    completion_only_loss: bool = option(
        True,
        "Count only the completion (prompt/completion data) or the assistant turns (chat data) "
        "in the loss; off: every token.",
    )
    eval_fraction: float = option(
        0.0,
        "Fraction of sequences held out for the held-out loss when no held-out data is given "
        "(the data's own test split replaces it).",
    )
    eval_every: int = option(0, "Measure the held-out loss every this many steps (0: at the end).")

    def __post_init__(self):
        super().__post_init__()
        require(self.steps >= 1, self, "steps", "must be >= 1")
        require(self.batch_size >= 1, self, "batch_size", "must be >= 1")
        require(self.learning_rate > 0, self, "learning_rate", "must be > 0")
        require(self.lr_schedule in SCHEDULES, self, "lr_schedule", f"must be one of {SCHEDULES}")
        require(self.warmup_steps >= 0, self, "warmup_steps", "must be >= 0")
        require(self.weight_decay >= 0, self, "weight_decay", "must be >= 0")
        require(self.max_grad_norm >= 0, self, "max_grad_norm", "must be >= 0")
        require(0 <= self.eval_fraction < 1, self, "eval_fraction", "must be in [0, 1)")
        require(self.eval_every >= 0, self, "eval_every", "must be >= 0")

    @property
    def optimizer(self) -> OptimizerConfig:
        return supervised_adamw(self, self.steps)  # (warm-up cut to the run: optim.warmup_for_run)


# The `jaxrlhf sft` command's defaults: SFTConfig's (trl's), with a held-out fraction when the data
# has no test split.
SFT_DEFAULTS = SFTConfig(eval_fraction=0.05)


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


def next_token_terms(
    logits, input_ids, attention_mask, loss_mask=None
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(Σ w·(−log π(x_{t+1} | x_≤t)), Σ w): the SFT loss as a (sum, count) pair, w the targets
    that count (module docstring).

    Args:
      logits: [B, T, V] float32; logits[:, t] predict input_ids[:, t + 1].
      input_ids: [B, T] int.
      attention_mask: [B, T] 0/1.
      loss_mask: optional [B, T] 0/1, 1 at the tokens that count as targets (e.g. the completion
        only); None: every real token.
    """
    chex.assert_rank([logits, input_ids, attention_mask], [3, 2, 2])
    logprobs = token_logprobs(logits[:, :-1], input_ids[:, 1:])  # [B, T-1]
    return nll_terms(logprobs, input_ids, attention_mask, loss_mask)


def nll_terms(logprobs, input_ids, attention_mask, loss_mask=None):
    """:func:`next_token_terms` from the next-token log-probs [B, T − 1] (logprobs[:, t] =
    log π(input_ids[:, t + 1] | input_ids[:, ≤ t])), however they were computed."""
    chex.assert_equal_shape([input_ids, attention_mask])
    if loss_mask is not None:
        chex.assert_equal_shape([input_ids, loss_mask])
    mask = counted_targets(attention_mask, loss_mask)  # [B, T-1]
    return -masked_sum(logprobs, mask), jnp.sum(mask.astype(jnp.float32))


def counted_targets(attention_mask, loss_mask=None):
    """[B, T − 1] 0/1: whether token t + 1 counts as a target (real, after a real token, and in
    ``loss_mask`` when given). attention_mask, loss_mask: [B, T] (jax or numpy arrays)."""
    mask = attention_mask[:, 1:] * attention_mask[:, :-1]  # [B, T-1]
    return mask if loss_mask is None else mask * loss_mask[:, 1:]


def next_token_loss(logits, input_ids, attention_mask, loss_mask=None):
    """Masked next-token cross-entropy (the SFT loss in the module docstring): the mean negative
    log-likelihood per counted target (0 when none counts)."""
    total, count = next_token_terms(logits, input_ids, attention_mask, loss_mask)
    return total / jnp.maximum(count, 1.0)


@dataclasses.dataclass(frozen=True)
class NextTokenLoss:
    """The SFT loss of a CausalLM (``graphdef``) on a batch (input_ids, attention_mask) or
    (input_ids, attention_mask, loss_mask).

    ``first_target`` (:func:`first_target`): no token before this position counts in any batch, so
    the LM head runs on positions first_target − 1 … T − 2 only (a completion-only loss skips the
    shortest prompt); 1, every position."""

    graphdef: Any
    weights: tuple[tuple[str, float], ...] = (("sft/nll", 1.0),)
    logits_chunk_size: int | None = None  # the head on this many tokens at a time (lm_head.py)
    first_target: int = 1

    def __post_init__(self):
        if self.first_target < 1:
            raise ValueError(f"first_target must be ≥ 1 (got {self.first_target})")

    def __call__(self, params, batch) -> Means:
        ids, mask, *loss_mask = batch
        s = self.first_target - 1  # the first position whose prediction can count
        lm = nnx.merge(self.graphdef, params)
        hidden = lm.hidden(ids, mask)[:, s:-1]  # [B, T − 1 − s, D]
        ids, mask, loss_mask = ids[:, s:], mask[:, s:], [m[:, s:] for m in loss_mask]  # [B, T − s]
        logprobs, _ = lm.token_logprobs(
            hidden, ids[:, 1:], logits_chunk_size=self.logits_chunk_size
        )  # [B, T − 1 − s]: next_token_terms' values there, without the [B, T, V] logits
        return {"sft/nll": nll_terms(logprobs, ids, mask, *loss_mask)}


def first_target(attention_mask, loss_mask=None) -> int:
    """The first position t ≥ 1 whose token counts as a target in any row (real, after a real
    token, and in ``loss_mask``): :class:`NextTokenLoss` skips the head before it. 1 when none
    counts. attention_mask, loss_mask: [N, T] 0/1 (numpy, the whole training set)."""
    loss_mask = None if loss_mask is None else np.asarray(loss_mask)
    counted = counted_targets(np.asarray(attention_mask), loss_mask)  # [N, T − 1]
    hits = np.flatnonzero(counted.any(0))
    return 1 + int(hits[0]) if hits.size else 1


@functools.partial(jax.jit, static_argnums=0)
def _nll_terms(loss: NextTokenLoss, params, batch):
    return loss(params, batch)["sft/nll"]


def held_out_loss(model, data: tuple, *, batch_size: int = 64) -> float:
    """Mean next-token NLL of ``model`` on held-out ``data`` = (input_ids, attention_mask[,
    loss_mask]) [N, T] each: Σ sums / Σ counts over batches (the last one padded with rows that
    count nothing, so one compiled program serves all)."""
    graphdef, params = nnx.split(model)
    loss = NextTokenLoss(graphdef)
    data = tuple(np.asarray(a) for a in data)
    n, total, count = len(data[0]), 0.0, 0.0
    size = min(batch_size, n)
    for start in range(0, n, size):
        batch = [a[start : start + size] for a in data]
        short = size - len(batch[0])
        if short:  # zero masks: the padding rows predict nothing
            batch = [np.concatenate([a, np.zeros((short, *a.shape[1:]), a.dtype)]) for a in batch]
        s, c = _nll_terms(loss, params, tuple(batch))
        total, count = total + float(s), count + float(c)
    return total / max(count, 1.0)


def train_sft(
    model,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    config: SFTConfig,
    *,
    loss_mask: np.ndarray | None = None,
    eval_data: tuple | None = None,
    progress: bool = True,
    callback: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Train a CausalLM on fixed-shape sequences by next-token prediction.

    A ``batch_size`` above the training sequences trains on batches of all of them, and a warm-up
    longer than the run warms up over ``steps − 1``; one line (stderr) says so.

    Args:
      model: a ``jaxrlhf.models.CausalLM`` (not modified; a trained copy is returned).
      input_ids: [N, T] int token ids (padded).
      attention_mask: [N, T] 0/1.
      config: the hyperparameters (and devices / checkpoints: a run with ``checkpoint_dir``
        resumes from the latest checkpoint there).
      loss_mask: optional [N, T] 0/1, the tokens that count as targets (``jaxrlhf.data.sft``);
        None: every real token.
      eval_data: held-out (input_ids, attention_mask[, loss_mask]); None: ``config.eval_fraction``
        of the sequences are held out (none by default).
      progress: show progress (a bar on a terminal, else lines).
      callback: ``callback(step, metrics)`` after every step (metrics with ``eval/loss`` where the
        held-out loss was measured).
    Returns:
      (trained model, metrics) with metrics["loss"] the per-step training loss (list of floats),
      metrics["grad_norm"], metrics["num_train"], and with held-out data metrics["eval_loss"]
      (list: every ``config.eval_every`` steps and at the end) and metrics["num_eval"].
    """
    data, eval_data = sft_data(input_ids, attention_mask, loss_mask, eval_data, config)
    config = fit_supervised_batch(config, len(data[0]), what="SFT", unit="training sequences")
    note_warmup(config, config.steps, what="SFT")
    graphdef, params, frozen = split_trainable(config.trainable(model))
    evals: list[float] = []
    loss = NextTokenLoss(graphdef, logits_chunk_size=config.logits_chunk_size,
                         first_target=first_target(*data[1:]))  # fmt: skip
    state, history = fit(
        config.train_step(loss, config.optimizer, params, frozen),
        init_train_state(params, config.optimizer, frozen),
        data,
        batch_size=config.batch_size,
        steps=config.steps,
        seed=config.seed,
        config=config,
        desc="sft",
        progress=progress,
        callback=held_out_callback(graphdef, eval_data, config, callback, evals),
    )
    metrics: dict[str, Any] = {
        name: [m[name] for m in history] for name in ("loss", "grad_norm", "nonfinite_skipped")
    }
    metrics["num_train"] = len(data[0])
    if eval_data is not None:
        metrics.update(eval_loss=evals, num_eval=len(eval_data[0]))
    return nnx.merge(graphdef, state.model_params()), metrics


def sft_data(input_ids, attention_mask, loss_mask, eval_data, config: SFTConfig):
    """(training arrays (input_ids, attention_mask[, loss_mask]) [N, T], held-out arrays or None):
    without held-out data, ``config.eval_fraction`` of the rows are held out; none: None."""
    chex.assert_rank([input_ids, attention_mask], 2)
    chex.assert_equal_shape([input_ids, attention_mask])
    data = (np.asarray(input_ids), np.asarray(attention_mask))
    if loss_mask is not None:
        chex.assert_equal_shape([input_ids, loss_mask])
        data += (np.asarray(loss_mask),)
    if eval_data is None and config.eval_fraction > 0:
        from jaxrlhf.train.reward import split_indices

        train_index, eval_index = split_indices(len(data[0]), config.eval_fraction, config.seed)
        data, eval_data = (tuple(a[i] for a in data) for i in (train_index, eval_index))
    if eval_data is not None and len(eval_data[0]) == 0:
        eval_data = None
    return data, eval_data


def held_out_callback(graphdef, eval_data, config: SFTConfig, callback, evals: list[float]):
    """``fit``'s callback: the held-out loss (appended to ``evals``, and as ``eval/loss`` in the
    metrics) every ``config.eval_every`` steps and at the end, then ``callback(step, metrics)``;
    None when there is neither held-out data nor a callback."""
    if eval_data is None and callback is None:
        return None

    def after_step(step, metrics, state):
        if eval_data is not None and (
            step == config.steps or (config.eval_every and step % config.eval_every == 0)
        ):
            evals.append(held_out_loss(nnx.merge(graphdef, state.model_params()), eval_data))
            metrics = {**metrics, "eval/loss": evals[-1]}
        if callback is not None:
            callback(step, metrics)

    return after_step
