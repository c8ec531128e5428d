"""Reward-model training on preference pairs (Bradley-Terry), evaluation and normalisation.

A reward model r(x, y) (``jaxrlhf.models.RewardModel``: a transformer trunk and a scalar head read at
the last real token) is trained so that preferred responses score higher (Ouyang et al. 2022,
arXiv:2203.02155 §3.5; Stiennon et al. 2020):

    P(y_c ≻ y_r | x) = σ(r(x, y_c) − r(x, y_r))
    L(θ) = mean_b[−log σ(r_c − r_r − m)]  +  c · mean_b[(r_c + r_r)²]

with an optional margin m (Llama 2, Touvron et al. 2023) and an optional centring term of weight c
(trl's ``center_rewards_coefficient``, Eisenstein et al. 2023) that keeps the scores near zero, since
the Bradley-Terry loss only sees differences.

The model starts from the SFT policy's trunk (it already "reads" the language) with a fresh head,
weight N(0, 1/(D+1)), bias 0 (Ziegler et al. 2019).

Normalisation (Ziegler et al. 2019): after training, the head is rescaled so that the scores of
policy samples have mean 0 and std 1:  r'(x, y) = (r(x, y) − μ) / σ, folded into the head as
w' = w/σ, b' = (b − μ)/σ. The statistics therefore travel with the model (save_pretrained,
PPO's reward function) with nothing extra to apply.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrlhf.config import option, require
from jaxrlhf.data.preference import PairBatch
from jaxrlhf.models.lora import split_trainable
from jaxrlhf.rl import bradley_terry_loss
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
class RewardConfig(LoopConfig):
    """Hyperparameters of reward-model training."""

    epochs: int = option(3, "Passes over the training pairs (trl's default).")
    batch_size: int = option(
        8,
        "Preference pairs per step, over all devices (2× sequences per forward pass; trl's "
        "default: per_device_train_batch_size 8 on one device); more than the data has: all of it.",
    )
    learning_rate: float = option(1e-4, "Peak AdamW learning rate (trl's default).")
    lr_schedule: str = option(
        "linear", "Learning-rate schedule after the warm-up: constant | linear (trl's) | cosine."
    )
    warmup_steps: int = option(
        0, "Linear learning-rate warm-up steps (trl's default); at most the run's steps − 1."
    )
    weight_decay: float = option(0.0, "AdamW weight decay.")
    max_grad_norm: float = option(1.0, "Clip the global gradient norm to this value (0: no clip).")
    margin: float = option(0.0, "Bradley-Terry margin m: loss −log σ(r_c − r_r − m).")
    margin_from_scores: bool = option(
        False,
        "Per-pair margin m = score_chosen − score_rejected from scored data (replaces margin).",
    )
    center_rewards_coefficient: float | None = option(
        None, "Weight c of the centring term c·mean((r_c + r_r)²) (trl); None: off."
    )
    eval_fraction: float = option(0.1, "Fraction of pairs held out for pairwise accuracy.")
    seed: int = option(0, "Seed of the head initialisation, held-out split and shuffling.")

    def __post_init__(self):
        super().__post_init__()
        require(self.epochs >= 1, self, "epochs", "must be >= 1")
        require(self.batch_size >= 1, self, "batch_size", "must be >= 1")
        require(self.learning_rate > 0, self, "learning_rate", "must be > 0")
        require(self.lr_schedule in SCHEDULES, self, "lr_schedule", f"must be one of {SCHEDULES}")
        require(self.warmup_steps >= 0, self, "warmup_steps", "must be >= 0")
        require(self.weight_decay >= 0, self, "weight_decay", "must be >= 0")
        require(self.max_grad_norm >= 0, self, "max_grad_norm", "must be >= 0")
        require(self.margin >= 0, self, "margin", "must be >= 0")
        require(
            self.center_rewards_coefficient is None or self.center_rewards_coefficient >= 0,
            self,
            "center_rewards_coefficient",
            "must be None or >= 0",
        )
        require(0 <= self.eval_fraction < 1, self, "eval_fraction", "must be in [0, 1)")

    def optimizer(self, total_steps: int) -> OptimizerConfig:
        """AdamW with the learning-rate schedule over ``total_steps`` (epochs × steps per epoch)."""
        return supervised_adamw(self, total_steps)


# ----------------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------------


def reward_centering_term(chosen_rewards, rejected_rewards):
    """mean_b[(r_c + r_r)²]: zero when each pair's scores are symmetric around 0 (trl)."""
    chex.assert_equal_shape([chosen_rewards, rejected_rewards])
    return jnp.mean((chosen_rewards + rejected_rewards) ** 2)


def reward_model_loss(
    chosen_rewards, rejected_rewards, *, margin=0.0, center_rewards_coefficient=None
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """L = mean[−log σ(r_c − r_r − m)] + c · mean[(r_c + r_r)²]  → (loss, parts).

    Args:
      chosen_rewards, rejected_rewards: [B] scores.
      margin: scalar or [B] margins m.
      center_rewards_coefficient: c, or None for no centring term.
    Returns:
      (scalar loss, {"bt_loss", "center_loss", "accuracy", "margin_mean"}) where accuracy is the
      fraction of pairs with r_c > r_r and margin_mean = mean(r_c − r_r).
    """
    chex.assert_rank([chosen_rewards, rejected_rewards], 1)
    bt = bradley_terry_loss(chosen_rewards, rejected_rewards, margin=margin)
    center = reward_centering_term(chosen_rewards, rejected_rewards)
    loss = bt if center_rewards_coefficient is None else bt + center_rewards_coefficient * center
    parts = {
        "bt_loss": bt,
        "center_loss": center,
        "accuracy": jnp.mean((chosen_rewards > rejected_rewards).astype(jnp.float32)),
        "margin_mean": jnp.mean(chosen_rewards - rejected_rewards),
    }
    return loss, parts


@dataclasses.dataclass(frozen=True)
class BradleyTerryLoss:
    """The reward-model loss of a RewardModel (``graphdef``) on a batch of pairs, as (sum, count)
    terms for ``train.state.train_step``: L = mean[−log σ(r_c − r_r − m)] + c · mean[(r_c + r_r)²].

    batch = (chosen_ids, chosen_mask, rejected_ids, rejected_mask [B, L], margins [B]).
    """

    graphdef: Any
    center_rewards_coefficient: float | None = None

    @property
    def weights(self) -> tuple[tuple[str, float], ...]:
        return (("rm/bt_loss", 1.0), ("rm/center_loss", self.center_rewards_coefficient or 0.0))

    def __call__(self, params, batch) -> Means:
        chosen_ids, chosen_mask, rejected_ids, rejected_mask, margin = batch
        model = nnx.merge(self.graphdef, params)
        ids = jnp.concatenate([chosen_ids, rejected_ids])  # [2B, L]  one forward pass
        mask = jnp.concatenate([chosen_mask, rejected_mask])  # [2B, L]
        r_c, r_r = jnp.split(model(ids, mask), 2)  # [B], [B]
        pairs = jnp.asarray(r_c.shape[0], jnp.float32)
        return {
            "rm/bt_loss": (jnp.sum(-jax.nn.log_sigmoid(r_c - r_r - margin)), pairs),
            "rm/center_loss": (jnp.sum((r_c + r_r) ** 2), pairs),
            "rm/accuracy": (jnp.sum((r_c > r_r).astype(jnp.float32)), pairs),
            "rm/margin": (jnp.sum(r_c - r_r), pairs),
        }


# ----------------------------------------------------------------------------------------------
# Model set-up and scoring
# ----------------------------------------------------------------------------------------------


def reward_model_from_policy(policy, *, seed: int = 0):
    """A RewardModel with the trunk weights of ``policy`` (a CausalLM; copied, not shared) and a
    fresh head: weight N(0, 1/(D+1)), bias 0."""
    from jaxrlhf.models import RewardModel

    reward_model = RewardModel(policy.config, rngs=nnx.Rngs(seed))
    trunk = jax.tree.map(jnp.copy, nnx.state(policy.model))
    nnx.update(reward_model.model, trunk)
    return reward_model


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids, mask):
    return nnx.merge(graphdef, state)(ids, mask)  # [b]  (compiled once per model structure)


def score(model, input_ids, attention_mask, *, batch_size: int = 256) -> np.ndarray:
    """Scores ``[N]`` of a reward model on ``[N, L]`` sequences, in batches of ``batch_size``
    (the last batch padded to full size so that one compiled program serves all)."""
    chex.assert_rank([input_ids, attention_mask], 2)
    graphdef, state = nnx.split(model)
    n = len(input_ids)
    out = []
    for start in range(0, n, batch_size):
        ids = np.asarray(input_ids[start : start + batch_size])
        mask = np.asarray(attention_mask[start : start + batch_size])
        k = len(ids)
        if k < batch_size and n > batch_size:
            ids = np.concatenate([ids, np.repeat(ids[-1:], batch_size - k, 0)])
            mask = np.concatenate([mask, np.repeat(mask[-1:], batch_size - k, 0)])
        out.append(np.asarray(_forward(graphdef, state, jnp.asarray(ids), jnp.asarray(mask)))[:k])
    return np.concatenate(out)


def pairwise_accuracy(model, pairs: PairBatch, *, batch_size: int = 256) -> float:
    """Fraction of pairs where the model scores the chosen response above the rejected one."""
    chosen = score(model, pairs.chosen_ids, pairs.chosen_mask, batch_size=batch_size)
    rejected = score(model, pairs.rejected_ids, pairs.rejected_mask, batch_size=batch_size)
    return float(np.mean(chosen > rejected))


def normalize_reward_model(model, input_ids, attention_mask, *, batch_size: int = 256):
    """Rescale the head so the scores of these sequences (policy samples) have mean 0, std 1.

        r' = (r − μ) / σ   folded in as   w' = w / σ,  b' = (b − μ) / σ

    Returns (a normalised copy of the model, {"reward_mean": μ, "reward_std": σ}) — μ and σ are the
    statistics before normalisation.
    """
    scores = score(model, input_ids, attention_mask, batch_size=batch_size)  # [N]
    mean, std = float(np.mean(scores)), float(np.std(scores))
    if not std > 0:
        raise ValueError("normalize_reward_model: the scores have zero spread; cannot normalise")
    graphdef, state = nnx.split(model)
    normalized = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
    head = normalized.score
    head.kernel[...] = head.kernel[...] / std
    head.bias[...] = (head.bias[...] - mean) / std
    return normalized, {"reward_mean": mean, "reward_std": std}


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def split_indices(n: int, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A random (train, held-out) split of range(n); held-out has round(n·eval_fraction) rows."""
    order = np.random.default_rng(seed).permutation(n)
    n_eval = round(n * eval_fraction)
    return order[n_eval:], order[:n_eval]


def take_pairs(pairs: PairBatch, index: np.ndarray) -> PairBatch:
    """The pairs at ``index``."""
    return PairBatch(*(a[index] for a in pairs[:4]), pairs.num_truncated, pairs.prompt_length)


def _split_pairs(pairs, margins, config: RewardConfig, eval_pairs):
    """(training pairs, their margins [N], held-out pairs or None), validating the margins."""
    if config.margin_from_scores and margins is None:
        raise ValueError(
            "RewardConfig.margin_from_scores = True: pass the margins (score_chosen − "
            "score_rejected), which only scored data has"
        )
    n = len(pairs.chosen_ids)
    margins = np.full(n, config.margin, np.float32) if margins is None else np.asarray(margins)
    if margins.shape != (n,):
        raise ValueError(f"margins: shape {margins.shape}, expected ({n},) like the pairs")
    margins = margins.astype(np.float32)
    if eval_pairs is None and config.eval_fraction > 0:
        train_index, eval_index = split_indices(n, config.eval_fraction, config.seed)
        pairs, eval_pairs = take_pairs(pairs, train_index), take_pairs(pairs, eval_index)
        margins = margins[train_index]
    return pairs, margins, eval_pairs


def held_out_metrics(model, eval_pairs: PairBatch) -> dict[str, float]:
    """Pairwise accuracy and Bradley-Terry loss (no margin) of ``model`` on held-out pairs."""
    r_c = score(model, eval_pairs.chosen_ids, eval_pairs.chosen_mask)
    r_r = score(model, eval_pairs.rejected_ids, eval_pairs.rejected_mask)
    return {
        "eval_accuracy": float(np.mean(r_c > r_r)),
        "eval_loss": float(np.mean(np.logaddexp(0.0, -(r_c - r_r)))),
    }


def train_reward_model(
    reward_model,
    pairs: PairBatch,
    config: RewardConfig,
    *,
    margins: np.ndarray | None = None,
    eval_pairs: PairBatch | None = None,
    progress: bool = True,
) -> tuple[Any, dict[str, Any]]:
    """Train a RewardModel with the Bradley-Terry loss (+ margin, + centring) on preference pairs.

    Args:
      reward_model: a ``jaxrlhf.models.RewardModel`` (e.g. from :func:`reward_model_from_policy`);
        not modified, a trained copy is returned.
      pairs: tokenised pairs (``jaxrlhf.data.tokenize_pairs``).
      config: hyperparameters (and devices / checkpoints: with ``checkpoint_dir`` the run resumes
        from the latest checkpoint there).
      margins: optional per-pair margins [N] (e.g. from a dataset's ``margin`` column); they
        replace ``config.margin``.
      eval_pairs: held-out pairs; if None, ``config.eval_fraction`` of ``pairs`` is held out.
      progress: show a tqdm progress bar.
    A ``batch_size`` above the training pairs trains on batches of all of them, and a warm-up
    longer than the run is cut to its steps − 1; one line (stderr) says so.
    Returns:
      (trained model, metrics): ``loss``, ``accuracy``, ``grad_norm`` (per step, on the training
      batch), ``eval_accuracy``, ``eval_loss`` (held-out accuracy and Bradley-Terry loss without
      margin, after each epoch), ``num_train_pairs``, ``num_eval_pairs``.
    """
    pairs, margins, eval_pairs = _split_pairs(pairs, margins, config, eval_pairs)
    config = fit_supervised_batch(config, len(margins), what="reward model", unit="training pairs")
    steps_per_epoch = len(margins) // config.batch_size
    total_steps = steps_per_epoch * config.epochs
    note_warmup(config, total_steps, what="reward model")
    graphdef, params, frozen = split_trainable(config.trainable(reward_model))
    optimizer = config.optimizer(total_steps)
    loss = BradleyTerryLoss(graphdef, config.center_rewards_coefficient)
    evals: list[dict[str, float]] = []

    def after_step(step, metrics, state):
        if step % steps_per_epoch == 0 and eval_pairs is not None and len(eval_pairs.chosen_ids):
            evals.append(held_out_metrics(nnx.merge(graphdef, state.model_params()), eval_pairs))

    state, history = fit(
        config.train_step(loss, optimizer, params, frozen),
        init_train_state(params, optimizer, frozen),
        (*pairs[:4], margins),
        batch_size=config.batch_size,
        steps=total_steps,
        seed=config.seed,
        config=config,
        desc="reward model",
        progress=progress,
        callback=after_step,
    )
    metrics = reward_metrics(history, evals, len(margins), eval_pairs)
    return nnx.merge(graphdef, state.model_params()), metrics


def reward_metrics(history, evals, num_train: int, eval_pairs) -> dict[str, Any]:
    """The metrics :func:`train_reward_model` returns, from fit's per-step history and the
    per-epoch held-out evaluations."""
    return {
        "loss": [m["loss"] for m in history],
        "accuracy": [m["rm/accuracy"] for m in history],
        "grad_norm": [m["grad_norm"] for m in history],
        "nonfinite_skipped": [m["nonfinite_skipped"] for m in history],
        **{k: [e[k] for e in evals] for k in ("eval_accuracy", "eval_loss")},
        "num_train_pairs": num_train,
        "num_eval_pairs": 0 if eval_pairs is None else len(eval_pairs.chosen_ids),
    }
