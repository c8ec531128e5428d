"""A small byte-level BPE tokenizer trained locally (for the built-in tasks; no downloads).

Real checkpoints come with their own tokenizer: load it with
``transformers.AutoTokenizer.from_pretrained(local_dir)`` (and ``padding_side="left"`` for rollouts).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)  # ids 0, 1, 2
BYTE_ALPHABET = 256


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, path: str | os.PathLike | None = None
):
    """Train a byte-level BPE tokenizer (Sennrich et al. 2016; GPT-2's byte-level variant) on ``texts``.

    Every byte is a token, so any text can be encoded; merges learned from ``texts`` fill the rest of
    the vocabulary. Special tokens: ``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2 (not added
    automatically: append ``tokenizer.eos_token_id`` yourself where a sequence should end).

    Args:
      texts: training corpus.
      vocab_size: largest vocabulary size, ≥ 259 (256 bytes + 3 special tokens); a small corpus may
        give fewer merges, so size the model with ``len(tokenizer)``.
      path: if given, the tokenizer is also saved there with ``save_pretrained``.
    Returns:
      a transformers ``PreTrainedTokenizerFast`` with pad/bos/eos set and ``padding_side="left"``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    minimum = BYTE_ALPHABET + len(SPECIAL_TOKENS)
    if not isinstance(vocab_size, int) or vocab_size < minimum:
        raise ValueError(
            f"vocab_size must be an int ≥ {minimum} (256 bytes + 3 specials), got {vocab_size!r}"
        )
    texts = list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be a non-empty iterable of strings")

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        padding_side="left",
    )
    if path is not None:
        wrapped.save_pretrained(os.fspath(path))
    return wrapped


# The files a tokenizer is read from (any one of them).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved in checkpoint directory ``path``, set up for rollouts.

    Left padding (prompts end where generation starts) and, when the tokenizer has no pad token, its
    EOS as pad. A directory without tokenizer files is a ``ValueError`` naming it: transformers
    would otherwise build an empty tokenizer from ``config.json`` alone.
    """
    from transformers import AutoTokenizer

    path = os.fspath(path)
    if not any(os.path.exists(os.path.join(path, name)) for name in TOKENIZER_FILES):
        raise ValueError(
            f"no tokenizer in {path!r} (none of {', '.join(TOKENIZER_FILES)}): save one "
            "with the model (tokenizer.save_pretrained)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(f"no tokenizer in {path!r} (save one with the model): {err}") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
