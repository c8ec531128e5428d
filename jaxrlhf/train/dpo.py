"""Direct preference optimisation (Rafailov et al. 2023): RLHF's KL-regularised objective solved in
closed form, trained on preference pairs with no reward model and no sampling.

    max_π E[r(x, y)] − β KL(π ‖ π_ref)   ⇒   π*(y|x) ∝ π_ref(y|x) · exp(r(x, y)/β)
    ⇒ r(x, y) = β log π*(y|x)/π_ref(y|x) + β log Z(x)          (the implicit reward)
    Bradley-Terry on it (Z cancels):  L = −log σ(β[(log π_c − log π_ref,c) − (log π_r − log π_ref,r)])

The recipe: the reference's sequence log-probs of every pair, once, before training → epochs ×
minibatches of ``state.train_step(DPOLoss)`` (the trainers' one step: devices, checkpoints, resume) →
the implicit-reward accuracy on held-out pairs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrlhf import rl
from jaxrlhf.config import option, require
from jaxrlhf.data.preference import PairBatch
from jaxrlhf.models.lora import split_trainable
from jaxrlhf.train.loop import LoopConfig, fit
from jaxrlhf.train.optim import (
    SCHEDULES,
    OptimizerConfig,
    fit_supervised_batch,
    note_warmup,
    supervised_adamw,
)
from jaxrlhf.train.state import Means, init_train_state

LOSS_TYPES = ("sigmoid", "ipo")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPOConfig(LoopConfig):
    """Direct preference optimisation on preference pairs."""

    epochs: int = option(3, "Passes over the training pairs (trl's default).")
    batch_size: int = option(
        8,
        "Preference pairs per step, over all devices (trl's default: per_device_train_batch_size "
        "8 on one device); more than the data has: all of it.",
    )
    learning_rate: float = option(1e-6, "Peak AdamW learning rate (trl's default).")
    lr_schedule: str = option(
        "linear", "Learning-rate schedule after the warm-up: constant | linear (trl's) | cosine."
    )
    warmup_steps: int = option(
        0, "Linear learning-rate warm-up steps (trl's default); at most the run's steps − 1."
    )
    weight_decay: float = option(0.0, "AdamW weight decay.")
    max_grad_norm: float = option(1.0, "Clip the global gradient norm to this value (0: no clip).")
    beta: float = option(
        0.1, "β: the strength of the KL to the reference (the reward's scale; trl's default)."
    )
    loss_type: str = option("sigmoid", "sigmoid (DPO) | ipo.")
    label_smoothing: float = option(0.0, "ε of conservative DPO: labels flipped with prob. ε.")
    eval_fraction: float = option(0.1, "Fraction of pairs held out (when the data has no split).")
    seed: int = option(0, "Seed of the held-out split and the shuffling.")

    def __post_init__(self):
        super().__post_init__()
        require(self.epochs >= 1, self, "epochs", "must be >= 1")
        require(self.batch_size >= 1, self, "batch_size", "must be >= 1")
        require(self.learning_rate > 0, self, "learning_rate", "must be > 0")
        require(self.lr_schedule in SCHEDULES, self, "lr_schedule", f"must be one of {SCHEDULES}")
        require(self.warmup_steps >= 0, self, "warmup_steps", "must be >= 0")
        require(self.weight_decay >= 0, self, "weight_decay", "must be >= 0")
        require(self.max_grad_norm >= 0, self, "max_grad_norm", "must be >= 0 (0: no clip)")
        require(self.beta > 0, self, "beta", "must be > 0")
        require(self.loss_type in LOSS_TYPES, self, "loss_type", f"must be one of {LOSS_TYPES}")
        require(0 <= self.label_smoothing < 0.5, self, "label_smoothing", "must be in [0, 0.5)")
        require(0 <= self.eval_fraction < 1, self, "eval_fraction", "must be in [0, 1)")

    def optimizer(self, total_steps: int) -> OptimizerConfig:
        return supervised_adamw(self, total_steps)


def sequence_logprobs(model, ids, mask, prompt_length: int, *, logits_chunk_size=None):
    """Σ over the response tokens of log π(token | prefix): [N, P + R] → [N]. The LM head runs
    on the response positions only, ``logits_chunk_size`` tokens at a time
    (``CausalLM.token_logprobs``)."""
    hidden = model.hidden(ids, mask)[:, prompt_length - 1 : -1]  # [N, R, D]: predict P … P+R−1
    logprobs, _ = model.token_logprobs(
        hidden, ids[:, prompt_length:], logits_chunk_size=logits_chunk_size
    )  # [N, R]
    return rl.masked_sum(logprobs, mask[:, prompt_length:], axis=-1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPOLoss:
    """DPO on a batch (chosen_ids, chosen_mask, rejected_ids, rejected_mask, ref_chosen [B],
    ref_rejected [B]) as (sum, count) terms; the metrics are trl's (rewards/chosen, …)."""

    graphdef: Any
    prompt_length: int
    beta: float
    loss_type: str
    label_smoothing: float
    logits_chunk_size: int | None = None

    @property
    def weights(self) -> tuple[tuple[str, float], ...]:
        return (("dpo/loss", 1.0),)

    def __call__(self, params, batch) -> Means:
        chosen_ids, chosen_mask, rejected_ids, rejected_mask, ref_chosen, ref_rejected = batch
        model = nnx.merge(self.graphdef, params)
        ids = jnp.concatenate([chosen_ids, rejected_ids])  # [2B, L] one forward pass
        mask = jnp.concatenate([chosen_mask, rejected_mask])
        chosen, rejected = jnp.split(
            sequence_logprobs(
                model, ids, mask, self.prompt_length, logits_chunk_size=self.logits_chunk_size
            ),
            2,
        )
        losses = rl.dpo_terms(
            chosen, rejected, ref_chosen, ref_rejected, beta=self.beta,
            loss_type=self.loss_type, label_smoothing=self.label_smoothing,
        )  # fmt: skip
        r_c = jax.lax.stop_gradient(self.beta * (chosen - ref_chosen))  # implicit rewards [B]
        r_r = jax.lax.stop_gradient(self.beta * (rejected - ref_rejected))
        pairs = jnp.asarray(chosen.shape[0], jnp.float32)
        return {
            "dpo/loss": (jnp.sum(losses), pairs),
            "rewards/chosen": (jnp.sum(r_c), pairs),
            "rewards/rejected": (jnp.sum(r_r), pairs),
            "rewards/margins": (jnp.sum(r_c - r_r), pairs),
            "rewards/accuracies": (jnp.sum((r_c > r_r).astype(jnp.float32)), pairs),
        }


@functools.partial(jax.jit, static_argnames=("graphdef", "prompt_length"))
def _pair_logprobs(state, chosen_ids, chosen_mask, rejected_ids, rejected_mask, *, graphdef,
                   prompt_length):  # fmt: skip
    model = nnx.merge(graphdef, state)
    return (
        sequence_logprobs(model, chosen_ids, chosen_mask, prompt_length),
        sequence_logprobs(model, rejected_ids, rejected_mask, prompt_length),
    )


def pair_logprobs(model, pairs: PairBatch, *, batch_size: int = 64) -> tuple[np.ndarray, ...]:
    """Sequence log-probs (chosen [N], rejected [N]) of ``model`` on every pair, in batches (the
    last padded to full size, so one program serves all)."""
    graphdef, state = nnx.split(model)
    n, out = len(pairs.chosen_ids), ([], [])
    size = min(batch_size, n)
    for start in range(0, n, size):
        arrays = [np.asarray(a[start : start + size]) for a in pairs[:4]]
        k = len(arrays[0])
        arrays = [np.concatenate([a, np.repeat(a[-1:], size - k, 0)]) for a in arrays]
        c, r = _pair_logprobs(state, *arrays, graphdef=graphdef, prompt_length=pairs.prompt_length)
        out[0].append(np.asarray(c)[:k])
        out[1].append(np.asarray(r)[:k])
    return np.concatenate(out[0]), np.concatenate(out[1])


def implicit_reward_accuracy(model, reference, pairs: PairBatch, *, beta: float) -> float:
    """Fraction of pairs where β(log π_c − log π_ref,c) > β(log π_r − log π_ref,r)."""
    chosen, rejected = pair_logprobs(model, pairs)
    ref_chosen, ref_rejected = pair_logprobs(reference, pairs)
    return float(np.mean(beta * (chosen - ref_chosen) > beta * (rejected - ref_rejected)))


def train_dpo(model, pairs: PairBatch, config: DPOConfig, *, eval_pairs: PairBatch | None = None,
              progress: bool = True, callback=None):  # fmt: skip
    """Train a CausalLM with DPO against a frozen copy of itself (the reference).

    Returns (trained model, metrics: per-step "loss", "accuracy" (implicit reward, training batch),
    "grad_norm", per-epoch "eval_accuracy" on held-out pairs, "num_train_pairs", "num_eval_pairs").
    A ``batch_size`` above the training pairs trains on batches of all of them, and a warm-up
    longer than the run is cut to its steps − 1; one line (stderr) says so.
    """
    from jaxrlhf.train.reward import split_indices, take_pairs

    if eval_pairs is None and config.eval_fraction > 0:
        train_index, eval_index = split_indices(
            len(pairs.chosen_ids), config.eval_fraction, config.seed
        )
        pairs, eval_pairs = take_pairs(pairs, train_index), take_pairs(pairs, eval_index)
    config = fit_supervised_batch(config, len(pairs.chosen_ids), what="DPO", unit="training pairs")
    steps_per_epoch = len(pairs.chosen_ids) // config.batch_size
    note_warmup(config, steps_per_epoch * config.epochs, what="DPO")
    reference = nnx.clone(model)
    ref_chosen, ref_rejected = pair_logprobs(reference, pairs)  # once, before training
    graphdef, params, frozen = split_trainable(config.trainable(model))
    optimizer = config.optimizer(steps_per_epoch * config.epochs)
    loss = DPOLoss(graphdef=graphdef, prompt_length=pairs.prompt_length, beta=config.beta,
                   loss_type=config.loss_type, label_smoothing=config.label_smoothing,
                   logits_chunk_size=config.logits_chunk_size)  # fmt: skip
    evals: list[float] = []

    def after_step(step, metrics, state):
        if step % steps_per_epoch == 0 and eval_pairs is not None and len(eval_pairs.chosen_ids):
            current = nnx.merge(graphdef, state.model_params())
            evals.append(implicit_reward_accuracy(current, reference, eval_pairs, beta=config.beta))
        if callback is not None:
            callback(step, metrics)

    state, history = fit(
        config.train_step(loss, optimizer, params, frozen),
        init_train_state(params, optimizer, frozen),
        (*pairs[:4], ref_chosen, ref_rejected),
        batch_size=config.batch_size,
        steps=steps_per_epoch * config.epochs,
        seed=config.seed,
        config=config,
        desc="dpo",
        progress=progress,
        callback=after_step,
    )
    metrics = {
        "loss": [m["loss"] for m in history],
        "accuracy": [m["rewards/accuracies"] for m in history],
        "grad_norm": [m["grad_norm"] for m in history],
        "eval_accuracy": evals,
        "num_train_pairs": len(pairs.chosen_ids),
        "num_eval_pairs": 0 if eval_pairs is None else len(eval_pairs.chosen_ids),
    }
    return nnx.merge(graphdef, state.model_params()), metrics
