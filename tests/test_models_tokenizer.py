"""train_bpe_tokenizer: special tokens, left padding, lossless byte-level round trip, save/load."""

import pytest
import transformers

from jaxrlhf.models.tokenizer import train_bpe_tokenizer

TEXTS = ["the cat sat on the mat", "the dog ate the bone", "a cat and a dog"] * 20


def test_trained_tokenizer(tmp_path):
    tok = train_bpe_tokenizer(TEXTS, 300, path=tmp_path / "tok")
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert 259 < len(tok) <= 300  # 256 bytes + 3 specials + learned merges
    # Merges were learned: "the cat" takes fewer tokens than its 7 bytes.
    assert len(tok("the cat")["input_ids"]) < 7
    batch = tok(["the cat", "a dog ate the bone"], padding=True)
    width = len(batch["input_ids"][1])
    n = len(tok("the cat")["input_ids"])
    assert batch["input_ids"][0][: width - n] == [0] * (width - n)  # left padding with <pad>
    assert batch["attention_mask"][0] == [0] * (width - n) + [1] * n
    # Byte-level: text never seen in training (accents, emoji) round-trips exactly.
    text = "Zürich 🚀 tea"
    assert tok.decode(tok(text)["input_ids"]) == text
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded.padding_side == "left" and loaded.pad_token_id == 0 and loaded.eos_token_id == 2
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer(TEXTS, 100)
    with pytest.raises(ValueError, match="texts"):
        train_bpe_tokenizer([], 300)
