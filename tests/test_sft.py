"""Supervised fine-tuning: the masked next-token loss by hand, and a tiny run that learns."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from data_utils import sft_policy, small_task, tiny_lm, tokenizer
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxrlhf.train import SFTConfig, next_token_loss, train_sft
from jaxrlhf.train.reward import split_indices
from jaxrlhf.train.sft import NextTokenLoss, first_target, held_out_loss, next_token_terms


@pytest.mark.parametrize("fn", [next_token_loss, jax.jit(next_token_loss)])
def test_next_token_loss_hand_values(fn):
    # V = 2. Row 0: tokens [0, 1, 1], all real; logits favour token 1 by log 3 everywhere, so
    # p(1) = 3/4, p(0) = 1/4. Targets are tokens 1, 2 → both 1 → −log(3/4) each.
    # Row 1: tokens [1, 0, pad] with mask [1, 1, 0]: one target (token 0) → −log(1/4);
    # the padded target is ignored. Mean over the 3 counted targets.
    logits = jnp.tile(jnp.array([0.0, jnp.log(3.0)]), (2, 3, 1))  # [2, 3, 2]
    ids = jnp.array([[0, 1, 1], [1, 0, 1]])
    mask = jnp.array([[1, 1, 1], [1, 1, 0]])
    expected = (2 * -np.log(0.75) - np.log(0.25)) / 3
    np.testing.assert_allclose(fn(logits, ids, mask), expected, rtol=1e-6)


def test_next_token_loss_ignores_padding_and_left_padding():
    key = jax.random.key(0)
    logits = jax.random.normal(key, (1, 4, 5))  # [1, 4, 5]
    ids = jnp.array([[3, 1, 4, 2]])
    full = next_token_loss(logits, ids, jnp.ones((1, 4)))
    # the same sequence with garbage left padding: the extra context predicts nothing
    padded_logits = jnp.concatenate([jax.random.normal(key, (1, 2, 5)), logits], axis=1)
    padded_ids = jnp.array([[0, 0, 3, 1, 4, 2]])
    padded_mask = jnp.array([[0, 0, 1, 1, 1, 1]])
    np.testing.assert_allclose(next_token_loss(padded_logits, padded_ids, padded_mask), full, 1e-6)


def test_sft_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"SFTConfig.warmup_steps = -1: must be >= 0"):
        SFTConfig(steps=10, warmup_steps=-1)
    with pytest.raises(ValueError, match=r"SFTConfig.lr_schedule = 'step'"):
        SFTConfig(lr_schedule="step")
    with pytest.raises(ValueError, match=r"SFTConfig.learning_rate = 0.0"):
        SFTConfig(learning_rate=0.0)


def test_sft_learns_the_corpus():
    task = small_task()
    ids, mask = task.corpus_batch()
    model, trained, metrics, before = sft_policy()
    after = float(next_token_loss(trained(ids, mask), ids, mask))
    assert len(metrics["loss"]) == 60
    # random init: ≈ log |V| ≈ 5.9 nats; the grammar leaves ~1.3 nats/token (adjective choices)
    assert before > 5.0 and after < 2.5, (before, after)
    assert np.mean(metrics["loss"][-10:]) < np.mean(metrics["loss"][:10]) - 2
    # the input model is not modified
    np.testing.assert_allclose(float(next_token_loss(model(ids, mask), ids, mask)), before)


@settings(max_examples=15, deadline=None)
@given(
    lengths=st.tuples(st.integers(2, 5), st.integers(2, 5)),
    garbage=st.integers(0, 6),
)
def test_next_token_loss_ignores_whatever_sits_in_the_padding(lengths, garbage):
    logits = jax.random.normal(jax.random.key(1), (2, 5, 7))  # [2, 5, 7]
    ids = jnp.array([[1, 2, 3, 4, 5], [6, 5, 4, 3, 2]])
    mask = (jnp.arange(5)[None, :] < jnp.array(lengths)[:, None]).astype(jnp.int32)  # right pad
    dirty_ids = jnp.where(mask > 0, ids, garbage)
    dirty_logits = jnp.where(mask[..., None] > 0, logits, 100.0 * garbage)
    np.testing.assert_allclose(
        next_token_loss(dirty_logits, dirty_ids, mask), next_token_loss(logits, ids, mask), 1e-6
    )


# ------------------------------------------------------------------------ completion-only loss


@pytest.mark.parametrize("fn", [next_token_loss, jax.jit(next_token_loss)])
def test_loss_mask_counts_only_the_marked_targets(fn):
    # The logits of the hand test above: p(1) = 3/4, p(0) = 1/4 at every position.
    # Row 0: tokens [0, 1, 1], loss_mask [0, 0, 1] (a two-token prompt, then a one-token
    # completion): only the target at t = 2 (token 1) counts → −log(3/4); the target at t = 1 is
    # prompt. Row 1: tokens [1, 0, pad], mask [1, 1, 0], loss_mask [0, 1, 1]: the target at t = 1
    # (token 0) counts → −log(1/4); t = 2 is padding, its loss_mask 1 is ignored. Mean over 2.
    logits = jnp.tile(jnp.array([0.0, jnp.log(3.0)]), (2, 3, 1))  # [2, 3, 2]
    ids = jnp.array([[0, 1, 1], [1, 0, 1]])
    mask = jnp.array([[1, 1, 1], [1, 1, 0]])
    loss_mask = jnp.array([[0, 0, 1], [0, 1, 1]])
    expected = (-np.log(0.75) - np.log(0.25)) / 2
    np.testing.assert_allclose(fn(logits, ids, mask, loss_mask), expected, rtol=1e-6)
    total, count = next_token_terms(logits, ids, mask, loss_mask)
    np.testing.assert_allclose([total, count], [-np.log(0.75) - np.log(0.25), 2.0], rtol=1e-6)
    # a loss mask of ones is no loss mask
    np.testing.assert_allclose(
        fn(logits, ids, mask, jnp.ones_like(ids)), next_token_loss(logits, ids, mask), rtol=1e-6
    )
    # the loss mask of the first token never matters (it is nobody's target)
    np.testing.assert_allclose(
        fn(logits, ids, mask, loss_mask.at[:, 0].set(1)), expected, rtol=1e-6
    )


def _completion_batch():
    from jaxrlhf.data import DataConfig, tokenize_sft

    rows = [
        {"prompt": f"the {noun} was", "completion": f" {adjective} ."}
        for noun in ("food", "staff", "room", "view")
        for adjective in ("great", "nice")
    ]
    return tokenize_sft(rows, tokenizer(), DataConfig())  # [8, 8]


def test_train_sft_with_a_loss_mask_and_held_out_data():
    batch = _completion_batch()
    ids, mask, loss_mask = batch.input_ids, batch.attention_mask, batch.loss_mask
    model = tiny_lm(len(tokenizer()))
    # Full-batch steps: the first logged loss is the initial model's completion-only loss.
    before = float(next_token_loss(model(ids, mask), ids, mask, loss_mask))
    config = SFTConfig(steps=3, batch_size=6, learning_rate=3e-3, lr_schedule="cosine",
                       warmup_steps=0, eval_fraction=0.25, eval_every=2)  # fmt: skip
    seen = []
    trained, metrics = train_sft(
        model,
        ids,
        mask,
        config,
        loss_mask=loss_mask,
        progress=False,
        callback=lambda step, m: seen.append((step, "eval/loss" in m)),
    )
    assert seen == [(1, False), (2, True), (3, True)]
    assert metrics["num_eval"] == 2 and len(metrics["eval_loss"]) == 2
    train_index, eval_index = split_indices(8, 0.25, seed=0)
    held = (ids[eval_index], mask[eval_index], loss_mask[eval_index])
    np.testing.assert_allclose(
        metrics["eval_loss"][-1],
        next_token_loss(trained(held[0], held[1]), *held),
        rtol=1e-5,
    )
    first = next_token_loss(model(ids[train_index], mask[train_index]), ids[train_index],
                            mask[train_index], loss_mask[train_index])  # fmt: skip
    np.testing.assert_allclose(metrics["loss"][0], first, rtol=1e-5)
    assert before > 0 and metrics["loss"][-1] < metrics["loss"][0]


def test_held_out_loss_in_batches_equals_the_whole_batch_loss():
    batch = _completion_batch()
    model = tiny_lm(len(tokenizer()))
    data = tuple(batch[:3])
    whole = next_token_loss(model(data[0], data[1]), *data)
    # batches of 3 over 8 rows: the last one padded with rows that count nothing
    np.testing.assert_allclose(held_out_loss(model, data, batch_size=3), whole, rtol=1e-5)


def test_first_target_hand_values():
    # Row 0 counts targets from position 3 (loss mask), row 1 from position 2: the head can skip
    # position 0 (it predicts position 1, which no row counts); without a loss mask all count.
    mask = np.array([[1, 1, 1, 1, 1], [0, 1, 1, 1, 0]])
    loss = np.array([[0, 0, 0, 1, 1], [0, 0, 1, 1, 0]])
    assert first_target(mask, loss) == 2
    assert first_target(mask) == 1
    assert first_target(mask, np.zeros_like(mask)) == 1  # none counts: every position
    with pytest.raises(ValueError, match="first_target must be ≥ 1"):
        NextTokenLoss(None, first_target=0)


def test_the_head_on_the_counted_positions_only_gives_the_full_loss_and_gradient():
    """A completion-only loss with the head from ``first_target`` on: the value and gradient of
    the head on every position (and of next_token_loss on full logits)."""
    ids, mask, loss_mask = _completion_batch()[:3]
    start = first_target(mask, loss_mask)
    assert start > 1  # the prompts are skipped
    graphdef, params = nnx.split(tiny_lm(len(tokenizer())))

    def mean(loss):
        def f(p):
            total, count = loss(p, (ids, mask, loss_mask))["sft/nll"]
            return total / count

        return jax.jit(jax.value_and_grad(f))(params)

    want, want_grad = mean(NextTokenLoss(graphdef))
    got, got_grad = mean(NextTokenLoss(graphdef, first_target=start))
    full = next_token_loss(nnx.merge(graphdef, params)(ids, mask), ids, mask, loss_mask)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(got, full, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
