"""Preference / prompt data: loading every format, validation errors, chat rendering, padding."""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
from data_utils import CHAT_ROWS, TEXT_ROWS, tokenizer, write

from jaxrlhf.data import (
    DataConfig,
    DataError,
    iterate_batches,
    load_dataset_file,
    load_preference_dataset,
    load_prompt_dataset,
    padded_length,
    render_chat,
    tokenize_pairs,
    tokenize_prompts,
    validate_examples,
)
from jaxrlhf.data.preference import render_prompt, render_response

# ------------------------------------------------------------------------------------ loading


@pytest.mark.parametrize("fmt", ["json", "jsonl", "parquet", "csv", "disk", "disk_dict"])
def test_load_text_preferences_every_format(tmp_path, fmt):
    path = write(TEXT_ROWS, str(tmp_path), fmt)
    lines = []
    data = load_preference_dataset(path, report=lines.append)
    assert data.train == TEXT_ROWS and data.eval is None
    assert not data.format.implicit and data.format.kind == "text"
    assert lines == [
        f"{path}: explicit-prompt format (text): columns 'prompt', 'chosen', 'rejected'; 3 pairs"
    ]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "disk"])
def test_load_chat_preferences(tmp_path, fmt):
    path = write(CHAT_ROWS, str(tmp_path), fmt)
    data = load_preference_dataset(path)
    assert len(data.train) == 2 and data.format.kind == "chat"
    assert data.train[1]["prompt"][2] == {"role": "user", "content": "and the room ?"}


def test_load_prompt_dataset_ignores_other_columns(tmp_path):
    path = write([{"prompt": "the food was", "id": 3}], str(tmp_path), "jsonl")
    assert load_prompt_dataset(path) == [{"prompt": "the food was"}]


def test_missing_file_unsupported_type_and_bad_directory_name_the_path(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        load_dataset_file(tmp_path / "nope.jsonl")
    bad = tmp_path / "data.xyz"
    bad.write_text("x")
    with pytest.raises(DataError, match=r"data.xyz: unsupported file type '.xyz'"):
        load_dataset_file(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=f"{tmp_path / 'empty'}: not a dataset directory"):
        load_dataset_file(tmp_path / "empty")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(DataError, match="broken.json: could not be read as json"):
        load_dataset_file(broken)


def test_saved_dataset_dict_without_the_split(tmp_path):
    path = write(TEXT_ROWS, str(tmp_path), "disk_dict")
    with pytest.raises(DataError, match=r"no split 'test' \(has \['train'\]"):
        load_dataset_file(path, split="test")


# --------------------------------------------------------------------------------- validation


def test_missing_column_names_file_and_column(tmp_path):
    rows = [{"prompt": r["prompt"], "chosen": r["chosen"]} for r in TEXT_ROWS]
    path = write(rows, str(tmp_path), "jsonl")
    with pytest.raises(DataError, match=r"data.jsonl: missing column\(s\) \['rejected'\]"):
        load_preference_dataset(path)


@pytest.mark.parametrize(
    "column, value, message",
    [
        ("chosen", "   ", "empty text"),
        ("rejected", "", "empty text"),
        ("prompt", 7, "expected a non-empty string or a list of"),
        ("chosen", None, "expected a non-empty string or a list of"),
    ],
)
def test_bad_text_field_names_row_and_column(tmp_path, column, value, message):
    rows = copy.deepcopy(TEXT_ROWS)
    rows[2][column] = value
    path = os.path.join(tmp_path, "prefs.jsonl")
    with open(path, "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DataError, match=rf"prefs.jsonl: row 2, column '{column}': {message}"):
        load_preference_dataset(path)


def test_bad_chat_messages_name_row_column_and_message():
    rows = copy.deepcopy(CHAT_ROWS)
    rows[1]["chosen"] = [{"role": "assistant"}]
    with pytest.raises(DataError, match=r"src: row 1, column 'chosen': message 0 must be a dict"):
        validate_examples(rows, ("prompt", "chosen", "rejected"), source="src")
    rows = copy.deepcopy(CHAT_ROWS)
    rows[0]["prompt"][0]["content"] = ""
    with pytest.raises(DataError, match=r"row 0, column 'prompt': message 0 has an empty"):
        validate_examples(rows, ("prompt", "chosen", "rejected"))
    rows = copy.deepcopy(CHAT_ROWS)
    rows[1]["rejected"] = []
    with pytest.raises(DataError, match=r"row 1, column 'rejected': empty message list"):
        validate_examples(rows, ("prompt", "chosen", "rejected"))


def test_mixing_text_and_chat_is_an_error():
    rows = [copy.deepcopy(TEXT_ROWS[0]), copy.deepcopy(CHAT_ROWS[0])]
    with pytest.raises(DataError, match=r"row 1, column 'prompt': is chat but earlier fields are"):
        validate_examples(rows, ("prompt", "chosen", "rejected"))


def test_no_rows_is_an_error():
    with pytest.raises(DataError, match="empty.jsonl: no rows"):
        validate_examples([], ("prompt",), source="empty.jsonl")


def test_data_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"DataConfig.max_prompt_length = 0: must be >= 1"):
        DataConfig(max_prompt_length=0)
    with pytest.raises(ValueError, match=r"DataConfig.max_response_length = 1"):
        DataConfig(max_response_length=1)


# ------------------------------------------------------------------------------- chat rendering


def test_builtin_chat_template():
    messages = CHAT_ROWS[1]["prompt"]
    expected = (
        "user: how was the staff ?\n"
        "assistant: the staff was nice .\n"
        "user: and the room ?\n"
        "assistant:"
    )
    assert render_chat(messages, add_generation_prompt=True) == expected
    assert render_chat(messages) == expected[: -len("assistant:")]
    row = CHAT_ROWS[0]
    assert render_prompt(row["prompt"]) == "user: how was the food ?\nassistant:"
    assert render_response(row["prompt"], row["chosen"]) == " the food was great .\n"


def test_tokenizer_chat_template_is_used_when_present():
    tok = copy.deepcopy(tokenizer())
    tok.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    row = CHAT_ROWS[0]
    assert render_prompt(row["prompt"], tok) == "[user]how was the food ?[assistant]"
    assert render_response(row["prompt"], row["chosen"], tok) == "the food was great ."


def test_template_that_does_not_extend_the_prompt_is_an_error():
    tok = copy.deepcopy(tokenizer())
    tok.chat_template = (
        "{% for m in messages %}{{ m['content'] }}|{% endfor %}"
        "{% if add_generation_prompt %}>>{% endif %}"
    )
    row = CHAT_ROWS[0]
    with pytest.raises(DataError, match="prefs: row 0, column 'chosen': the chat template"):
        tokenize_pairs([row], tok, DataConfig(), source="prefs")


def test_text_fields_pass_through_unchanged():
    assert render_prompt("the food was") == "the food was"
    assert render_response("the food was", " great .") == " great ."


# ----------------------------------------------------------------------------------- batching


def _ids(text):
    return tokenizer().encode(text, add_special_tokens=False)


def test_every_grammar_word_is_one_token():
    for word in ("the", " food", " was", " great", " .", " very", " nice", " rude"):
        assert len(_ids(word)) == 1, word


def test_prompts_are_left_padded_to_the_longest_rounded_up_to_8():
    tok = tokenizer()
    pad = tok.pad_token_id
    prompts = {"prompt": ["the food was", "the food was great and the staff was"]}  # 3, 8 tokens
    batch = tokenize_prompts(prompts, tok, DataConfig(max_prompt_length=32))
    the, food, was = _ids("the") + _ids(" food") + _ids(" was")
    assert batch.input_ids.shape == batch.attention_mask.shape == (2, 8)
    assert batch.input_ids.dtype == np.int32
    np.testing.assert_array_equal(batch.input_ids[0], [pad] * 5 + [the, food, was])
    np.testing.assert_array_equal(batch.attention_mask[0], [0] * 5 + [1] * 3)
    np.testing.assert_array_equal(batch.attention_mask[1], [1] * 8)
    assert batch.num_truncated == 0
    # three-token prompts: 8 positions, not max_prompt_length = 32
    assert tokenize_prompts({"prompt": ["the food was"]}, tok, DataConfig()).input_ids.shape == (
        1,
        8,
    )
    # capped by max_prompt_length (9 tokens would round up to 16)
    nine = {"prompt": ["the food was great and the staff was nice"]}
    assert tokenize_prompts(nine, tok, DataConfig(max_prompt_length=10)).input_ids.shape == (1, 10)


def test_max_length_padding_pads_to_the_limit():
    tok = tokenizer()
    config = DataConfig(max_prompt_length=10, max_response_length=6, padding="max_length")
    batch = tokenize_prompts({"prompt": ["the food was"]}, tok, config)
    np.testing.assert_array_equal(batch.attention_mask[0], [0] * 7 + [1] * 3)
    assert tokenize_pairs(TEXT_ROWS, tok, config).chosen_ids.shape == (3, 16)


@pytest.mark.parametrize(
    "longest, limit, expected", [(1, 32, 8), (3, 32, 8), (8, 32, 8), (9, 32, 16), (30, 20, 20)]
)
def test_padded_length_rounds_up_to_a_multiple_of_8_within_the_limit(longest, limit, expected):
    assert padded_length(longest, limit, "longest") == expected
    assert padded_length(longest, limit, "max_length") == limit


def test_pairs_are_prompt_left_padded_then_response_plus_eos_right_padded():
    tok = tokenizer()
    pad, eos = tok.pad_token_id, tok.eos_token_id
    batch = tokenize_pairs(
        TEXT_ROWS[:2], tok, DataConfig(max_prompt_length=4, max_response_length=5)
    )
    the, food, staff, was = (_ids(w)[0] for w in ("the", " food", " staff", " was"))
    great, very, nice, rude, stop = (
        _ids(w)[0] for w in (" great", " very", " nice", " rude", " .")
    )
    bad = _ids(" bad")[0]
    for a in batch[:4]:
        assert a.shape == (2, 9) and a.dtype == np.int32
    np.testing.assert_array_equal(
        batch.chosen_ids, [[pad, the, food, was, great, stop, eos, pad, pad],
                           [pad, the, staff, was, very, nice, stop, eos, pad]]
    )  # fmt: skip
    np.testing.assert_array_equal(
        batch.rejected_ids, [[pad, the, food, was, bad, stop, eos, pad, pad],
                             [pad, the, staff, was, rude, stop, eos, pad, pad]]
    )  # fmt: skip
    np.testing.assert_array_equal(batch.chosen_mask[1], [0, 1, 1, 1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(batch.rejected_mask[0], [0, 1, 1, 1, 1, 1, 1, 0, 0])


def test_chat_pairs_tokenise_to_the_rendered_conversation():
    tok = tokenizer()
    batch = tokenize_pairs(CHAT_ROWS, tok, DataConfig(max_prompt_length=40, max_response_length=12))
    row = batch.chosen_ids[1][batch.chosen_mask[1] > 0]
    expected = render_chat(CHAT_ROWS[1]["prompt"] + CHAT_ROWS[1]["chosen"])
    assert row[-1] == tok.eos_token_id
    assert tok.decode(row[:-1]) == expected


def test_over_long_fields_raise_with_row_and_column():
    tok = tokenizer()
    config = DataConfig(max_prompt_length=3, max_response_length=3)
    with pytest.raises(DataError, match=r"prefs: row 1, column 'chosen': 3 tokens > max_response"):
        tokenize_pairs(TEXT_ROWS, tok, config, source="prefs")  # " very nice ." + EOS = 4 > 3
    with pytest.raises(DataError, match=r"row 0, column 'prompt': 4 tokens > max_prompt_length=3"):
        tokenize_prompts({"prompt": ["the food was great"]}, tok, config)


def test_truncation_keeps_prompt_end_and_response_start_and_counts():
    tok = tokenizer()
    config = DataConfig(max_prompt_length=2, max_response_length=3, truncate=True)
    batch = tokenize_pairs(TEXT_ROWS[:2], tok, config)
    # prompts "the food was" / "the staff was": 3 tokens → 2 (2 cuts); response " very nice ."
    # 3 tokens → 2 + EOS (1 cut); the other responses fit.
    assert batch.num_truncated == 3
    food, staff, was, very, nice = (
        _ids(w)[0] for w in (" food", " staff", " was", " very", " nice")
    )
    np.testing.assert_array_equal(batch.chosen_ids[0][:2], [food, was])
    np.testing.assert_array_equal(batch.chosen_ids[1], [staff, was, very, nice, tok.eos_token_id])
    prompts = tokenize_prompts({"prompt": ["the food was"]}, tok, config)
    assert prompts.num_truncated == 1
    np.testing.assert_array_equal(prompts.input_ids[0], [food, was])


def test_iterate_batches_is_one_shuffled_epoch():
    x = np.arange(10)
    batches = list(iterate_batches({"x": x, "y": 2 * x}, 3, np.random.default_rng(0)))
    assert len(batches) == 3  # 10 // 3, the last partial batch dropped
    seen = np.concatenate([b["x"] for b in batches])
    assert len(set(seen)) == 9 and not np.array_equal(seen, np.arange(9))
    for b in batches:
        np.testing.assert_array_equal(b["y"], 2 * b["x"])
    in_order = list(iterate_batches((x,), 4, None, drop_last=False))
    assert [len(b[0]) for b in in_order] == [4, 4, 2]
