"""Best-of-n sampling: n responses per prompt, scored, the best kept (``jaxrlhf generate --best-of``).

    prompts [B, P] ──sample(group_size=n)──▶ candidates [B·n, N] ──reward_fn──▶ scores [B, n]
                                                                   └─ argmax ──▶ kept [B, N]

One batched rollout draws the n candidates of every prompt (each prompt prefilled once), and one
scoring pass scores them all (a reward model runs each prompt once per group). The math, the KL of
the best-of-n policy (log n − (n−1)/n) and the unbiased estimate of its reward from a pool, is in
:mod:`jaxrlhf.rl.best_of`.
"""

from __future__ import annotations

from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
from flax import struct

from jaxrlhf.rl import best_of_n_kl
from jaxrlhf.rollout import Rollout, SamplingConfig, sample
from jaxrlhf.train.grpo_rewards import score_groups


@struct.dataclass
class BestOfN:
    """The candidates of each prompt, their scores and which one was kept."""

    candidates: Rollout  # [B·n, N]: rows i·n … i·n + n − 1 answer prompt i
    scores: jax.Array  # [B, n] float32 reward_fn's score of each candidate
    best: jax.Array  # [B] int32 the kept candidate (the first of equal best scores)

    @property
    def n(self) -> int:
        return self.scores.shape[1]

    @property
    def kept(self) -> Rollout:
        """[B, N] the best-scored candidate of each prompt (tokens, mask, logprobs, …)."""
        rows = jnp.arange(self.scores.shape[0]) * self.n + self.best  # [B]
        return jax.tree.map(lambda x: x[rows], self.candidates)

    @property
    def kl(self) -> jax.Array:
        """KL(π_n ‖ π) of the best-of-n policy when scores do not tie (an upper bound if they do)."""
        return best_of_n_kl(self.n)


def best_of_n(
    model,
    prompt_ids,
    prompt_mask,
    reward_fn: Callable,
    *,
    n: int,
    config: SamplingConfig,
    rng,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    sampler: Callable = sample,
) -> BestOfN:
    """Draw ``n`` responses to each prompt from ``model``, score them with ``reward_fn``, keep the best.

    Args:
      model: a CausalLM (or anything ``sampler`` takes).
      prompt_ids, prompt_mask: [B, P] left-padded prompts.
      reward_fn: ``reward_fn(prompt_ids, prompt_mask, rollout) -> [R]``, a reward model's
        (``train.experience.reward_model_fn``) or Python rules on text (``train.grpo.text_reward_fn``);
        it is given the prompts repeated n times, one row per candidate.
      n: candidates per prompt (≥ 1).  config: how each is sampled.  rng: a jax.random key.
      eos_token_id, pad_token_id: as ``rollout.sample``.  sampler: ``rollout.sample`` or
        ``tools.sample_turns`` (the same signature).
    Returns: BestOfN(candidates [B·n, N], scores [B, n], best [B]).
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"best-of-n: n={n!r} must be an integer ≥ 1")
    prompt_ids, prompt_mask = jnp.asarray(prompt_ids), jnp.asarray(prompt_mask)
    candidates = sampler(
        model, prompt_ids, prompt_mask, config, rng, eos_token_id=eos_token_id,
        pad_token_id=pad_token_id, group_size=n,
    )  # fmt: skip
    repeated = [jnp.repeat(x, n, axis=0) for x in (prompt_ids, prompt_mask)]  # [B·n, P]
    scores = score_groups(reward_fn, *repeated, candidates, n)  # [B·n]
    chex.assert_shape(scores, (prompt_ids.shape[0] * n,))
    scores = scores.reshape(prompt_ids.shape[0], n)  # [B, n]
    return BestOfN(candidates=candidates, scores=scores, best=jnp.argmax(scores, axis=1))
