"""What the built-in tasks share (the demo's reviews, arithmetic, calculator): the ids and lengths
their tokenizer and DataConfig give, and the texts of a rollout's rows."""

from __future__ import annotations

import numpy as np


class TaskTokens:
    """Properties of a task dataclass with ``tokenizer`` and ``data_config`` fields."""

    tokenizer: object
    data_config: object  # a DataConfig

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def eos_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @property
    def max_prompt_length(self) -> int:
        """P: the longest prompt, in tokens."""
        return self.data_config.max_prompt_length

    @property
    def max_new_tokens(self) -> int:
        """R: the longest response + 1 (its EOS); enough to sample any answer."""
        return self.data_config.max_response_length


def decode_rows(tokenizer, ids, mask) -> list[str]:
    """The text of each row of ``ids`` [B, T] at its positions where ``mask`` [B, T] > 0, special
    tokens skipped (a rollout's responses: its ``tokens`` and ``mask`` or ``attention_mask``)."""
    rows, keeps = np.asarray(ids).tolist(), (np.asarray(mask) > 0).tolist()
    return [
        tokenizer.decode([t for t, keep in zip(row, kept) if keep], skip_special_tokens=True)
        for row, kept in zip(rows, keeps)
    ]
