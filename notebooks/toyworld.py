"""A language-model world small enough to enumerate: the exact oracle the notebooks check against.

Two prompts, a vocabulary of three tokens and responses of exactly three tokens give 2 · 3³ = 54
possible trajectories. With so few of them every expectation of the derivation (the objective J(θ),
its gradient, a value V(s), a variance) can be computed *exactly* as a finite weighted sum, and the
library's estimators can be compared with the truth instead of with another estimate.

This module only builds the world (which trajectories exist, which state each prefix is, what each
token earns) and computes conditional means by definition. The RL math itself (log-probabilities,
returns, advantages, losses) is always done by ``jaxrlhf.rl`` in the notebooks.

The policy is *tabular*: one row of logits per state s = (prompt, tokens so far). That is the most
general autoregressive model of this world — a transformer could represent any such table — so it is
a faithful (if tiny) language model with 2 · (1 + 3 + 9) = 26 states × 3 logits = 78 parameters.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf import rl


@dataclasses.dataclass(frozen=True, kw_only=True)
class ToyWorld:
    """The enumerable world: prompts, vocabulary, horizon and the per-token reward rule."""

    prompt_probs: tuple[float, ...] = (0.7, 0.3)
    """p(s₀): how often each prompt is asked."""
    vocab: tuple[str, ...] = ("a", "b", "c")
    """The tokens (actions)."""
    horizon: int = 3
    """Every response has exactly this many tokens."""
    favourite: tuple[int, ...] = (1, 2)
    """The token each prompt rewards: +1 each time it is emitted."""
    repeat_penalty: float = 0.5
    """Paid when a token repeats the previous one."""
    end_bonus: float = 1.0
    """Earned at the last step if the response ends with token 0 ("a")."""

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def n_prompts(self) -> int:
        return len(self.prompt_probs)

    @property
    def n_prefixes(self) -> int:
        """Prefixes of length 0 .. horizon−1 (the states at which a token is chosen), per prompt."""
        return sum(self.vocab_size**t for t in range(self.horizon))

    @property
    def n_states(self) -> int:
        return self.n_prompts * self.n_prefixes


def enumerate_trajectories(world: ToyWorld):
    """Every (prompt, response) pair: prompts [N] int32, tokens [N, T] int32, N = n_prompts · Vᵀ."""
    rows = [
        (p, resp)
        for p in range(world.n_prompts)
        for resp in itertools.product(range(world.vocab_size), repeat=world.horizon)
    ]
    prompts = np.array([p for p, _ in rows], np.int32)  # [N]
    tokens = np.array([r for _, r in rows], np.int32)  # [N, T]
    return jnp.asarray(prompts), jnp.asarray(tokens)


def state_ids(world: ToyWorld, prompts, tokens):
    """Index of the state sₜ = (prompt, tokens[:t]) in which token t is chosen: [N, T] int32.

    Prefixes of length t are numbered after all shorter ones, in base-V order.
    """
    v = world.vocab_size
    tokens = np.asarray(tokens)
    ids = np.zeros(tokens.shape, np.int32)  # [N, T]
    for t in range(world.horizon):
        offset = sum(v**k for k in range(t))  # prefixes shorter than t
        code = np.zeros(tokens.shape[0], np.int64)
        for k in range(t):
            code = code * v + tokens[:, k]
        ids[:, t] = np.asarray(prompts) * world.n_prefixes + offset + code
    return jnp.asarray(ids)


def rewards(world: ToyWorld, prompts, tokens):
    """Per-token rewards rₜ [N, T] float32.

    rₜ = 1[aₜ = favourite(prompt)] − penalty · 1[aₜ = aₜ₋₁] + bonus · 1[t = T−1 and aₜ = "a"]
    """
    tokens = np.asarray(tokens)
    fav = np.asarray(world.favourite)[np.asarray(prompts)][:, None]  # [N, 1]
    r = (tokens == fav).astype(np.float32)  # [N, T]
    r[:, 1:] -= world.repeat_penalty * (tokens[:, 1:] == tokens[:, :-1])
    r[:, -1] += world.end_bonus * (tokens[:, -1] == 0)
    return jnp.asarray(r)


def policy_logits(table, ids):
    """The tabular LM: the logits of state sₜ are row ``ids[..., t]`` of ``table`` [S, V].

    Returns [..., T, V] logits.
    """
    return table[ids]


def init_table(world: ToyWorld, key, scale: float = 1.0):
    """Random logits table [S, V] (a randomly initialised 'LM')."""
    return scale * jax.random.normal(key, (world.n_states, world.vocab_size), jnp.float32)


def log_prob_trajectories(world: ToyWorld, table, prompts, tokens, ids):
    """log P(τ|θ) = log p(s₀) + Σₜ log π_θ(aₜ|sₜ) for every trajectory: [N].

    (The transitions of an LM are deterministic, so their log-probability is 0.) The policy part is
    the library's ``trajectory_logprob`` of its ``token_logprobs``.
    """
    logprobs = rl.token_logprobs(policy_logits(table, ids), tokens)  # [N, T]
    mask = jnp.ones_like(logprobs)
    log_p0 = jnp.log(jnp.asarray(world.prompt_probs, jnp.float32))[prompts]  # [N]
    return log_p0 + rl.trajectory_logprob(logprobs, mask)


def conditional_mean(weights, x, keys, n_keys: int):
    """E[x | key] by definition: Σ w·x·1[key=k] / Σ w·1[key=k], read back at each entry's key.

    Args:
      weights: [N] probability of each trajectory.  x: [N, T] a per-step quantity.
      keys: [N, T] int ids of the conditioning event (e.g. the state sₜ).  n_keys: number of ids.
    Returns:
      [N, T] the conditional expectation at each (trajectory, step).
    """
    w = jnp.broadcast_to(weights[:, None], x.shape)  # [N, T]
    num = jax.ops.segment_sum((w * x).ravel(), keys.ravel(), n_keys)  # [K]
    den = jax.ops.segment_sum(w.ravel(), keys.ravel(), n_keys)  # [K]
    return (num / jnp.maximum(den, 1e-30))[keys]


def all_groups(n_responses: int, group_size: int):
    """Every ordered group of ``group_size`` i.i.d. draws from ``n_responses``: [n^G, G] int32.

    Row m lists the responses y₁ … y_G of one possible group, so an expectation over groups of a
    group estimator (GRPO, RLOO) is an exact weighted sum over the rows, the weight of a row being
    Πᵢ π(yᵢ|x). (27 responses per prompt: 27⁴ = 531441 groups of four.)
    """
    grid = np.indices((n_responses,) * group_size)  # [G, n, …, n]
    return jnp.asarray(grid.reshape(group_size, -1).T.astype(np.int32))  # [n^G, G]
