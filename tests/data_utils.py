"""Shared fixtures for the data / SFT / reward-model tests: a small tokenizer, files, tiny models."""

from __future__ import annotations

import functools
import json
import os

import datasets
import numpy as np
from flax import nnx

from jaxrlhf.data.demo_task import sample_corpus
from jaxrlhf.models import CausalLM, ModelConfig
from jaxrlhf.models.tokenizer import train_bpe_tokenizer

TEXT_ROWS = [
    {"prompt": "the food was", "chosen": " great .", "rejected": " bad ."},
    {"prompt": "the staff was", "chosen": " very nice .", "rejected": " rude ."},
    {"prompt": "the room was", "chosen": " lovely .", "rejected": " dirty ."},
]

CHAT_ROWS = [
    {
        "prompt": [{"role": "user", "content": "how was the food ?"}],
        "chosen": [{"role": "assistant", "content": "the food was great ."}],
        "rejected": [{"role": "assistant", "content": "the food was bad ."}],
    },
    {
        "prompt": [
            {"role": "user", "content": "how was the staff ?"},
            {"role": "assistant", "content": "the staff was nice ."},
            {"role": "user", "content": "and the room ?"},
        ],
        "chosen": [{"role": "assistant", "content": "the room was lovely ."}],
        "rejected": [{"role": "assistant", "content": "the room was dirty ."}],
    },
]


@functools.cache
def tokenizer():
    """The package's byte-level BPE trained on 300 sentences of the demo grammar (every word one
    token) and a few chat lines."""
    corpus = sample_corpus(np.random.default_rng(0), 300)
    corpus += ["user: how was it ?\nassistant: and\n"] * 20
    return train_bpe_tokenizer(corpus, 400)


def write(rows: list[dict], directory: str, fmt: str) -> str:
    """Write ``rows`` as ``fmt`` ("json", "jsonl", "parquet", "csv", "disk", "disk_dict") under
    ``directory``; return the path."""
    path = os.path.join(directory, f"data.{fmt}")
    if fmt == "json":
        with open(path, "w") as f:
            json.dump(rows, f)
    elif fmt == "jsonl":
        with open(path, "w") as f:
            f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    elif fmt == "parquet":
        datasets.Dataset.from_list(rows).to_parquet(path)
    elif fmt == "csv":
        datasets.Dataset.from_list(rows).to_csv(path, index=False)
    elif fmt == "disk":
        datasets.Dataset.from_list(rows).save_to_disk(path)
    elif fmt == "disk_dict":
        datasets.DatasetDict(train=datasets.Dataset.from_list(rows)).save_to_disk(path)
    else:
        raise ValueError(fmt)
    return path


def tiny_lm_config(vocab_size: int, **overrides) -> ModelConfig:
    """A 1-layer, width-32 GPT-2: compiles and steps fast on CPU."""
    fields = {
        "family": "gpt2",
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "num_layers": 1,
        "num_heads": 2,
        "max_position_embeddings": 48,
    }
    return ModelConfig(**{**fields, **overrides})


def tiny_lm(vocab_size: int, seed: int = 0) -> CausalLM:
    return CausalLM(tiny_lm_config(vocab_size), rngs=nnx.Rngs(seed))


SMALL_TASK = {"num_sentences": 600, "num_prompts": 64, "num_eval_prompts": 16}


@functools.cache
def small_task():
    """A small demo task (seed 0): 600 sentences, 64 train and 16 eval prompts."""
    from jaxrlhf.data import build_demo_task

    return build_demo_task(0, **SMALL_TASK)


@functools.cache
def sft_policy():
    """(policy, metrics, before): a tiny LM fine-tuned 60 steps on small_task()'s corpus, and its
    corpus loss before training. Shared by the SFT and preference-collection tests."""
    from jaxrlhf.train import SFTConfig, next_token_loss, train_sft

    task = small_task()
    ids, mask = task.corpus_batch()
    model = tiny_lm(task.vocab_size)
    before = float(next_token_loss(model(ids, mask), ids, mask))
    config = SFTConfig(
        steps=60, batch_size=32, learning_rate=1e-2, lr_schedule="cosine", warmup_steps=5
    )
    policy, metrics = train_sft(model, ids, mask, config, progress=False)
    return model, policy, metrics, before
