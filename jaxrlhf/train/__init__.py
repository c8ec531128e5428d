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

# PPO, the data-parallel train step and checkpoints (jaxrlhf/train/ppo.py, parallel.py, checkpoint.py).
from jaxrlhf.train.checkpoint import (
    all_steps,
    latest_step,
    restore_checkpoint,
    save_checkpoint,
)
from jaxrlhf.train.optim import learning_rate_schedule, make_optimizer
from jaxrlhf.train.parallel import (
    TrainState,
    device_share,
    make_train_step,
    maybe_initialize_distributed,
)
from jaxrlhf.train.ppo import (
    Experience,
    PolicyWithCritic,
    PPOConfig,
    PPOState,
    PPOTrainer,
    experience_metrics,
    init_policy,
    make_experience,
    missing_eos_penalty,
    ppo_minibatch_loss,
    reward_model_fn,
)

__all__ += [
    "Experience",
    "PPOConfig",
    "PPOState",
    "PPOTrainer",
    "PolicyWithCritic",
    "TrainState",
    "all_steps",
    "device_share",
    "experience_metrics",
    "init_policy",
    "latest_step",
    "learning_rate_schedule",
    "make_experience",
    "make_optimizer",
    "make_train_step",
    "maybe_initialize_distributed",
    "missing_eos_penalty",
    "ppo_minibatch_loss",
    "restore_checkpoint",
    "reward_model_fn",
    "save_checkpoint",
]
