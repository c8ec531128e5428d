"""The arithmetic task: problems and splits, exact rewards by hand, the char tokenizer, batches, and
a short supervised warm-up that raises held-out accuracy."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx

from jaxrlhf.models import CausalLM, from_pretrained, save_pretrained
from jaxrlhf.tasks import (
    ArithmeticTask,
    build_arithmetic_task,
    char_tokenizer,
    correctness_reward,
    format_reward,
    reward,
    sft_policy,
)
from jaxrlhf.tasks.arithmetic import (
    answer,
    parse_prompt,
    problem_space_size,
    problems,
    signed_answers,
)
from jaxrlhf.train.sft import tiny_model_config

SMALL = {"num_train": 300, "num_eval": 100}


@pytest.fixture(scope="module")
def task() -> ArithmeticTask:
    return build_arithmetic_task(0, **SMALL)


# ---------------------------------------------------------------------------------- problems


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("17+25=", "42"),
        ("99+99=", "198"),
        ("3-17=", "-14"),  # subtraction may go below zero
        ("40-40=", "0"),
        ("0+0=", "0"),
        ("7*8=", "56"),
        ("12*0=", "0"),
    ],
)
def test_answers_by_hand(prompt, expected):
    assert answer(prompt) == expected


def test_parse_prompt():
    assert parse_prompt("17+25=") == (17, "+", 25)
    assert parse_prompt("3-17=") == (3, "-", 17)
    for bad in ("17+25", "17/25=", "a+b=", "1+2=3", ""):
        with pytest.raises(ValueError, match="not an arithmetic prompt"):
            parse_prompt(bad)


def test_problem_indices_by_hand():
    # max_operand 99: "+" holds indices 0 … 9999 (index = 100·a + b), then "-" 10000 … 19999.
    assert problem_space_size(("+", "-"), max_operand=99) == 2 * 100 * 100
    assert problems([0, 1, 100, 9999, 10000, 10203]) == [
        "0+0=",
        "0+1=",
        "1+0=",
        "99+99=",
        "0-0=",
        "2-3=",
    ]
    # "*" uses max_factor: 3 → 4² = 16 problems, after the 9 of "+" with max_operand 2.
    assert problem_space_size(("+", "*"), max_operand=2, max_factor=3) == 9 + 16
    assert problems([8, 9, 24], ("+", "*"), max_operand=2, max_factor=3) == ["2+2=", "0*0=", "3*3="]
    with pytest.raises(ValueError, match="out of range"):
        problems([25], ("+", "*"), max_operand=2, max_factor=3)


def test_splits_are_disjoint_distinct_seeded_and_in_range(task):
    assert len(task.train_prompts) == 300 and len(task.eval_prompts) == 100
    both = task.train_prompts + task.eval_prompts
    assert len(set(both)) == 400  # distinct, so train ∩ eval = ∅
    assert not set(task.train_prompts) & set(task.eval_prompts)
    for prompt in both:
        a, op, b = parse_prompt(prompt)
        assert op in "+-" and 0 <= a <= 99 and 0 <= b <= 99
    again = build_arithmetic_task(0, **SMALL)
    assert again.train_prompts == task.train_prompts and again.eval_prompts == task.eval_prompts
    other = build_arithmetic_task(1, **SMALL)
    assert other.train_prompts != task.train_prompts
    # Both operations and negative answers occur.
    assert {parse_prompt(p)[1] for p in both} == {"+", "-"}
    assert any(answer(p).startswith("-") for p in both)


def test_whole_problem_space_and_multiplication():
    task = build_arithmetic_task(3, num_train=12, num_eval=4, operations=("*",), max_factor=3)
    every = {f"{a}*{b}=" for a in range(4) for b in range(4)}
    assert set(task.train_prompts) | set(task.eval_prompts) == every
    assert task.max_prompt_length == 4 and task.max_new_tokens == 2  # "3*3=", "9" + EOS
    with pytest.raises(ValueError, match="more than the 16 distinct problems"):
        build_arithmetic_task(0, num_train=16, num_eval=1, operations=("*",), max_factor=3)
    with pytest.raises(ValueError, match="operations must be among"):
        build_arithmetic_task(0, operations=("/",))


def test_widths_cover_the_problem_space(task):
    # "99+99=" is the longest prompt (6); "198" / "-99" the longest answers (3) + EOS.
    assert task.max_prompt_length == 6 and task.max_new_tokens == 4
    mul = build_arithmetic_task(0, num_train=10, num_eval=10, operations=("+", "-", "*"))
    assert mul.max_new_tokens == 4  # 12·12 = 144, 3 digits + EOS


# ---------------------------------------------------------------------------------- rewards

P = "17+25="
NEG = "3-17="
CASES = [  # prompt, completion, format, correctness
    (P, "42", 1.0, 1.0),
    (P, " 42 ", 1.0, 1.0),  # surrounding whitespace is ignored
    (P, "43", 1.0, 0.0),  # a wrong number is still well formed
    (P, "042", 1.0, 0.0),  # digits, but not the canonical answer
    (P, "+42", 0.0, 0.0),
    (P, "-42", 1.0, 0.0),
    (NEG, "-14", 1.0, 1.0),  # negative answer
    (NEG, "14", 1.0, 0.0),
    (NEG, "--14", 0.0, 0.0),
    (NEG, "1-4", 0.0, 0.0),  # a minus inside
    (P, "", 0.0, 0.0),  # empty
    (P, "-", 0.0, 0.0),
    (P, "42+", 0.0, 0.0),  # trailing garbage
    (P, "42=42", 0.0, 0.0),
    (P, "4 2", 0.0, 0.0),
    (P, "42<eos>", 1.0, 1.0),  # decoded with special tokens: cut at EOS
    (P, "42<eos>17", 1.0, 1.0),  # anything after EOS is not generated text
    (P, "<eos>42", 0.0, 0.0),
    (P, "forty-two", 0.0, 0.0),
]


@pytest.mark.parametrize("prompt, completion, fmt, correct", CASES)
def test_rewards_by_hand(prompt, completion, fmt, correct):
    assert format_reward([prompt], [completion]) == [fmt]
    assert correctness_reward([prompt], [completion]) == [correct]
    # correctness + 0.1 · format, as float32 values.
    assert reward([prompt], [completion]) == [float(np.float32(correct + 0.1 * fmt))]


def test_rewards_of_a_batch_and_unfinished_completions(task):
    prompts = [P, P, NEG, P]
    completions = ["42", "41", "-14", "x"]
    values = reward(prompts, completions)
    assert isinstance(values, list) and all(isinstance(v, float) for v in values)
    np.testing.assert_allclose(values, [1.1, 0.1, 1.1, 0.0], rtol=1e-6)
    assert np.asarray(values, np.float32).dtype == np.float32
    # A completion cut off before EOS earns nothing.
    finished = [True, True, False, True]
    assert correctness_reward(prompts, completions, finished=finished) == [1.0, 0.0, 0.0, 0.0]
    assert format_reward(prompts, completions, finished=finished) == [1.0, 1.0, 0.0, 0.0]
    assert task.accuracy(prompts, completions) == 0.5
    assert task.accuracy(prompts, completions, finished=finished) == 0.25
    assert task.reward(prompts, completions) == values
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        reward([P, P], ["42"])


# ---------------------------------------------------------------------------------- tokenizer


def test_tokenizer_by_hand_and_round_trip(task, tmp_path):
    tok = task.tokenizer
    # <pad> 0, <bos> 1, <eos> 2, <unk> 3, "0"…"9" 4…13, "+" 14, "-" 15, "*" 16, "=" 17.
    assert task.vocab_size == 18
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert task.pad_token_id == 0 and task.eos_token_id == 2
    assert tok.encode("17+25=", add_special_tokens=False) == [5, 11, 14, 6, 9, 17]
    assert tok.encode("-14<eos>", add_special_tokens=False) == [15, 5, 8, 2]
    assert tok.encode("1 a", add_special_tokens=False) == [5, 3, 3]  # one <unk> per character
    for text in ("17+25=42", "3-17=-14", "7*8=56", "0"):
        ids = tok.encode(text, add_special_tokens=False)
        assert len(ids) == len(text) and tok.decode(ids) == text
    assert tok.decode([0, 0, 5, 11, 2], skip_special_tokens=True) == "17"
    # Saved next to a model, it loads back with AutoTokenizer (what the CLI does).
    from transformers import AutoTokenizer

    char_tokenizer(path=tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded.padding_side == "left" and loaded.pad_token_id == 0 and loaded.eos_token_id == 2
    assert loaded.encode("17+25=", add_special_tokens=False) == [5, 11, 14, 6, 9, 17]
    assert loaded.decode([5, 11, 14, 6, 9, 17, 2], skip_special_tokens=True) == "17+25="


# ---------------------------------------------------------------------------------- batches


def test_prompt_batch_is_left_padded(task):
    prompts = ["1+2=", "17+25=", "99-9="]
    ids, mask, cut = task.prompt_batch(prompts)
    assert ids.shape == mask.shape == (3, 6) and cut == 0
    np.testing.assert_array_equal(ids[0], [0, 0, 5, 14, 6, 17])  # "1+2=" after two pads
    np.testing.assert_array_equal(mask, [[0, 0, 1, 1, 1, 1], [1] * 6, [0, 1, 1, 1, 1, 1]])
    assert task.decode(ids, mask) == prompts
    # Default: every training prompt, at the one fixed width.
    assert task.prompt_batch().input_ids.shape == (300, 6)


def test_sft_batch_is_prompt_answer_eos(task):
    ids, mask, loss_mask, cut = task.sft_batch(["1+2=", "3-17="])
    assert ids.shape == mask.shape == loss_mask.shape == (2, 6 + 4) and cut == 0
    # [pad pad 1 + 2 =] [3 <eos> pad pad]: the prompt left-padded to P = 6, answer + EOS to R = 4.
    np.testing.assert_array_equal(ids[0], [0, 0, 5, 14, 6, 17, 7, 2, 0, 0])
    np.testing.assert_array_equal(mask[0], [0, 0, 1, 1, 1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(loss_mask[0], [0, 0, 0, 0, 0, 0, 1, 1, 0, 0])
    # [pad 3 - 1 7 =] [- 1 4 <eos>]
    np.testing.assert_array_equal(ids[1], [0, 4 + 3, 15, 5, 11, 17, 15, 5, 8, 2])
    np.testing.assert_array_equal(loss_mask[1], [0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
    assert task.decode(ids, mask) == ["1+2=3", "3-17=-14"]
    # Default: every training example; the loss counts the answer and its EOS only.
    full = task.sft_batch()
    assert full.input_ids.shape == (300, 10)
    answers = [answer(p) for p in task.train_prompts]
    np.testing.assert_array_equal(full.loss_mask.sum(1), [len(a) + 1 for a in answers])
    assert task.decode(full.input_ids * full.loss_mask, full.loss_mask) == answers
    # Other completions (e.g. noisy ones) are accepted as given.
    assert task.decode(*task.sft_batch(["1+2="], ["5"])[:2]) == ["1+2=5"]


def test_decode_and_finished_of_a_rollout(task):
    tokens = np.array([[8, 6, 2, 0], [15, 5, 8, 2], [4, 4, 4, 4]])  # "42", "-14", "0000" (no EOS)
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1]])
    texts = task.decode(tokens, mask)
    assert texts == ["42", "-14", "0000"]
    finished = task.finished(tokens, mask)
    np.testing.assert_array_equal(finished, [True, True, False])
    prompts = ["17+25=", "3-17=", "0+0="]
    assert task.correctness_reward(prompts, texts, finished=finished) == [1.0, 1.0, 0.0]


def test_write_data_files(task, tmp_path):
    paths = task.write_data_files(str(tmp_path))
    with open(paths["sft"]) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 300 and rows[0] == {
        "prompt": task.train_prompts[0],
        "completion": answer(task.train_prompts[0]),
    }
    with open(paths["eval_prompts"]) as f:
        assert [json.loads(line)["prompt"] for line in f] == list(task.eval_prompts)


# ---------------------------------------------------------------------------------- warm-up


def test_signed_answers_sign_only_non_negative_answers():
    prompts = [f"{a}+{b}=" for a in range(10) for b in range(10)] + ["3-17=", "0-0="]
    assert signed_answers(prompts, 0.0) == [answer(p) for p in prompts]
    assert signed_answers(prompts, 1.0)[:3] == ["+0", "+1", "+2"]
    assert signed_answers(prompts, 1.0)[-2:] == ["-14", "+0"]  # negatives keep their one sign
    half = signed_answers(prompts, 0.5, seed=3)
    signed = [a.startswith("+") for a in half]
    assert 35 <= sum(signed) <= 65 and half == signed_answers(prompts, 0.5, seed=3)  # seeded
    assert [a.lstrip("+") for a in half] == [answer(p) for p in prompts]  # same numbers
    assert reward(["40+2="], ["+42"]) == [0.0]  # the habit earns nothing
    with pytest.raises(ValueError, match="plus_sign_rate"):
        signed_answers(prompts, 1.5)


def test_short_sft_raises_held_out_accuracy(tmp_path):
    # Operands 0…19: 800 problems, small enough to learn in a few hundred steps on CPU.
    task = build_arithmetic_task(0, num_train=600, num_eval=200, max_operand=19)
    width = task.max_prompt_length + task.max_new_tokens
    config = tiny_model_config(task.vocab_size, max_position_embeddings=max(16, width))
    before = task.evaluate(CausalLM(config, rngs=nnx.Rngs(0)))  # what sft_policy starts from
    policy = sft_policy(task, steps=300)
    after = task.evaluate(policy)  # measured: 0 → 0.6 (seed 0)
    assert before < 0.05
    assert before + 0.25 < after < 0.95, after  # learnt much, and still below the ceiling
    # The same, through sample() and the reward functions on decoded texts.
    save_pretrained(policy, tmp_path / "policy", tokenizer=task.tokenizer)
    reloaded = from_pretrained(str(tmp_path / "policy"))
    assert task.evaluate(reloaded) == after
