"""Datasets: where they come from (files, dataset directories, Hub names), the formats people have
(preference, prompt and SFT data), validation, chat rendering, padding; and the demo task.

Collecting preference pairs from a policy is :mod:`jaxrlhf.collect`.
"""

from jaxrlhf.data.demo_task import DemoTask, build_demo_task, gold_reward
from jaxrlhf.data.formats import (
    PreferenceData,
    PreferenceFormat,
    detect_preference_format,
    load_preference_dataset,
    load_prompt_dataset,
    preference_rows,
    split_shared_prompt,
)
from jaxrlhf.data.preference import (
    DataConfig,
    DataError,
    PairBatch,
    PromptBatch,
    iterate_batches,
    padded_length,
    render_chat,
    tokenize_pairs,
    tokenize_prompts,
    validate_examples,
)
from jaxrlhf.data.sft import SFTBatch, SFTData, load_sft_dataset, sft_rows, tokenize_sft
from jaxrlhf.data.sources import load_dataset_file, load_splits

__all__ = [
    "DataConfig",
    "DataError",
    "DemoTask",
    "PairBatch",
    "PreferenceData",
    "PreferenceFormat",
    "PromptBatch",
    "SFTBatch",
    "SFTData",
    "build_demo_task",
    "detect_preference_format",
    "gold_reward",
    "iterate_batches",
    "load_dataset_file",
    "load_preference_dataset",
    "load_prompt_dataset",
    "load_sft_dataset",
    "load_splits",
    "padded_length",
    "preference_rows",
    "render_chat",
    "sft_rows",
    "split_shared_prompt",
    "tokenize_pairs",
    "tokenize_prompts",
    "tokenize_sft",
    "validate_examples",
]
