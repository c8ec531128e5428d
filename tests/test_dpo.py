"""DPO: sequence log-probs by hand, the first loss is log 2, a run that learns an easy preference,
and the `jaxrlhf dpo` command."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
from data_utils import tiny_lm, tokenizer
from test_reward import _easy_pairs

from jaxrlhf import rl
from jaxrlhf.train.dpo import DPOConfig, implicit_reward_accuracy, sequence_logprobs, train_dpo


def test_sequence_logprobs_sum_the_response_tokens_only():
    model = tiny_lm(len(tokenizer()))
    pairs = _easy_pairs(3, seed=0)
    P = pairs.prompt_length
    ids, mask = jnp.asarray(pairs.chosen_ids), jnp.asarray(pairs.chosen_mask)
    got = sequence_logprobs(model, ids, mask, P)
    logprobs = rl.token_logprobs(model(ids, mask)[:, :-1], ids[:, 1:])  # [N, L−1]
    response = np.asarray(mask)[:, 1:] * (np.arange(ids.shape[1] - 1)[None] >= P - 1)
    np.testing.assert_allclose(got, (np.asarray(logprobs) * response).sum(-1), rtol=1e-5)


def test_config_rejects_bad_values_naming_the_field():
    for field, value in (("beta", 0.0), ("loss_type", "hinge"), ("label_smoothing", 0.5)):
        with pytest.raises(ValueError, match=rf"DPOConfig\.{field} = "):
            DPOConfig(**{field: value})


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_learns_an_easy_preference(loss_type):
    train, held_out = _easy_pairs(64, seed=0), _easy_pairs(32, seed=1)
    model = tiny_lm(len(tokenizer()))
    config = DPOConfig(epochs=8, batch_size=32, learning_rate=3e-3, lr_schedule="cosine",
                       warmup_steps=1, beta=0.5,
                       loss_type=loss_type, eval_fraction=0.0)  # fmt: skip
    trained, metrics = train_dpo(model, train, config, eval_pairs=held_out, progress=False)
    # Policy = reference at the start: h = 0, so the sigmoid loss is log 2 (IPO: (1/(2β))² = 1).
    first = math.log(2.0) if loss_type == "sigmoid" else (1 / (2 * 0.5)) ** 2
    np.testing.assert_allclose(metrics["loss"][0], first, rtol=1e-5)
    assert metrics["accuracy"][0] == 0.0  # r_c = r_r = 0: no pair ranked right yet
    assert metrics["eval_accuracy"][-1] >= 0.9, metrics["eval_accuracy"]
    assert metrics["loss"][-1] < 0.7 * metrics["loss"][0]
    acc = implicit_reward_accuracy(trained, model, held_out, beta=0.5)
    assert acc == metrics["eval_accuracy"][-1]
