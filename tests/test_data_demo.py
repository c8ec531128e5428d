"""The built-in demo task: determinism, grammar, gold reward by hand, annotator noise statistics."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from data_utils import SMALL_TASK, sft_policy, small_task, tiny_lm

from jaxrlhf.collect import collect_preferences
from jaxrlhf.data import build_demo_task, tokenize_pairs
from jaxrlhf.data.demo_task import (
    NEGATIVE,
    POSITIVE,
    VOCABULARY,
    annotate,
    count_errors,
    gold_reward,
    preference_probability,
)
from jaxrlhf.rollout import SamplingConfig


@pytest.fixture(scope="module")
def task():
    return small_task()


def test_same_seed_same_task_other_seed_other_task(task):
    again = build_demo_task(0, **SMALL_TASK)
    assert again.corpus == task.corpus
    assert again.prompts == task.prompts and again.eval_prompts == task.eval_prompts
    assert again.tokenizer.get_vocab() == task.tokenizer.get_vocab()
    np.testing.assert_array_equal(again.prompt_batch().input_ids, task.prompt_batch().input_ids)
    other = build_demo_task(1, **SMALL_TASK)
    assert other.corpus != task.corpus and other.prompts != task.prompts
    assert set(task.eval_prompts) != set(task.prompts[:16])


def test_corpus_is_grammatical_balanced_and_one_token_per_word(task):
    assert all(count_errors(s.split()) == 0 for s in task.corpus)
    words = [w for s in task.corpus for w in s.split()]
    positive = sum(w in POSITIVE for w in words)
    negative = sum(w in NEGATIVE for w in words)
    assert abs(positive / (positive + negative) - 0.5) < 0.05
    vocab = set(words)
    assert (
        vocab == VOCABULARY and len(vocab) == 10 + 16 + 2 + 2 + 3
    )  # nouns adjs advs conjs the/was/.
    tok = task.tokenizer
    assert all(len(tok.encode(" " + w, add_special_tokens=False)) == 1 for w in vocab)
    assert task.vocab_size == len(tok) <= 384


def test_prompts_stop_after_was_and_are_grammatical_prefixes(task):
    for prompt in task.prompts + task.eval_prompts:
        words = prompt.split()
        assert words[-1] == "was"
        assert count_errors(words) == 1  # only the missing final "."


def test_corpus_batch_is_sentence_plus_eos(task):
    ids, mask = task.corpus_batch()
    assert ids.shape == mask.shape and ids.shape[0] == len(task.corpus)
    lengths = mask.sum(1)
    assert np.all(ids[np.arange(len(ids)), lengths - 1] == task.eos_token_id)
    assert task.decode(ids[:5], mask[:5]) == list(task.corpus[:5])


def test_gold_reward_hand_values():
    p = "the food was"
    cases = [
        (p, "great .", 1.0),  # +1, no error
        (p, "very good and the coffee was fresh .", 2.0),  # +2
        (p, "slow and the room was nice .", 0.0),  # −1 + 1
        (p, "great great great great", -4.0),  # +4 − 2·(3 repeats + no ".")
        (p, "great . the food was good .", 0.0),  # +2 − 2·(". the")
        (p, "", -2.0),  # "was" is not a sentence end
        (p, "gre at .", -6.0),  # was→gre, gre→at, at→. : 3 errors
        ("the food was great and the staff was", "bad .", -1.0),  # the prompt's words don't count
    ]
    prompts, completions, expected = zip(*cases)
    np.testing.assert_array_equal(gold_reward(prompts, completions), expected)
    # a completion cut off before EOS costs one more error
    np.testing.assert_array_equal(
        gold_reward([p, p], ["great .", "great ."], finished=[True, False]), [1.0, -1.0]
    )


def test_decode_and_finished(task):
    tok = task.tokenizer
    great, stop = (tok.encode(w, add_special_tokens=False)[0] for w in (" great", " ."))
    eos, pad = task.eos_token_id, task.pad_token_id
    tokens = np.array([[great, stop, eos, pad], [great, great, great, great]])
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert task.decode(tokens, mask) == ["great .", "great great great great"]
    np.testing.assert_array_equal(task.finished(tokens, mask), [True, False])


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_annotator_agreement_matches_bradley_terry(tau):
    # For each gold gap Δ the fraction of "a preferred" labels is a mean of n Bernoulli(σ(Δ/τ))
    # draws: its standard error is ≤ 0.5/√n = 0.0035 for n = 20000, so 0.015 is > 4 SE.
    rng = np.random.default_rng(0)
    n = 20000
    for delta in (-2.0, -1.0, 0.0, 1.0, 3.0):
        labels = annotate(np.full(n, delta), np.zeros(n), rng, tau=tau)
        expected = 1.0 / (1.0 + np.exp(-delta / tau))
        assert abs(labels.mean() - expected) < 0.015, (delta, labels.mean(), expected)
    # mixed gaps: the agreement with the gold order averages σ(|Δ|/τ)
    gap = rng.integers(-3, 4, size=n).astype(float)
    labels = annotate(gap, np.zeros(n), rng, tau=tau)
    agree = np.where(gap > 0, labels, ~labels)[gap != 0]
    expected = np.mean(preference_probability(np.abs(gap), 0.0, tau=tau)[gap != 0])
    assert abs(agree.mean() - expected) < 0.015


def test_preference_dataset_orders_by_label(task):
    data = task.preference_dataset(
        ["the food was"] * 2, ["great .", "bad ."], ["bad .", "nice ."], [True, False]
    )
    assert data["chosen"] == [" great .", " nice ."]
    assert data["rejected"] == [" bad .", " bad ."]
    pairs = tokenize_pairs(data, task.tokenizer, task.data_config)
    assert pairs.chosen_ids.shape == (2, 44)


def test_collect_preferences_from_a_policy(task):
    # a briefly fine-tuned tiny LM (60 steps): enough to end most completions with ". EOS"
    _, policy, _, _ = sft_policy()
    data, info = collect_preferences(
        task,
        policy,
        jax.random.key(0),
        num_pairs=10,
        sampling=SamplingConfig(max_new_tokens=12),
        batch_size=16,
    )
    assert len(data) == 10 and data.column_names == ["prompt", "chosen", "rejected"]
    assert all(c != r for c, r in zip(data["chosen"], data["rejected"]))
    assert all(p in task.prompts for p in data["prompt"])
    chosen = [c.strip() for c in data["chosen"]]
    rejected = [r.strip() for r in data["rejected"]]
    np.testing.assert_array_equal(info["gold_chosen"], gold_reward(data["prompt"], chosen))
    np.testing.assert_array_equal(info["gold_rejected"], gold_reward(data["prompt"], rejected))
    # the pairs tokenise within the task's lengths (completions end with EOS within 12 tokens)
    pairs = tokenize_pairs(data, task.tokenizer, task.data_config)
    assert pairs.num_truncated == 0


def test_collect_preferences_gives_up_on_a_policy_that_never_ends(task):
    # a random LM over ~370 tokens almost never samples EOS within 2 tokens
    with pytest.raises(RuntimeError, match=r"only \d+ of 50 usable pairs after 2 batches"):
        collect_preferences(
            task,
            tiny_lm(task.vocab_size),
            jax.random.key(0),
            num_pairs=50,
            sampling=SamplingConfig(max_new_tokens=2),
            batch_size=16,
            max_batches=2,
        )


def test_gold_reward_of_tokens_and_num_errors(task):
    tok = task.tokenizer
    great, stop = (tok.encode(w, add_special_tokens=False)[0] for w in (" great", " ."))
    eos, pad = task.eos_token_id, task.pad_token_id
    tokens = np.array([[great, stop, eos, pad], [great, great, great, great]])
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]])
    prompts = ["the food was"] * 2
    # row 0: "great ." finished → +1; row 1: +4 − 2·(3 repeats + no "." + no EOS) = −6
    np.testing.assert_array_equal(task.gold_reward_of_tokens(prompts, tokens, mask), [1.0, -6.0])
    texts = task.decode(tokens, mask)
    np.testing.assert_array_equal(task.num_errors(prompts, texts), [0, 4])
    np.testing.assert_array_equal(
        task.num_errors(prompts, texts, finished=task.finished(tokens, mask)), [0, 5]
    )
