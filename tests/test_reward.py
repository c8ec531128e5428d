"""Reward-model training: the loss by hand, initialisation from the policy, normalisation, and a
run that learns an easy preference."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from data_utils import tiny_lm, tokenizer
from flax import nnx

from jaxrlhf.data import DataConfig, tokenize_pairs
from jaxrlhf.data.demo_task import NEGATIVE, NOUNS, POSITIVE
from jaxrlhf.train import (
    RewardConfig,
    normalize_reward_model,
    pairwise_accuracy,
    reward_model_from_policy,
    reward_model_loss,
    score,
    train_reward_model,
)
from jaxrlhf.train.reward import reward_centering_term, split_indices

VOCAB = len(tokenizer())


def softplus(x):
    return math.log1p(math.exp(x))  # −log σ(−x)


@pytest.mark.parametrize("jit", [False, True])
def test_reward_model_loss_hand_values(jit):
    fn = jax.jit(reward_model_loss, static_argnames="center_rewards_coefficient")
    fn = fn if jit else reward_model_loss
    r_c, r_r = jnp.array([1.0, 0.0]), jnp.array([0.0, 0.0])
    # plain Bradley-Terry: mean(−log σ(1), −log σ(0)) = mean(softplus(−1), softplus(0))
    loss, parts = fn(r_c, r_r)
    np.testing.assert_allclose(loss, (softplus(-1) + softplus(0)) / 2, rtol=1e-6)
    np.testing.assert_allclose(parts["accuracy"], 0.5)  # 1 > 0 yes, 0 > 0 no
    np.testing.assert_allclose(parts["margin_mean"], 0.5)
    # margin 1: −log σ(1 − 0 − 1), −log σ(0 − 0 − 1)
    loss, _ = fn(r_c, r_r, margin=1.0)
    np.testing.assert_allclose(loss, (softplus(0) + softplus(1)) / 2, rtol=1e-6)
    # per-pair margins [2, 0]: softplus(2 − 1) and softplus(0)
    loss, _ = fn(r_c, r_r, margin=jnp.array([2.0, 0.0]))
    np.testing.assert_allclose(loss, (softplus(1) + softplus(0)) / 2, rtol=1e-6)
    # centring c = 0.1: + 0.1 · mean((1 + 0)², (0 + 0)²) = + 0.05
    loss, parts = fn(r_c, r_r, center_rewards_coefficient=0.1)
    np.testing.assert_allclose(loss, (softplus(-1) + softplus(0)) / 2 + 0.05, rtol=1e-6)
    np.testing.assert_allclose(parts["center_loss"], 0.5)


def test_centering_term_is_zero_for_symmetric_scores():
    np.testing.assert_allclose(reward_centering_term(jnp.array([2.0, -1]), jnp.array([-2.0, 1])), 0)
    np.testing.assert_allclose(reward_centering_term(jnp.array([3.0]), jnp.array([1.0])), 16.0)


def test_reward_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"RewardConfig.center_rewards_coefficient = -1.0"):
        RewardConfig(center_rewards_coefficient=-1.0)
    with pytest.raises(ValueError, match=r"RewardConfig.eval_fraction = 1.0: must be in \[0, 1\)"):
        RewardConfig(eval_fraction=1.0)


def _random_sequences(n, vocab, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, vocab, size=(n, 10)).astype(np.int32)  # [n, 10]
    mask = np.ones_like(ids)
    mask[:, :3] = 0  # left padding
    mask[: n // 2, -2:] = 0  # right padding on half the rows
    return ids, mask


def test_reward_model_from_policy_copies_the_trunk_and_inits_the_head():
    policy = tiny_lm(VOCAB, seed=3)
    rm = reward_model_from_policy(policy, seed=0)
    policy_trunk = jax.tree.leaves(nnx_state(policy.model))
    rm_trunk = jax.tree.leaves(nnx_state(rm.model))
    assert len(policy_trunk) == len(rm_trunk) > 0
    for a, b in zip(policy_trunk, rm_trunk):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(rm.score.bias[...], 0.0)
    d = policy.config.hidden_size
    kernel_std = float(np.std(rm.score.kernel[...]))  # 32 draws of N(0, 1/(D+1))
    assert 0.5 / math.sqrt(d + 1) < kernel_std < 1.5 / math.sqrt(d + 1)
    # a copy, not shared: changing the reward model leaves the policy alone
    before = np.array(policy.model.wte.embedding[...])
    rm.model.wte.embedding[...] = rm.model.wte.embedding[...] + 1.0
    np.testing.assert_array_equal(policy.model.wte.embedding[...], before)


def nnx_state(module):
    return nnx.state(module, nnx.Param)


def test_score_batches_agree_and_normalisation_gives_mean_0_std_1():
    rm = reward_model_from_policy(tiny_lm(VOCAB), seed=1)
    ids, mask = _random_sequences(7, VOCAB)
    full = score(rm, ids, mask)
    np.testing.assert_allclose(score(rm, ids, mask, batch_size=3), full, rtol=1e-5, atol=1e-6)
    direct = np.asarray(rm(jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(full, direct, rtol=1e-5, atol=1e-6)
    normalized, stats = normalize_reward_model(rm, ids, mask)
    np.testing.assert_allclose(stats["reward_mean"], full.mean(), rtol=1e-5)
    np.testing.assert_allclose(stats["reward_std"], full.std(), rtol=1e-5)
    after = score(normalized, ids, mask)
    np.testing.assert_allclose(after, (full - full.mean()) / full.std(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose([after.mean(), after.std()], [0.0, 1.0], atol=1e-5)
    np.testing.assert_array_equal(score(rm, ids, mask), full)  # the original is unchanged


def _easy_pairs(n, seed):
    """Prompt "the NOUN was"; chosen a positive adjective, rejected a negative one."""
    rng = np.random.default_rng(seed)
    rows = [
        {
            "prompt": f"the {NOUNS[rng.integers(10)]} was",
            "chosen": f" {POSITIVE[rng.integers(8)]} .",
            "rejected": f" {NEGATIVE[rng.integers(8)]} .",
        }
        for _ in range(n)
    ]
    return tokenize_pairs(rows, tokenizer(), DataConfig(max_prompt_length=4, max_response_length=4))


def test_reward_model_learns_an_easy_preference_with_margin_and_centering():
    train, held_out = _easy_pairs(128, seed=0), _easy_pairs(64, seed=1)
    rm = reward_model_from_policy(tiny_lm(VOCAB), seed=0)
    # full-batch steps, so the first logged loss is the loss of the initial model on all pairs
    r_c = score(rm, train.chosen_ids, train.chosen_mask)
    r_r = score(rm, train.rejected_ids, train.rejected_mask)
    margins = np.full(128, 0.5, np.float32)
    expected_first = np.mean(np.logaddexp(0, -(r_c - r_r - 0.5))) + 0.1 * np.mean((r_c + r_r) ** 2)
    config = RewardConfig(
        epochs=40,
        batch_size=128,
        learning_rate=1e-2,
        lr_schedule="cosine",
        warmup_steps=2,
        center_rewards_coefficient=0.1,
    )
    trained, metrics = train_reward_model(
        rm, train, config, margins=margins, eval_pairs=held_out, progress=False
    )
    np.testing.assert_allclose(metrics["loss"][0], expected_first, rtol=1e-4)
    assert len(metrics["loss"]) == 40 and len(metrics["eval_accuracy"]) == 40
    assert metrics["num_train_pairs"] == 128 and metrics["num_eval_pairs"] == 64
    assert metrics["eval_accuracy"][-1] >= 0.95, metrics["eval_accuracy"][-1]
    assert pairwise_accuracy(trained, held_out) == metrics["eval_accuracy"][-1]
    assert metrics["loss"][-1] < 0.5 * metrics["loss"][0]
    with pytest.raises(ValueError, match=r"margins: shape \(3,\), expected \(128,\)"):
        train_reward_model(rm, train, config, margins=np.zeros(3), progress=False)


def test_held_out_split_is_a_seeded_partition():
    train, held_out = split_indices(40, 0.25, seed=2)
    assert len(train) == 30 and len(held_out) == 10
    np.testing.assert_array_equal(np.sort(np.concatenate([train, held_out])), np.arange(40))
    again = split_indices(40, 0.25, seed=2)
    np.testing.assert_array_equal(again[1], held_out)
    assert not np.array_equal(split_indices(40, 0.25, seed=3)[1], held_out)


def test_pair_padding_does_not_change_the_score():
    # [pad, prompt, response, EOS, pad]: the score equals that of the bare unpadded sequence
    pairs = _easy_pairs(2, seed=3)
    rm = reward_model_from_policy(tiny_lm(VOCAB), seed=0)
    padded = score(rm, pairs.chosen_ids, pairs.chosen_mask)
    for i in range(2):
        bare = pairs.chosen_ids[i][pairs.chosen_mask[i] > 0][None]  # [1, n]
        np.testing.assert_allclose(
            score(rm, bare, np.ones_like(bare)), padded[i : i + 1], rtol=1e-5, atol=1e-6
        )
