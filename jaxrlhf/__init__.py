"""jaxrlhf: RLHF with PPO in JAX/Flax — the derivation you can step through, the trainer you can run.

jaxrlhf.gae, jaxrlhf.ppo_loss, …      the RLHF math (jaxrlhf.rl), pure functions on arrays
jaxrlhf.from_pretrained / save_pretrained   Hugging Face safetensors checkpoints in and out
jaxrlhf.sample(model, …, SamplingConfig(…), rng)   jitted prefill + KV-cache decode → Rollout
jaxrlhf.score_sequences                a reward model's score of prompt ⧺ response
jaxrlhf.train, jaxrlhf.data            trainers (SFT, reward model, PPO) and datasets
"""

from jaxrlhf.models import (
    ActorCritic,
    CausalLM,
    ModelConfig,
    RewardModel,
    ValueModel,
    from_pretrained,
    save_pretrained,
    train_bpe_tokenizer,
)
from jaxrlhf.rl import *  # (the RLHF math; see jaxrlhf/rl/__init__.py)
from jaxrlhf.rl import __all__ as _rl_all
from jaxrlhf.rollout import Rollout, SamplingConfig, generate, sample, score_sequences

__version__ = "0.1.0"

__all__ = [  # noqa: PLE0604 (the rl names are strings too)
    *_rl_all,
    "ActorCritic",
    "CausalLM",
    "ModelConfig",
    "RewardModel",
    "Rollout",
    "SamplingConfig",
    "ValueModel",
    "from_pretrained",
    "generate",
    "sample",
    "save_pretrained",
    "score_sequences",
    "train_bpe_tokenizer",
]
