"""The preference formats people have (HH-RLHF transcripts, UltraFeedback message lists with scores,
renamed columns), splits, and Hub names resolved offline: loaded, rendered and tokenised to exactly
the expected prompt / response token spans."""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
from data_utils import TEXT_ROWS, tokenizer, write

from jaxrlhf.data import (
    DataConfig,
    DataError,
    load_preference_dataset,
    load_prompt_dataset,
    load_splits,
    split_shared_prompt,
    tokenize_pairs,
    tokenize_prompts,
)

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"

# Anthropic HH-RLHF: only chosen / rejected, each a whole transcript.
HH_ROWS = [
    {
        "chosen": f"{HUMAN} how was the food ?{ASSISTANT} the food was great .",
        "rejected": f"{HUMAN} how was the food ?{ASSISTANT} the food was bad .",
    },
    {
        "chosen": f"{HUMAN} how was the staff ?{ASSISTANT} the staff was nice .{HUMAN} and the "
        f"room ?{ASSISTANT} the room was lovely .",
        "rejected": f"{HUMAN} how was the staff ?{ASSISTANT} the staff was nice .{HUMAN} and the "
        f"room ?{ASSISTANT} very dirty .",
    },
]


def _chat(question, answer):
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


# UltraFeedback-binarized: a text prompt, chosen / rejected message lists repeating the user turn,
# scores (the second pair ties and is dropped).
UF_ROWS = [
    {
        "prompt": "how was the food ?",
        "prompt_id": "p0",
        "chosen": _chat("how was the food ?", "the food was great ."),
        "rejected": _chat("how was the food ?", "the food was bad ."),
        "messages": _chat("how was the food ?", "the food was great ."),
        "score_chosen": 8.0,
        "score_rejected": 3.5,
    },
    {
        "prompt": "how was the room ?",
        "prompt_id": "p1",
        "chosen": _chat("how was the room ?", "the room was lovely ."),
        "rejected": _chat("how was the room ?", "the room was dirty ."),
        "messages": _chat("how was the room ?", "the room was lovely ."),
        "score_chosen": 5.0,
        "score_rejected": 5.0,
    },
    {
        "prompt": "how was the staff ?",
        "prompt_id": "p2",
        "chosen": _chat("how was the staff ?", "the staff was nice ."),
        "rejected": _chat("how was the staff ?", "the staff was rude ."),
        "messages": _chat("how was the staff ?", "the staff was nice ."),
        "score_chosen": 9.0,
        "score_rejected": 2.0,
    },
]


def _ids(text):
    return tokenizer().encode(text, add_special_tokens=False)


def _real(ids, mask):
    return [int(t) for t, m in zip(ids, mask) if m]


# ------------------------------------------------------------------------------ HH-RLHF (text)


def test_hh_transcripts_take_the_prompt_up_to_the_last_shared_assistant_turn(tmp_path):
    path = write(HH_ROWS, str(tmp_path), "jsonl")
    lines = []
    data = load_preference_dataset(path, report=lines.append)
    assert data.format.implicit and data.format.kind == "text" and not data.format.scored
    assert lines == [
        (
            f"{path}: implicit-prompt format (text): prompt taken as the shared prefix of "
            "'chosen' and 'rejected', up to the last '\\n\\nAssistant:'; 2 pairs"
        )
    ]
    # The shared prefix of row 0 runs into the response (" the food was "); it is cut back to the
    # last "\n\nAssistant:", inclusive.
    assert data.train[0] == {
        "prompt": f"{HUMAN} how was the food ?{ASSISTANT}",
        "chosen": " the food was great .",
        "rejected": " the food was bad .",
    }
    assert data.train[1]["prompt"] == (
        f"{HUMAN} how was the staff ?{ASSISTANT} the staff was nice .{HUMAN} and the room ?"
        f"{ASSISTANT}"
    )
    assert data.train[1]["chosen"] == " the room was lovely ."
    assert data.train[1]["rejected"] == " very dirty ."
    # Tokenised: [pad…, prompt tokens, response tokens, EOS, pad…] with exactly these spans.
    tok = tokenizer()
    pad, eos = tok.pad_token_id, tok.eos_token_id
    pairs = tokenize_pairs(data.train, tok, DataConfig(max_prompt_length=64))
    prompt_0, prompt_1 = _ids(data.train[0]["prompt"]), _ids(data.train[1]["prompt"])
    P = -(-max(len(prompt_0), len(prompt_1)) // 8) * 8
    assert pairs.chosen_ids.shape == (2, P + 8)
    expected = [pad] * (P - len(prompt_0)) + prompt_0 + _ids(" the food was great .") + [eos]
    assert pairs.chosen_ids[0].tolist()[: len(expected)] == expected
    np.testing.assert_array_equal(pairs.chosen_mask[0][: P - len(prompt_0)], 0)
    assert _real(pairs.rejected_ids[1], pairs.rejected_mask[1]) == (
        prompt_1 + _ids(" very dirty .") + [eos]
    )
    assert pairs.chosen_ids[1, P - len(prompt_1) : P].tolist() == prompt_1


def test_split_shared_prompt_errors_name_the_row():
    with pytest.raises(DataError, match="row 4: chosen and rejected are identical"):
        split_shared_prompt(HH_ROWS[0]["chosen"], HH_ROWS[0]["chosen"], where="row 4")
    with pytest.raises(DataError, match=r"row 2: chosen and rejected share no prompt ending in"):
        split_shared_prompt("the food was great .", "the food was bad .", where="row 2")
    with pytest.raises(
        DataError, match="row 1: chosen and rejected share no leading non-assistant"
    ):
        split_shared_prompt(
            [{"role": "assistant", "content": "a"}],
            [{"role": "assistant", "content": "b"}],
            where="row 1",
        )


def test_hh_file_with_a_bad_pair_names_file_and_row(tmp_path):
    rows = copy.deepcopy(HH_ROWS)
    rows[1]["rejected"] = rows[1]["chosen"]
    path = write(rows, str(tmp_path), "jsonl")
    with pytest.raises(DataError, match=r"data.jsonl: row 1: chosen and rejected are identical"):
        load_preference_dataset(path)
    rows[1] = {"chosen": "the food was great .", "rejected": "the food was bad ."}
    path = write(rows, str(tmp_path), "jsonl")
    with pytest.raises(DataError, match=r"data.jsonl: row 1: chosen and rejected share no prompt"):
        load_preference_dataset(path)
    # a transcript whose response after the prompt is empty
    rows[1] = {"chosen": f"{HUMAN} hi ?{ASSISTANT}", "rejected": f"{HUMAN} hi ?{ASSISTANT} hello"}
    path = write(rows, str(tmp_path), "jsonl")
    with pytest.raises(DataError, match=r"row 1, column 'chosen' \(after the prompt\): empty text"):
        load_preference_dataset(path)


# ----------------------------------------------------------------- UltraFeedback (chat, scored)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_ultrafeedback_message_lists_with_scores(tmp_path, fmt):
    path = write(UF_ROWS, str(tmp_path), fmt)
    lines = []
    data = load_preference_dataset(path, report=lines.append)
    assert data.format.implicit and data.format.kind == "chat" and data.format.scored
    assert lines == [
        (
            f"{path}: implicit-prompt format (chat): prompt taken as the shared leading messages "
            "of 'chosen' and 'rejected' (the text column 'prompt' is not used); scored "
            "(score_chosen, score_rejected); 1 pair with equal scores dropped; 2 pairs"
        )
    ]
    assert [r["score_chosen"] - r["score_rejected"] for r in data.train] == [4.5, 7.0]
    assert data.train[1] == {
        "prompt": [{"role": "user", "content": "how was the staff ?"}],
        "chosen": [{"role": "assistant", "content": "the staff was nice ."}],
        "rejected": [{"role": "assistant", "content": "the staff was rude ."}],
        "score_chosen": 9.0,
        "score_rejected": 2.0,
    }
    # Rendered with the built-in template: "user: …\nassistant:" then " …\n" + EOS.
    tok = tokenizer()
    eos = tok.eos_token_id
    pairs = tokenize_pairs(data.train, tok, DataConfig())
    prompt = _ids("user: how was the staff ?\nassistant:")
    assert _real(pairs.chosen_ids[1], pairs.chosen_mask[1]) == (
        prompt + _ids(" the staff was nice .\n") + [eos]
    )
    assert _real(pairs.rejected_ids[1], pairs.rejected_mask[1]) == (
        prompt + _ids(" the staff was rude .\n") + [eos]
    )
    P = pairs.chosen_ids.shape[1] - 8  # responses: ≤ 8 tokens with EOS
    assert pairs.chosen_ids[1, P - len(prompt) : P].tolist() == prompt
    # PPO prompts from the same file: the chat prompts (ties kept), not the text column.
    prompts = load_prompt_dataset(path)
    assert prompts[1] == {"prompt": [{"role": "user", "content": "how was the room ?"}]}
    batch = tokenize_prompts(prompts, tok, DataConfig())
    assert _real(batch.input_ids[2], batch.attention_mask[2]) == prompt


def test_scores_that_contradict_the_labels_or_are_not_numbers_name_the_row(tmp_path):
    rows = copy.deepcopy(UF_ROWS)
    rows[2]["score_chosen"] = 1.0
    with pytest.raises(DataError, match=r"row 2: score_chosen 1.0 < score_rejected 2.0"):
        load_preference_dataset(write(rows, str(tmp_path), "jsonl"))
    rows = copy.deepcopy(UF_ROWS)
    rows[0]["score_rejected"] = None
    with pytest.raises(DataError, match=r"row 0, column 'score_rejected': expected a finite"):
        load_preference_dataset(write(rows, str(tmp_path), "jsonl"))


def test_explicit_chat_responses_that_repeat_the_prompt_are_stripped():
    from jaxrlhf.data import preference_rows

    row = {
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": _chat("hi", "hello ."),
        "rejected": _chat("hi", "go away ."),
    }
    rows, fmt, note = preference_rows([row])
    assert not fmt.implicit
    assert rows[0]["chosen"] == [{"role": "assistant", "content": "hello ."}]
    assert note == "responses repeating the prompt's messages stripped in 1 pair"


# --------------------------------------------------------------------------- renamed columns


def test_renamed_columns_are_mapped_and_missing_ones_name_the_flags(tmp_path):
    rows = [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in TEXT_ROWS]
    path = write(rows, str(tmp_path), "jsonl")
    with pytest.raises(DataError, match=r"missing column\(s\) \['chosen', 'rejected'\].*"):
        load_preference_dataset(path)
    try:
        load_preference_dataset(path)
    except DataError as e:
        assert "--data-chosen-column" in str(e) and "--data-prompt-column" in str(e)
    config = DataConfig(prompt_column="question", chosen_column="good", rejected_column="bad")
    lines = []
    data = load_preference_dataset(path, config, report=lines.append)
    assert data.train == TEXT_ROWS
    assert "explicit-prompt format (text): columns 'question', 'good', 'bad'; 3 pairs" in lines[0]
    pairs = tokenize_pairs(data.train, tokenizer(), DataConfig())
    eos = tokenizer().eos_token_id
    assert _real(pairs.chosen_ids[0], pairs.chosen_mask[0]) == (
        _ids("the food was") + _ids(" great .") + [eos]
    )
    # a bad field names the column as the file has it
    rows[1]["bad"] = ""
    path = write(rows, str(tmp_path), "jsonl")
    with pytest.raises(DataError, match=r"data.jsonl: row 1, column 'bad': empty text"):
        load_preference_dataset(path, config)
    # PPO prompts from a renamed column
    prompts_path = os.path.join(tmp_path, "prompts.jsonl")
    with open(prompts_path, "w") as f:
        f.write(json.dumps({"query": "the food was"}) + "\n")
    with pytest.raises(DataError, match=r"missing column 'prompt'.*--data-prompt-column"):
        load_prompt_dataset(prompts_path)
    assert load_prompt_dataset(prompts_path, DataConfig(prompt_column="query")) == [
        {"prompt": "the food was"}
    ]


# ----------------------------------------------------------------------- splits and Hub names


def _write_split_folder(folder, train_rows, test_rows):
    os.makedirs(folder, exist_ok=True)
    for name, rows in (("train", train_rows), ("test", test_rows)):
        with open(os.path.join(folder, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


def test_a_dataset_folder_uses_its_own_test_split(tmp_path):
    folder = tmp_path / "hh"
    _write_split_folder(folder, HH_ROWS, HH_ROWS[:1])
    lines = []
    data = load_preference_dataset(str(folder), report=lines.append)
    assert len(data.train) == 2 and len(data.eval) == 1
    assert data.eval[0]["prompt"] == f"{HUMAN} how was the food ?{ASSISTANT}"
    assert lines[0].endswith("; 2 pairs + 1 held out (split 'test')")
    # choosing splits; no held-out split
    train, held_out = load_splits(str(folder), DataConfig(split="test", eval_split=None))
    assert len(train) == 1 and held_out is None
    with pytest.raises(DataError, match=r"no split 'dev' \(has \['test', 'train'\]; choose one"):
        load_splits(str(folder), DataConfig(split="dev"))
    # a single file has one split
    with pytest.raises(DataError, match="a single file has one split"):
        load_splits(write(TEXT_ROWS, str(tmp_path), "jsonl"), DataConfig(split="test"))


def _hub_snapshot(cache, repo_type, repo_id, files):
    """A snapshot in the Hugging Face Hub cache layout, as `huggingface-cli download` leaves it."""
    root = os.path.join(cache, f"{repo_type}s--{repo_id.replace('/', '--')}")
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = os.path.join(root, "snapshots", commit)
    os.makedirs(os.path.join(root, "refs"), exist_ok=True)
    with open(os.path.join(root, "refs", "main"), "w") as f:
        f.write(commit)
    for name, write_file in files.items():
        os.makedirs(os.path.dirname(os.path.join(snapshot, name)), exist_ok=True)
        write_file(os.path.join(snapshot, name))
    return snapshot


def test_a_hub_dataset_name_resolves_offline_through_the_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub

    cache = str(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", cache)

    def rows_writer(rows):
        def write_rows(path):
            with open(path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)

        return write_rows

    _hub_snapshot(
        cache,
        "dataset",
        "someone/tiny-hh",
        {"data/train.jsonl": rows_writer(HH_ROWS), "data/test.jsonl": rows_writer(HH_ROWS[1:])},
    )
    data = load_preference_dataset("someone/tiny-hh")
    assert [r["chosen"] for r in data.train] == [" the food was great .", " the room was lovely ."]
    assert len(data.eval) == 1
    # A name in no cache: one error naming it (no HTTP retries: the tests run offline).
    with pytest.raises(DataError, match=r"someone/missing: .*not in the local cache while offline"):
        load_preference_dataset("someone/missing")
    # Something meant as a path that is not there is "no such file", not a Hub look-up.
    with pytest.raises(DataError, match=r"prefs.jsonl: no such file or directory"):
        load_preference_dataset("prefs.jsonl")
