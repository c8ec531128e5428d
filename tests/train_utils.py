"""Shared fixtures for the PPO / train-step / checkpoint tests: tiny models, prompts, a token reward."""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrlhf.models import CausalLM, ModelConfig
from jaxrlhf.train import PPOConfig, PPOTrainer, init_policy

VOCAB = 16
EOS = 1
PAD = 0
TARGET = 7  # the token the toy reward asks for


def tiny_config(family: str = "gpt2", **overrides) -> ModelConfig:
    """A 1-layer, width-16 model: a few thousand parameters, milliseconds per forward on CPU."""
    fields = {
        "family": family,
        "vocab_size": VOCAB,
        "hidden_size": 16,
        "num_layers": 1,
        "num_heads": 2,
        "intermediate_size": 32,
        "max_position_embeddings": 32,
    }
    fields.update(overrides)
    return ModelConfig(**fields)


def tiny_models(seed: int = 0, *, separate_critic: bool = False, family: str = "gpt2"):
    """(policy, reference): a random CausalLM as 'SFT' model, its copy as frozen reference."""
    sft = CausalLM(tiny_config(family), rngs=nnx.Rngs(seed))
    policy = init_policy(sft, separate_critic=separate_critic, rngs=nnx.Rngs(seed + 100))
    return policy, sft


def tiny_prompts(num: int = 16, length: int = 4, seed: int = 0):
    """Left-padded random prompts (tokens 2 … VOCAB−1) with 1 to ``length`` real tokens."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, VOCAB, size=(num, length)).astype(np.int32)
    lengths = rng.integers(1, length + 1, size=num)
    mask = (np.arange(length)[None, :] >= length - lengths[:, None]).astype(np.int32)
    return np.where(mask > 0, ids, PAD).astype(np.int32), mask


def target_fraction_reward(prompt_ids, prompt_mask, rollout):
    """score = fraction of valid response tokens equal to TARGET (a reward with a known optimum)."""
    hits = jnp.sum((rollout.tokens == TARGET) * rollout.mask, axis=-1)  # [B]
    return hits / jnp.maximum(jnp.sum(rollout.mask, axis=-1), 1.0)


def tiny_ppo_config(**overrides) -> PPOConfig:
    fields = {
        "num_iterations": 3,
        "batch_size": 8,
        "num_minibatches": 2,
        "ppo_epochs": 2,
        "max_new_tokens": 6,
        "learning_rate": 3e-3,
        "lr_schedule": "constant",
        "kl_coef": 0.01,
        "missing_eos_penalty": None,  # the toy reward is the whole signal
        "seed": 0,
    }
    fields.update(overrides)
    return PPOConfig(**fields)


def tiny_trainer(config: PPOConfig, *, seed: int = 0, policy_seed=None, reward_fn=None):
    """PPOTrainer.from_sft on a tiny random 'SFT' model; ``policy_seed`` re-initialises the policy
    (not the reference), through the lower-level constructor."""
    ids, mask = tiny_prompts()
    kwargs = {"eos_token_id": EOS, "pad_token_id": PAD}
    reward_fn = reward_fn or target_fraction_reward
    if policy_seed is None:
        sft = CausalLM(tiny_config(), rngs=nnx.Rngs(seed))
        return PPOTrainer.from_sft(config, sft, ids, mask, reward_fn=reward_fn, **kwargs)
    _, reference = tiny_models(seed, separate_critic=config.separate_critic)
    policy, _ = tiny_models(policy_seed, separate_critic=config.separate_critic)
    return PPOTrainer(config, policy, reference, reward_fn, ids, mask, **kwargs)


def replace(config, **changes):
    return dataclasses.replace(config, **changes)


TRL_METRICS = (
    "objective/kl",
    "objective/entropy",
    "objective/non_score_reward",
    "objective/scores",
    "objective/rlhf_reward",
    "objective/kl_coef",
    "policy/approxkl_avg",
    "policy/clipfrac_avg",
    "policy/entropy_avg",
    "loss/policy_avg",
    "loss/value_avg",
    "val/clipfrac_avg",
    "val/ratio",
    "val/num_eos_tokens",
    "val/explained_variance",
)


def learning_config(**overrides) -> PPOConfig:
    """The config of the learning run (shared by the improvement and the resume tests)."""
    fields = {
        "num_iterations": 12,
        "batch_size": 16,
        "num_minibatches": 2,
        "ppo_epochs": 2,
        "max_new_tokens": 6,
        "learning_rate": 1e-2,
        "lr_schedule": "constant",
        "kl_coef": 0.01,
        "adaptive_kl": True,
        "kl_target": 1.0,
        "kl_horizon": 200.0,
        "missing_eos_penalty": None,
        "seed": 0,
    }
    fields.update(overrides)
    return PPOConfig(**fields)


@dataclasses.dataclass(frozen=True)
class Run:
    history: list
    state: object


@functools.cache
def uninterrupted_run() -> Run:
    """learning_config().num_iterations iterations in one go (computed once per test session)."""
    trainer = tiny_trainer(learning_config())
    history = trainer.train(progress=False)
    return Run(history=history, state=trainer.state)
