"""Rollout in turns: the policy writes, a tool answers inside the episode, the policy goes on.

    prompt ──prefill──▶ KV cache;  for t = 0 … N−1 (one column of the response per step):
        a row with tool tokens queued  → takes the next one     (mask 0, no log-prob: a transition)
        else                           → samples aₜ ~ π(·|sₜ)    (mask 1, its log-prob recorded)
        a sampled ``</tool_call>``     → the loop pauses; the host reads the call, runs the tool and
                                         queues ``<tool_response>answer</tool_response>`` for the row

Every token, sampled or inserted, goes through the model once and into the KV cache (the prompt is
never re-encoded; an inserted token costs one decode step, like a sampled one), so the policy's next
token is conditioned on the tool's answer exactly as the training pass will condition it.

What the trainer gets is a :class:`jaxrlhf.rollout.Rollout` whose ``mask`` has holes: 1 at the
policy's tokens, 0 at the tool's tokens and after the end; ``attention`` is 1 at every token of the
episode (the tool's included), ``tool_calls`` counts the calls of each row. The derivation says why
the holes: log P(τ|θ) = log p(s₀) + Σₜ log π_θ(aₜ|sₜ) + Σₜ log P(sₜ₊₁|sₜ, aₜ), and the tool's tokens
are the transition term, which does not depend on θ: they are state, never actions, so they are out
of the loss, the ratio and the KL, and not time steps of the policy (``jaxrlhf.rl`` reads a mask with
holes that way). The re-scoring pass attends to them through ``attention``.

One compiled decode loop serves every turn: it runs until some row pauses at a call, every row has
ended, or the response is full; the host answers the paused rows and resumes it with the cache as it
was. All rows share the column of a step, so a row never waits for another's tool.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from jaxrlhf.models.heads import ActorCritic, CausalLM
from jaxrlhf.models.layers import KVCache
from jaxrlhf.rollout import Rollout, SamplingConfig, _check_model_and_prompts, _prefill
from jaxrlhf.sampling import sample_token
from jaxrlhf.tools.calls import Toolbox, call_text


@struct.dataclass
class _Episode:
    """The decode loop's carry, kept on the device between turns."""

    t: jax.Array  # int32 scalar: the column step t writes
    token: jax.Array  # [B] int32 the token of column t − 1 (fed at step t)
    done: jax.Array  # [B] bool: EOS sampled
    waiting: jax.Array  # [B] bool: a call just closed; the host owes the row an answer
    turns: jax.Array  # [B] int32 calls answered so far
    queue: jax.Array  # [B, Q] int32 tool tokens to insert
    queue_len: jax.Array  # [B] int32
    queue_pos: jax.Array  # [B] int32 the next one to insert
    cache: KVCache
    tokens: jax.Array  # [B, N] int32
    mask: jax.Array  # [B, N] float32 1 at sampled tokens
    attention: jax.Array  # [B, N] float32 1 at every token of the episode
    logprobs: jax.Array  # [B, N] float32


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Static:
    """What every step shares: the model, the draw, the layout."""

    lm: CausalLM
    draw: Callable
    rng: jax.Array
    kv_mask: jax.Array  # [B, P + N − 1]
    first_position: jax.Array  # [B]
    prompt_len: int
    eos_token_id: jax.Array
    pad_token_id: jax.Array
    stop_ids: jax.Array  # [m] the tokens of the call's end marker
    max_turns: int


def _closes_call(s: _Static, tokens, mask, t):
    """[B] bool: columns t − m + 1 … t are the end marker, all sampled by the policy."""
    m = s.stop_ids.shape[0]
    start = jnp.maximum(t - m + 1, 0)
    window = jax.lax.dynamic_slice_in_dim(tokens, start, m, axis=1)  # [B, m]
    sampled = jax.lax.dynamic_slice_in_dim(mask, start, m, axis=1)  # [B, m]
    match = jnp.all(window == s.stop_ids, axis=1) & jnp.all(sampled > 0, axis=1)
    return match & (t >= m - 1)


def _write(ep: _Episode, s: _Static, token, logprob, policy, alive) -> _Episode:
    """Column t ← (token, policy?, alive?, logprob); then EOS, the queue and a closed call."""
    t, B = ep.t, token.shape[0]
    column = jnp.zeros((B,), jnp.int32) + t  # [B]
    rows = jnp.arange(B)
    tokens = ep.tokens.at[rows, column].set(token)  # [B, N]
    mask = ep.mask.at[rows, column].set(policy.astype(jnp.float32))
    attention = ep.attention.at[rows, column].set(alive.astype(jnp.float32))
    logprobs = ep.logprobs.at[rows, column].set(jnp.where(policy, logprob, 0.0))
    waiting = policy & _closes_call(s, tokens, mask, t) & (ep.turns < s.max_turns)
    return ep.replace(
        t=t + 1, token=token, done=ep.done | (policy & (token == s.eos_token_id)), waiting=waiting,
        queue_pos=ep.queue_pos + (alive & ~policy), tokens=tokens, mask=mask, attention=attention,
        logprobs=logprobs,
    )  # fmt: skip


def _choose(s: _Static, ep: _Episode, logits):
    """This step's token of each row: the next queued tool token, else a draw from π."""
    sampled, logprob = s.draw(logits, jax.random.fold_in(s.rng, ep.t))  # [B], [B]
    inserting = ep.queue_pos < ep.queue_len  # [B]
    last = ep.queue.shape[1] - 1
    queued = jnp.take_along_axis(ep.queue, jnp.minimum(ep.queue_pos, last)[:, None], axis=1)[:, 0]
    alive = ~ep.done
    token = jnp.where(alive, jnp.where(inserting, queued, sampled), s.pad_token_id)  # [B]
    return token, logprob, alive & ~inserting, alive


def _step(s: _Static, ep: _Episode) -> _Episode:
    """Step t: feed column t − 1 into slot P + t − 1, then write column t."""
    t = ep.t
    positions = (s.first_position + t - 1)[:, None]  # [B, 1]
    logits, cache = s.lm.forward_cached(
        ep.token[:, None], positions, s.kv_mask, ep.cache, s.prompt_len + t - 1
    )  # [B, 1, V]
    token, logprob, policy, alive = _choose(s, ep.replace(cache=cache), logits[:, 0])
    return _write(ep.replace(cache=cache), s, token, logprob, policy, alive)


def _static(state, input_ids, attention_mask, rng, settings, *, graphdef, N, top_k, use_top_p,
            greedy, max_turns):  # fmt: skip
    temperature, top_p, eos_token_id, pad_token_id, stop_ids = settings
    lm = nnx.merge(graphdef, state)
    draw = functools.partial(sample_token, temperature=temperature, top_k=top_k,
                             top_p=top_p if use_top_p else None, greedy=greedy)  # fmt: skip
    B = attention_mask.shape[0]
    kv_mask = jnp.concatenate(
        [attention_mask.astype(jnp.int32), jnp.ones((B, N - 1), jnp.int32)], axis=1
    )  # [B, P + N − 1]
    return lm, _Static(
        lm=lm, draw=draw, rng=rng, kv_mask=kv_mask,
        first_position=attention_mask.astype(jnp.int32).sum(-1), prompt_len=input_ids.shape[1],
        eos_token_id=eos_token_id, pad_token_id=pad_token_id, stop_ids=stop_ids,
        max_turns=max_turns,
    )  # fmt: skip


_STATIC = ("graphdef", "N", "top_k", "use_top_p", "greedy", "max_turns", "group_size", "Q")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _start(state, input_ids, attention_mask, rng, settings, *, group_size, Q, **static):
    """Prefill the prompts, draw column 0 → the episode before step 1."""
    lm = nnx.merge(static["graphdef"], state)
    logits, cache, attention_mask = _prefill(lm, input_ids, attention_mask, group_size)
    lm, s = _static(state, input_ids, attention_mask, rng, settings, **static)
    cache = cache.per_layer().grow(input_ids.shape[1] + static["N"] - 1)
    B, N = logits.shape[0], static["N"]
    zeros = jnp.zeros((B,), jnp.int32)
    ep = _Episode(
        t=jnp.int32(0), token=zeros, done=zeros > 0, waiting=zeros > 0, turns=zeros,
        queue=jnp.zeros((B, Q), jnp.int32), queue_len=zeros, queue_pos=zeros, cache=cache,
        tokens=jnp.full((B, N), s.pad_token_id, jnp.int32), mask=jnp.zeros((B, N), jnp.float32),
        attention=jnp.zeros((B, N), jnp.float32), logprobs=jnp.zeros((B, N), jnp.float32),
    )  # fmt: skip
    token, logprob, policy, alive = _choose(s, ep, logits)
    return _write(ep, s, token, logprob, policy, alive)


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("ep",))
def _resume(state, ep: _Episode, input_ids, attention_mask, rng, settings, *, group_size, Q,
            **static):  # fmt: skip
    """Steps until a row pauses at a call, every row has ended, or column N − 1 is written."""
    attention_mask = jnp.repeat(attention_mask, group_size, axis=0)
    lm, s = _static(state, input_ids, attention_mask, rng, settings, **static)
    s = dataclasses.replace(s, lm=lm.unstack_layers())

    def running(ep):
        return (ep.t < static["N"]) & ~jnp.all(ep.done) & ~jnp.any(ep.waiting)

    return jax.lax.while_loop(running, functools.partial(_step, s), ep)


def _answer_calls(ep: _Episode, toolbox: Toolbox, tokenizer) -> _Episode:
    """The host's turn: read each paused row's call, run the tools, queue their answers' tokens."""
    waiting = np.asarray(ep.waiting)
    rows = np.flatnonzero(waiting)
    tokens, attention = np.asarray(ep.tokens), np.asarray(ep.attention)
    texts = [tokenizer.decode(tokens[r][attention[r] > 0], skip_special_tokens=False) for r in rows]
    answers = toolbox.answer_all([call_text(text, toolbox.config) for text in texts])
    queue, queue_len = np.asarray(ep.queue).copy(), np.asarray(ep.queue_len).copy()
    Q = queue.shape[1]
    for r, answer in zip(rows, answers, strict=True):
        ids = tokenizer.encode(toolbox.wrap(answer), add_special_tokens=False)[:Q]
        queue[r, : len(ids)], queue_len[r] = ids, len(ids)
    return ep.replace(
        waiting=jnp.zeros_like(ep.waiting),
        turns=ep.turns + jnp.asarray(waiting, jnp.int32),
        queue=jnp.asarray(queue),
        queue_len=jnp.asarray(queue_len),
        queue_pos=jnp.where(jnp.asarray(waiting), 0, ep.queue_pos),
    )


def sample_turns(
    model,
    prompt_ids,
    prompt_mask,
    config: SamplingConfig,
    rng,
    *,
    toolbox: Toolbox,
    tokenizer,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    group_size: int = 1,
) -> Rollout:
    """Responses to left-padded prompts, in turns with the tools of ``toolbox`` (see the module).

    Args:
      model: a CausalLM or an ActorCritic.  prompt_ids, prompt_mask: [B, P].
      config: how tokens are sampled; ``max_new_tokens`` N bounds the whole episode (the policy's
        tokens and the tools' together).
      toolbox: the tools and their ``ToolConfig`` (markers, max_turns, caps, timeout).
      tokenizer: decodes a call and encodes an answer (a transformers tokenizer).
      group_size: G episodes per prompt (the prompt prefilled once).
    Returns: Rollout(tokens, mask (1 at the policy's tokens only), logprobs, attention (1 at every
      token of the episode), tool_calls [B·G] int32), each [B·G, N] but tool_calls.
    """
    if isinstance(model, ActorCritic):
        model = model.lm
    ids, mask = (jnp.asarray(x, jnp.int32) for x in (prompt_ids, prompt_mask))  # [B, P]
    _check_model_and_prompts(model, ids, mask, config, {"eos_token_id": eos_token_id,
                                                        "pad_token_id": pad_token_id})  # fmt: skip
    stop_ids = tokenizer.encode(toolbox.config.call_end, add_special_tokens=False)
    if not stop_ids:
        raise ValueError(f"call_end {toolbox.config.call_end!r} encodes to no tokens")
    graphdef, state = nnx.split(model)
    settings = (
        jnp.float32(config.temperature),
        jnp.float32(1.0 if config.top_p is None else config.top_p),
        jnp.int32(-1 if eos_token_id is None else eos_token_id),
        jnp.int32(pad_token_id),
        jnp.asarray(stop_ids, jnp.int32),
    )
    static = {
        "graphdef": graphdef, "N": config.max_new_tokens, "top_k": config.top_k,
        "use_top_p": config.top_p is not None, "greedy": config.greedy,
        "max_turns": toolbox.config.max_turns, "group_size": group_size,
        "Q": toolbox.config.max_response_tokens,
    }  # fmt: skip
    ep = _start(state, ids, mask, rng, settings, **static)
    while True:
        ep = _resume(state, ep, ids, mask, rng, settings, **static)
        if int(ep.t) >= config.max_new_tokens or not bool(jnp.any(ep.waiting)):
            break
        ep = _answer_calls(ep, toolbox, tokenizer)
    return Rollout(tokens=ep.tokens, mask=ep.mask, logprobs=ep.logprobs, attention=ep.attention,
                   tool_calls=ep.turns)  # fmt: skip
