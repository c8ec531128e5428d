"""Decoder-only transformers (GPT-2, Llama/Qwen2/Mistral) with the four RLHF heads, HF checkpoints."""

from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.heads import ActorCritic, CausalLM, RewardModel, ValueModel
from jaxrlhf.models.hf import CheckpointError, from_pretrained, num_params, save_pretrained
from jaxrlhf.models.layers import KVCache
from jaxrlhf.models.tokenizer import load_tokenizer, train_bpe_tokenizer

__all__ = [
    "ActorCritic",
    "CausalLM",
    "CheckpointError",
    "KVCache",
    "ModelConfig",
    "RewardModel",
    "ValueModel",
    "from_pretrained",
    "load_tokenizer",
    "num_params",
    "save_pretrained",
    "train_bpe_tokenizer",
]
