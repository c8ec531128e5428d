"""Preference and prompt datasets (loading, validation, chat rendering, padding) and the demo task.

Collecting preference pairs from a policy is :mod:`jaxrlhf.collect`.
"""

from jaxrlhf.data.demo_task import DemoTask, build_demo_task, gold_reward
from jaxrlhf.data.preference import (
    DataConfig,
    DataError,
    PairBatch,
    PromptBatch,
    iterate_batches,
    load_dataset_file,
    load_preference_dataset,
    load_prompt_dataset,
    render_chat,
    tokenize_pairs,
    tokenize_prompts,
    validate_examples,
)

__all__ = [
    "DataConfig",
    "DataError",
    "DemoTask",
    "PairBatch",
    "PromptBatch",
    "build_demo_task",
    "gold_reward",
    "iterate_batches",
    "load_dataset_file",
    "load_preference_dataset",
    "load_prompt_dataset",
    "render_chat",
    "tokenize_pairs",
    "tokenize_prompts",
    "validate_examples",
]
