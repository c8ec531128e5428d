"""SFT data in its three formats (text, prompt/completion, messages): loaded, rendered and tokenised to
exactly the expected token spans, with the loss mask starting where the completion / assistant turn
starts."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from data_utils import tokenizer, write

from jaxrlhf.data import DataConfig, DataError, load_sft_dataset, sft_rows, tokenize_sft
from jaxrlhf.data.sft import chat_segments

TEXT = [
    {"text": "the food was great ."},
    {"text": "the staff was very nice and the room was lovely ."},
]
COMPLETIONS = [
    {"prompt": "the food was", "completion": " great ."},
    {"prompt": "the staff was very", "completion": " nice and the room was lovely ."},
]
CHATS = [
    {
        "messages": [
            {"role": "user", "content": "how was the staff ?"},
            {"role": "assistant", "content": "the staff was nice ."},
            {"role": "user", "content": "and the room ?"},
            {"role": "assistant", "content": "the room was lovely ."},
        ]
    },
    {
        "messages": [
            {"role": "system", "content": "be brief ."},
            {"role": "user", "content": "how was the food ?"},
            {"role": "assistant", "content": "great ."},
        ]
    },
]


def _ids(text):
    return tokenizer().encode(text, add_special_tokens=False)


def _check_row(batch, i, pieces, eos):
    """Row i is the concatenation of (text, counted) pieces + EOS, right-padded; the loss mask is 1
    exactly on the counted pieces and the EOS."""
    ids, flags = [], []
    for text, counted in pieces:
        ids += _ids(text)
        flags += [int(counted)] * len(_ids(text))
    ids, flags = ids + [eos], flags + [1]
    n, T = len(ids), batch.input_ids.shape[1]
    assert batch.input_ids[i, :n].tolist() == ids
    np.testing.assert_array_equal(batch.attention_mask[i], [1] * n + [0] * (T - n))
    np.testing.assert_array_equal(batch.loss_mask[i], flags + [0] * (T - n))
    return ids, flags


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_text_format_counts_every_token(tmp_path, fmt):
    path = write(TEXT, str(tmp_path), fmt)
    lines = []
    data = load_sft_dataset(path, report=lines.append)
    assert data.format == "text" and data.train == TEXT and data.eval is None
    assert lines == [
        (
            f"{path}: SFT text format (loss on every token unless --no-sft-completion-only-loss); "
            "2 examples"
        )
    ]
    tok = tokenizer()
    batch = tokenize_sft(data.train, tok, DataConfig())
    assert batch.input_ids.shape == (2, 16)  # 11 tokens + EOS, rounded up to a multiple of 8
    _check_row(batch, 0, [(TEXT[0]["text"], True)], tok.eos_token_id)
    _check_row(batch, 1, [(TEXT[1]["text"], True)], tok.eos_token_id)


def test_prompt_completion_counts_only_the_completion(tmp_path):
    path = write(COMPLETIONS, str(tmp_path), "jsonl")
    data = load_sft_dataset(path)
    assert data.format == "prompt-completion"
    tok = tokenizer()
    batch = tokenize_sft(data.train, tok, DataConfig())
    for i, row in enumerate(COMPLETIONS):
        _check_row(batch, i, [(row["prompt"], False), (row["completion"], True)], tok.eos_token_id)
    # the loss mask starts at the first completion token: position len(prompt) = 3 and 4
    assert [int(np.argmax(m)) for m in batch.loss_mask] == [3, 4]
    # completion_only_loss=False counts every real token
    everything = tokenize_sft(data.train, tok, DataConfig(), completion_only_loss=False)
    np.testing.assert_array_equal(everything.loss_mask, batch.attention_mask)


def test_messages_count_only_the_assistant_turns(tmp_path):
    path = write(CHATS, str(tmp_path), "jsonl")
    data = load_sft_dataset(path)
    assert data.format == "messages"
    tok = tokenizer()
    batch = tokenize_sft(data.train, tok, DataConfig())
    # the built-in template, turn by turn: what it adds for each assistant turn is counted
    _check_row(
        batch,
        0,
        [
            ("user: how was the staff ?\nassistant:", False),
            (" the staff was nice .\n", True),
            ("user: and the room ?\nassistant:", False),
            (" the room was lovely .\n", True),
        ],
        tok.eos_token_id,
    )
    ids, _ = _check_row(
        batch,
        1,
        [("system: be brief .\nuser: how was the food ?\nassistant:", False), (" great .\n", True)],
        tok.eos_token_id,
    )
    start = len(_ids("system: be brief .\nuser: how was the food ?\nassistant:"))
    assert int(np.argmax(batch.loss_mask[1])) == start
    assert tok.decode(ids[:-1]) == (
        "system: be brief .\nuser: how was the food ?\nassistant: great .\n"
    )


def test_chat_segments_follow_the_tokenizers_template():
    tok = copy.deepcopy(tokenizer())
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    assert chat_segments(CHATS[1]["messages"], tok) == [
        ("<system>be brief .</s><user>how was the food ?</s><assistant>", False),
        ("great .</s>", True),
    ]
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}|{% endfor %}"
    tok.chat_template += "{% if add_generation_prompt %}>>{% endif %}"
    with pytest.raises(DataError, match="row 0, 'messages': the chat template does not render"):
        tokenize_sft(CHATS[:1], tok, DataConfig(), source="chats")


def test_renamed_sft_columns(tmp_path):
    rows = [{"question": r["prompt"], "answer": r["completion"]} for r in COMPLETIONS]
    path = write(rows, str(tmp_path), "jsonl")
    with pytest.raises(DataError, match=r"found columns \['question', 'answer'\], but SFT data"):
        load_sft_dataset(path)
    config = DataConfig(prompt_column="question", completion_column="answer")
    assert load_sft_dataset(path, config).train == COMPLETIONS
    dialogues = [{"conversation": c["messages"]} for c in CHATS]
    rows, fmt = sft_rows(dialogues, DataConfig(messages_column="conversation"))
    assert fmt == "messages" and rows == CHATS


def test_bad_sft_rows_name_row_and_column(tmp_path):
    rows = copy.deepcopy(COMPLETIONS)
    rows[1]["completion"] = "  "
    with pytest.raises(DataError, match=r"data.jsonl: row 1, column 'completion': empty text"):
        load_sft_dataset(write(rows, str(tmp_path), "jsonl"))
    chats = copy.deepcopy(CHATS)
    chats[1]["messages"][2]["content"] = ""
    with pytest.raises(DataError, match=r"row 1, column 'messages': message 2 has an empty"):
        load_sft_dataset(write(chats, str(tmp_path), "jsonl"))
    with pytest.raises(DataError, match=r"row 0, column 'text': expected a string, got chat"):
        sft_rows([{"text": CHATS[0]["messages"]}])


def test_sft_lengths_name_the_flags_or_truncate():
    tok = tokenizer()
    small = DataConfig(max_prompt_length=4, max_response_length=4)  # a text fits in 8 tokens
    with pytest.raises(
        DataError,
        match=r"row 1: 11 tokens > max_prompt_length \+ max_response_length = 8 - 1 \(room for "
        r"EOS\) \(raise --data-max-prompt-length and --data-max-response-length, or cut it "
        r"with --data-truncate\)",
    ):
        tokenize_sft(TEXT, tok, small)
    cut = tokenize_sft(
        TEXT, tok, DataConfig(max_prompt_length=4, max_response_length=4, truncate=True)
    )
    assert cut.num_truncated == 1 and cut.input_ids.shape == (2, 8)
    assert cut.input_ids[1].tolist() == _ids(TEXT[1]["text"])[:7] + [tok.eos_token_id]
    with pytest.raises(DataError, match=r"row 1, column 'prompt': 4 tokens > max_prompt_length=3"):
        tokenize_sft(COMPLETIONS, tok, DataConfig(max_prompt_length=3))
