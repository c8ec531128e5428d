"""The built-in demo task: tiny restaurant reviews, a hidden gold reward and noisy annotators.

Everything is generated offline and deterministically from a seed, so the whole RLHF pipeline
(SFT → preference collection → reward model → PPO) runs on a laptop CPU in minutes.

**Language.** Sentences of a tiny grammar, one to three clauses::

    sentence := clause (conj clause)* "."
    clause   := "the" NOUN "was" [ADVERB] ADJECTIVE
    conj     := "and" | "but"

e.g. ``the food was great and the service was very slow .`` with 10 nouns, 8 positive and 8 negative
adjectives (:data:`POSITIVE`, :data:`NEGATIVE`) and 2 adverbs. Adjectives are positive or negative
with probability ½ each, so the corpus is neutral on average. The base policy is a tiny GPT-2
trained on this corpus (:mod:`jaxrlhf.train.sft`); the tokenizer is the package's byte-level BPE
(:func:`jaxrlhf.models.tokenizer.train_bpe_tokenizer`) trained on it with a vocabulary of 384, enough
merges that every word (with its leading space) is one token.

**Prompts** are sentence prefixes that stop right after a ``was``: ``the food was`` or
``the food was great but the staff was``. The completion then chooses the adjectives.

**Gold reward** (hidden from the learner; :func:`gold_reward`) of a completion c of prompt p::

    gold(p, c) = #positive words in c − #negative words in c − 2 · #errors(p + c)

where an *error* is a word transition the grammar forbids (``great great``, ``was .``, a second
sentence after ``.``, a word outside the vocabulary), a text that does not end in ``.``, or (when
``finished`` is given) a completion cut off before EOS. Fluent completions have no errors, so
among them the gold reward is the net sentiment: ``great .`` → 1, ``slow and the room was nice .``
→ 0, ``very good and the coffee was fresh .`` → 2.

**Annotators** (:func:`annotate`) compare two completions of a prompt the Bradley-Terry way:
``P(a ≻ b) = σ((gold(a) − gold(b)) / τ)`` with temperature τ (default 1), and label by a coin flip
with that probability.

**Why reward hacking shows.** Preference pairs are sampled from the base policy, which almost never
makes grammar errors; so the only thing the pairs teach the reward model is "positive words good,
negative words bad". It never sees a degenerate text and is not taught to punish one. A policy
optimised against the learned reward without a KL penalty finds texts the reward model extrapolates
to be great, typically runs of positive words (``great great nice great``) or no final period, where
the learned reward keeps rising while the gold reward (which charges 2 per error, more than a
positive word earns) falls. With the KL penalty the policy stays close to the fluent base policy and
raises the gold reward by choosing positive adjectives and chaining clauses.

Measured once (seed 0, tiny GPT-2 D=64 × 2 layers, SFT 300 steps, 2000 pairs, reward model 2 epochs,
PPO batch 64, lr 3e-4, 60 iterations, 128 eval prompts): the SFT policy is fluent on 98% of samples
with mean gold ≈ 0; the reward model's held-out accuracy is 0.76 on the noisy labels (the labels
agree with the gold order on 64% of pairs, 24% are gold ties, so ≈ 0.76 is the ceiling). PPO with
β = 0.2: gold 0.1 → 2.0, 95% fluent. PPO with β = 0: learned reward 0 → 4.9 while gold falls to
−30 and no sample stays fluent ("perfect room the room room …").
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from collections.abc import Sequence

import numpy as np

from jaxrlhf.data.preference import (
    DataConfig,
    PromptBatch,
    decode,
    encode,
    right_pad,
    tokenize_prompts,
)
from jaxrlhf.data.task import TaskTokens
from jaxrlhf.models.tokenizer import train_bpe_tokenizer

NOUNS = ("food", "service", "staff", "pizza", "coffee", "music", "room", "view", "price", "bread")
POSITIVE = ("great", "good", "tasty", "friendly", "nice", "fresh", "lovely", "perfect")
NEGATIVE = ("bad", "slow", "cold", "rude", "awful", "bland", "dirty", "noisy")
ADVERBS = ("very", "really")
CONJUNCTIONS = ("and", "but")
ADJECTIVES = POSITIVE + NEGATIVE
VOCABULARY = frozenset(("the", "was", ".", *NOUNS, *ADJECTIVES, *ADVERBS, *CONJUNCTIONS))
ERROR_COST = 2.0
"""Gold reward charged per grammar error (more than one positive word earns)."""

_START = "<s>"


def _allowed_transitions() -> frozenset[tuple[str, str]]:
    pairs = {(_START, "the")}
    pairs |= {("the", n) for n in NOUNS} | {(n, "was") for n in NOUNS}
    pairs |= {("was", w) for w in ADVERBS + ADJECTIVES}
    pairs |= {(a, w) for a in ADVERBS for w in ADJECTIVES}
    pairs |= {(w, c) for w in ADJECTIVES for c in CONJUNCTIONS + (".",)}
    pairs |= {(c, "the") for c in CONJUNCTIONS}
    return frozenset(pairs)


ALLOWED_TRANSITIONS = _allowed_transitions()
"""Word bigrams (with ``<s>`` as the start) that the grammar produces."""


# ----------------------------------------------------------------------------------------------
# The grammar: sampling sentences and prompts
# ----------------------------------------------------------------------------------------------


def sample_clause(rng: np.random.Generator) -> list[str]:
    """``the NOUN was [ADVERB] ADJECTIVE`` with a positive adjective with probability ½."""
    words = ["the", NOUNS[rng.integers(len(NOUNS))], "was"]
    if rng.random() < 0.25:
        words.append(ADVERBS[rng.integers(len(ADVERBS))])
    pool = POSITIVE if rng.random() < 0.5 else NEGATIVE
    words.append(pool[rng.integers(len(pool))])
    return words


def sample_sentence_words(rng: np.random.Generator) -> list[str]:
    """One to three clauses (probabilities .5, .35, .15) joined by and/but, then ``.``."""
    num_clauses = 1 + int(rng.choice(3, p=(0.5, 0.35, 0.15)))
    words = sample_clause(rng)
    for _ in range(num_clauses - 1):
        words += [CONJUNCTIONS[rng.integers(2)], *sample_clause(rng)]
    return words + ["."]


def sample_corpus(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` sentences of the grammar."""
    return [" ".join(sample_sentence_words(rng)) for _ in range(n)]


def sample_prompts(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` sentence prefixes that end right after a ``was`` (the next word is the adjective)."""
    prompts = []
    for _ in range(n):
        words = sample_sentence_words(rng)
        cuts = [i + 1 for i, w in enumerate(words) if w == "was"]
        prompts.append(" ".join(words[: cuts[rng.integers(len(cuts))]]))
    return prompts


# ----------------------------------------------------------------------------------------------
# Gold reward and annotators
# ----------------------------------------------------------------------------------------------


def count_errors(words: Sequence[str]) -> int:
    """Grammar errors of a whole text: forbidden transitions (from ``<s>``) + 1 if it does not end
    in ``.``. Anything after the first ``.`` is an error (``.`` has no allowed successor)."""
    sequence = [_START, *words]
    errors = sum((a, b) not in ALLOWED_TRANSITIONS for a, b in itertools.pairwise(sequence))
    return errors + int(not words or words[-1] != ".")


def sentiment(words: Sequence[str]) -> int:
    """#positive words − #negative words."""
    return sum(w in POSITIVE for w in words) - sum(w in NEGATIVE for w in words)


def gold_reward(
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    finished: Sequence[bool] | np.ndarray | None = None,
) -> np.ndarray:
    """The hidden reward ``sentiment(c) − 2 · errors(p + c)`` (see the module docstring) → ``[N]``.

    Args:
      prompts: N prompt texts.
      completions: N completion texts (as decoded, special tokens removed).
      finished: optional N booleans, whether the completion ended with EOS; a completion cut off
        by the length limit counts one more error.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"gold_reward: {len(prompts)} prompts but {len(completions)} completions")
    out = np.zeros(len(prompts), np.float32)
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        words = completion.split()
        errors = count_errors(prompt.split() + words)
        if finished is not None and not finished[i]:
            errors += 1
        out[i] = sentiment(words) - ERROR_COST * errors
    return out


def preference_probability(gold_a: np.ndarray, gold_b: np.ndarray, *, tau: float) -> np.ndarray:
    """Bradley-Terry annotator: P(a ≻ b) = σ((gold_a − gold_b) / τ)."""
    return 1.0 / (1.0 + np.exp(-(np.asarray(gold_a) - np.asarray(gold_b)) / tau))


def annotate(
    gold_a: np.ndarray, gold_b: np.ndarray, rng: np.random.Generator, *, tau: float = 1.0
) -> np.ndarray:
    """Noisy labels: True where the annotator prefers a, drawn with P(a ≻ b) = σ((g_a − g_b)/τ)."""
    p = preference_probability(gold_a, gold_b, tau=tau)  # [N]
    return rng.random(p.shape) < p  # [N] bool


# ----------------------------------------------------------------------------------------------
# The task bundle
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class DemoTask(TaskTokens):
    """Everything the demo needs, built by :func:`build_demo_task`."""

    seed: int
    tokenizer: object  # transformers.PreTrainedTokenizerFast (<pad> 0, <bos> 1, <eos> 2)
    corpus: tuple[str, ...]  # SFT sentences
    prompts: tuple[str, ...]  # PPO training prompts
    eval_prompts: tuple[str, ...]  # held-out prompts for evaluation
    data_config: DataConfig  # prompt / response lengths in tokens
    tau: float  # annotator temperature

    def corpus_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """The corpus as SFT sequences ``sentence + EOS``, right-padded: ids, mask ``[N, L]``."""
        rows = [encode(self.tokenizer, s) + [self.eos_token_id] for s in self.corpus]
        length = max(len(r) for r in rows)
        return right_pad(rows, length, self.pad_token_id)

    def prompt_batch(self, prompts: Sequence[str] | None = None) -> PromptBatch:
        """Prompts (default: the training prompts) left-padded to ``[N, P]``."""
        prompts = self.prompts if prompts is None else prompts
        return tokenize_prompts({"prompt": list(prompts)}, self.tokenizer, self.data_config)

    def write_data_files(self, directory: str, pairs=None) -> dict[str, str]:
        """The task's data as the files a user would bring (``jaxrlhf sft / train-rm / ppo``):
        ``sft.jsonl`` (the corpus, ``text``), ``prompts.jsonl`` (the training prompts) and, given
        annotated ``pairs`` (a dataset with prompt/chosen/rejected), ``prefs.jsonl``. Returns the
        paths by name."""
        os.makedirs(directory, exist_ok=True)
        files = {
            "sft": [{"text": s} for s in self.corpus],
            "prompts": [{"prompt": p} for p in self.prompts],
        }
        if pairs is not None:
            files["prefs"] = [
                {"prompt": p, "chosen": c, "rejected": r}
                for p, c, r in zip(pairs["prompt"], pairs["chosen"], pairs["rejected"])
            ]
        paths = {}
        for name, rows in files.items():
            paths[name] = os.path.join(directory, f"{name}.jsonl")
            with open(paths[name], "w", encoding="utf-8") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
        return paths

    def decode(self, tokens: np.ndarray, mask: np.ndarray | None = None) -> list[str]:
        """Texts of ``[N, T]`` token ids (positions where ``mask`` is 0 dropped, special tokens
        skipped), stripped of surrounding spaces."""
        tokens = np.asarray(tokens)
        mask = np.ones_like(tokens) if mask is None else np.asarray(mask)
        return [decode(self.tokenizer, row[m > 0]).strip() for row, m in zip(tokens, mask)]

    def finished(self, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """``[N]`` bool: whether each completion contains EOS at a valid position."""
        return np.any((np.asarray(tokens) == self.eos_token_id) & (np.asarray(mask) > 0), axis=-1)

    def gold_reward(self, prompts, completions, *, finished=None) -> np.ndarray:
        """:func:`gold_reward` (hidden reward) of completion texts → ``[N]``."""
        return gold_reward(prompts, completions, finished=finished)

    def gold_reward_of_tokens(self, prompts, tokens, mask) -> np.ndarray:
        """Gold reward ``[N]`` of generated completions ``tokens``/``mask`` ``[N, T]`` (a Rollout's
        fields) for prompt texts: decoded, with the missing-EOS error counted."""
        texts = self.decode(tokens, mask)
        return gold_reward(prompts, texts, finished=self.finished(tokens, mask))

    def num_errors(self, prompts, completions, *, finished=None) -> np.ndarray:
        """Grammar errors ``[N]`` of prompt + completion (+1 if not finished): 0 means fluent."""
        out = np.array([count_errors((p + " " + c).split()) for p, c in zip(prompts, completions)])
        if finished is not None:
            out = out + ~np.asarray(finished, bool)
        return out

    def annotate(self, prompts, completions_a, completions_b, rng: np.random.Generator):
        """Noisy Bradley-Terry labels (True: a preferred) for pairs of completion texts → ``[N]``."""
        gold_a = gold_reward(prompts, completions_a)
        gold_b = gold_reward(prompts, completions_b)
        return annotate(gold_a, gold_b, rng, tau=self.tau)

    def preference_dataset(self, prompts, completions_a, completions_b, labels):
        """A ``datasets.Dataset`` with ``prompt``, ``chosen``, ``rejected`` text columns (completions
        keep a leading space so that prompt + completion is the sentence)."""
        import datasets

        labels = np.asarray(labels, bool)
        chosen = [a if lab else b for a, b, lab in zip(completions_a, completions_b, labels)]
        rejected = [b if lab else a for a, b, lab in zip(completions_a, completions_b, labels)]
        return datasets.Dataset.from_dict(
            {
                "prompt": list(prompts),
                "chosen": [" " + c for c in chosen],
                "rejected": [" " + r for r in rejected],
            }
        )


def build_demo_task(
    seed: int = 0,
    *,
    num_sentences: int = 4000,
    num_prompts: int = 512,
    num_eval_prompts: int = 128,
    vocab_size: int = 384,
    tau: float = 1.0,
    max_prompt_length: int = 20,
    max_response_length: int = 24,
) -> DemoTask:
    """The demo task for ``seed``: corpus, tokenizer, train/eval prompts (deterministic)."""
    corpus_rng, prompt_rng, eval_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3)
    )
    corpus = sample_corpus(corpus_rng, num_sentences)
    tokenizer = train_bpe_tokenizer(corpus, vocab_size)
    # Fixed widths: every prompt batch of the demo (training, evaluation, collection) has one shape.
    config = DataConfig(
        max_prompt_length=max_prompt_length,
        max_response_length=max_response_length,
        padding="max_length",
    )
    return DemoTask(
        seed=seed,
        tokenizer=tokenizer,
        corpus=tuple(corpus),
        prompts=tuple(sample_prompts(prompt_rng, num_prompts)),
        eval_prompts=tuple(sample_prompts(eval_rng, num_eval_prompts)),
        data_config=config,
        tau=tau,
    )
