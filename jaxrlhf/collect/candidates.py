"""Candidate pairs for labelling: K samples per prompt from a policy, paired up.

    prompt x ──sample(policy, τ) K times──▶ y₁ … y_K ──distinct, finished──▶ pairs (yᵢ, yⱼ), i < j

Labelling pipelines sample at a high temperature (τ ≈ 1–1.2) so that the two responses a person compares
differ. A sample that is empty or was cut off before EOS is dropped, and so are duplicates; the
remaining distinct samples of a prompt are paired in every combination (K = 2 gives at most one
pair per prompt, K = 4 at most six, as InstructGPT's K-way comparisons do).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import numpy as np

from jaxrlhf.config import option, require


@dataclasses.dataclass(frozen=True, kw_only=True)
class CollectConfig:
    """How the candidate pairs of ``jaxrlhf collect`` are sampled from the policy."""

    num_samples: int = option(
        2, "Responses K sampled per prompt; its distinct finished ones are paired (K(K-1)/2)."
    )
    temperature: float = option(
        1.0, "Sampling temperature τ (high, ≈1–1.2, so that the two responses differ)."
    )
    max_new_tokens: int = option(32, "Longest response in tokens (cut-off responses are dropped).")
    top_k: int | None = option(None, "Sample only from the k most likely tokens (None: off).")
    top_p: float | None = option(None, "Nucleus sampling mass (None: off).")
    batch_size: int = option(64, "Prompts per sampling call (each sampled num_samples times).")
    max_prompts: int | None = option(None, "Use only the first this many prompts (None: all).")
    seed: int = option(0, "Sampling seed.")

    def __post_init__(self):
        require(self.num_samples >= 2, self, "num_samples", "must be >= 2 (a pair needs two)")
        require(self.temperature > 0, self, "temperature", "must be > 0")
        require(self.max_new_tokens >= 1, self, "max_new_tokens", "must be >= 1")
        require(self.top_k is None or self.top_k >= 1, self, "top_k", "must be >= 1 or None")
        require(self.top_p is None or 0 < self.top_p <= 1, self, "top_p", "must be in (0, 1]")
        require(self.batch_size >= 1, self, "batch_size", "must be >= 1")
        require(
            self.max_prompts is None or self.max_prompts >= 1,
            self,
            "max_prompts",
            "must be >= 1 or None",
        )

    def sampling(self):
        """The rollout's SamplingConfig."""
        from jaxrlhf.rollout import SamplingConfig

        return SamplingConfig(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
        )


def pair_up(samples: Sequence[str]) -> list[tuple[str, str]]:
    """Every pair (yᵢ, yⱼ), i < j, of the distinct texts in ``samples`` (first occurrence order)."""
    distinct = list(dict.fromkeys(samples))
    return list(itertools.combinations(distinct, 2))


def as_response(prompt, text: str):
    """A sampled text in the prompt's kind: itself for a text prompt, an assistant turn for a chat
    (so that ``train-rm`` reads the pair in the same format as the prompt)."""
    return text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]


def sample_candidates(
    policy,
    tokenizer,
    prompts: Sequence,
    config: CollectConfig,
    data_config,
    *,
    source: str = "prompts",
) -> tuple[list[dict], int]:
    """Candidate pairs ``{"prompt", "a", "b"}`` of ``policy``'s samples, and the number of samples
    dropped (empty, cut off before EOS, or a duplicate of another sample of the same prompt).

    Args:
      policy: a CausalLM.
      tokenizer: its tokenizer (EOS ends a response; chats are rendered with its template).
      prompts: prompt texts or chats (``load_prompt_dataset`` rows' ``prompt``).
      config: a CollectConfig.  data_config: a DataConfig (prompt length, truncation).
      source: named in data errors.
    """
    import jax

    from jaxrlhf.data.preference import decode, pad_id, special_id, tokenize_prompts
    from jaxrlhf.rollout import sample

    eos = special_id(tokenizer, "eos")
    pad = pad_id(tokenizer)
    sampling = config.sampling()
    K = config.num_samples
    rng = jax.random.PRNGKey(config.seed)
    candidates, dropped = [], 0
    for start in range(0, len(prompts), config.batch_size):
        chunk = list(prompts[start : start + config.batch_size])
        batch = tokenize_prompts([{"prompt": p} for p in chunk], tokenizer, data_config,
                                 source=f"{source} [from row {start}]")  # fmt: skip
        ids = np.tile(batch.input_ids, (K, 1))  # [K·b, P]: the chunk K times over
        mask = np.tile(batch.attention_mask, (K, 1))  # [K·b, P]
        rng, key = jax.random.split(rng)
        rollout = sample(policy, ids, mask, sampling, key, eos_token_id=eos, pad_token_id=pad)
        tokens, response_mask = np.asarray(rollout.tokens), np.asarray(rollout.mask)  # [K·b, N]
        b = len(chunk)
        for i, prompt in enumerate(chunk):
            texts = []
            for k in range(K):
                row, valid = tokens[k * b + i], response_mask[k * b + i] > 0  # [N]
                finished = eos is not None and bool(np.any((row == eos) & valid))
                text = decode(tokenizer, row[valid & (row != eos)])
                if finished and text.strip():
                    texts.append(text)
            pairs = pair_up(texts)
            dropped += K - len(dict.fromkeys(texts))
            for a, b_text in pairs:
                candidates.append(
                    {
                        "prompt": prompt,
                        "a": as_response(prompt, a),
                        "b": as_response(prompt, b_text),
                    }
                )
    return candidates, dropped
