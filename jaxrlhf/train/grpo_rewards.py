"""The reward of a group of responses: ``reward_fn(prompt_ids, prompt_mask, rollout) -> [R]``, from a
reward model (``experience.reward_model_fn``) or from Python rules on the decoded text."""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from jaxrlhf.data.task import decode_rows
from jaxrlhf.rollout import Rollout


def score_groups(reward_fn, prompt_ids, prompt_mask, rollout: Rollout, group_size: int):
    """reward_fn's scores [R] (float32) of responses in groups of ``group_size`` rows that share a
    prompt; a reward function with ``shares_prompts = True`` (``reward_model_fn``) is told the group
    size, so it may run each prompt once."""
    if getattr(reward_fn, "shares_prompts", False):
        scores = reward_fn(prompt_ids, prompt_mask, rollout, group_size=group_size)
    else:
        scores = reward_fn(prompt_ids, prompt_mask, rollout)
    return jnp.asarray(scores, jnp.float32)


def text_reward_fn(functions, tokenizer, *, weights=None) -> Callable:
    """A token-level ``reward_fn(prompt_ids, prompt_mask, rollout) -> [R]`` from Python rules on
    text, each ``fn(prompts: list[str], completions: list[str]) -> list[float]``, summed with
    ``weights`` (default 1 each); fractional values are kept (float32)."""
    weights = [1.0] * len(functions) if weights is None else list(weights)
    if len(weights) != len(functions):
        raise ValueError(f"{len(weights)} weights for {len(functions)} reward functions")

    def reward_fn(prompt_ids, prompt_mask, rollout):
        prompts = decode_rows(tokenizer, prompt_ids, prompt_mask)
        completions = decode_rows(tokenizer, rollout.tokens, rollout.attention_mask)
        total = np.zeros(len(completions), np.float32)
        for fn, w in zip(functions, weights):
            values = np.asarray(fn(prompts, completions), np.float32)
            if values.shape != total.shape:
                name = getattr(fn, "__name__", repr(fn))
                raise ValueError(
                    f"reward function {name} returned {values.shape[0] if values.ndim else 'a scalar'}"
                    f" values for {len(completions)} completions"
                )
            total += w * values
        return jnp.asarray(total)

    return reward_fn
