"""Trainers: supervised fine-tuning, reward modelling and PPO (each composes jaxrlhf.rl's math)."""

from jaxrlhf.train.reward import (
    RewardConfig,
    normalize_reward_model,
    pairwise_accuracy,
    reward_model_from_policy,
    reward_model_loss,
    score,
    train_reward_model,
)
from jaxrlhf.train.sft import SFTConfig, next_token_loss, tiny_model_config, train_sft

__all__ = [
    "RewardConfig",
    "SFTConfig",
    "next_token_loss",
    "normalize_reward_model",
    "pairwise_accuracy",
    "reward_model_from_policy",
    "reward_model_loss",
    "score",
    "tiny_model_config",
    "train_reward_model",
    "train_sft",
]

# The one train step (state.py), the shared loop (loop.py), PPO and checkpoints.
from jaxrlhf.train.checkpoint import (
    all_steps,
    latest_step,
    restore_checkpoint,
    save_checkpoint,
)
from jaxrlhf.train.experience import (
    Experience,
    experience_metrics,
    make_experience,
    missing_eos_penalty,
    reward_model_fn,
    score_rollout,
)
from jaxrlhf.train.loop import LoopConfig, fit
from jaxrlhf.train.optim import OptimizerConfig, learning_rate_schedule, make_optimizer
from jaxrlhf.train.ppo import PolicyWithCritic, PPOState, PPOTrainer, init_policy
from jaxrlhf.train.ppo_config import PPOConfig
from jaxrlhf.train.ppo_loss import PPOLoss
from jaxrlhf.train.state import TrainState, init_train_state, make_train_step, train_step

__all__ += [
    "Experience",
    "LoopConfig",
    "OptimizerConfig",
    "PPOConfig",
    "PPOLoss",
    "PPOState",
    "PPOTrainer",
    "PolicyWithCritic",
    "TrainState",
    "all_steps",
    "experience_metrics",
    "fit",
    "init_policy",
    "init_train_state",
    "latest_step",
    "learning_rate_schedule",
    "make_experience",
    "make_optimizer",
    "make_train_step",
    "missing_eos_penalty",
    "restore_checkpoint",
    "reward_model_fn",
    "save_checkpoint",
    "score_rollout",
    "train_step",
]
