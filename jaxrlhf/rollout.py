"""Rollout: sample responses from the actor, and score prompt ⧺ response with a reward model.

    prompts [B, P] (left-padded) ──prefill──▶ KV cache (P slots filled) + logits z₀ of the next token
    for t = 0 … N−1:  aₜ ~ p̃ₜ = softmax(filter(zₜ / τ))   (filter: top-k, then top-p; identity if off)
                      logprobsₜ = log p̃ₜ(aₜ)                (the distribution aₜ was drawn from)
                      run aₜ through the model once, writing its keys/values into slot P + t.

``sample(model, prompt_ids, prompt_mask, SamplingConfig(...), rng)`` is the one entry point (the CLI,
the demo, preference collection and the PPO trainer call it); ``generate`` is the same with the
settings as keyword arguments. Episodes in turns with tools: ``jaxrlhf.tools.sample_turns``.

Where a decode step's time goes (CPU, batch 16): the weight matmuls, which stream every parameter
once per step; attention over the cache; drawing the random numbers. So the loop is shaped to spend
nothing else:
  • the cache grows in buckets (``decode_chunks``): steps 1 … 32 attend over P + 32 slots, the next 32
    over P + 64, then P + 128 …, so a step reads the slots filled so far (at most twice as many), not
    all P + N − 1; each bucket is one ``while`` loop whose cache is updated in place;
  • the Gumbel noise of sampling (``jax.random.categorical`` is argmax(z̃ + g)) is drawn for a block of
    steps at once, bit for bit the noise the step's own key gives, instead of one small random-bits
    loop per step;
  • the prefill runs the LM head on the last prompt position only.
``jax.jit`` caches the compiled loop per (graphdef, shapes, static arguments): new parameters or
a new temperature do not retrace.

The jitted body reads as the algorithm: ``_prefill`` → ``_first_token`` → ``_decode_bucket`` per
bucket (a loop of ``_decode_step``) → Rollout. One step's draw (``filter_logits``, ``gumbel_noise``,
``first_argmax``, ``sample_token``) lives in ``jaxrlhf.sampling`` and is re-exported here.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
from flax import nnx, struct

from jaxrlhf.config import option, require
from jaxrlhf.models.heads import ActorCritic, CausalLM
from jaxrlhf.models.layers import KVCache, positions_from_mask
from jaxrlhf.sampling import (  # the draw of one step; filter_logits and first_argmax re-exported
    filter_logits,  # noqa: F401
    first_argmax,  # noqa: F401
    gumbel_noise,
    sample_token,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How responses are sampled from a policy: length, temperature, top-k / top-p, greedy."""

    max_new_tokens: int = option(32, "Response length N: tokens generated per prompt.")
    temperature: float = option(
        1.0, "Sampling temperature τ: tokens come from softmax(logits / τ)."
    )
    top_k: int | None = option(None, "Sample only from the k most likely tokens (None: off).")
    top_p: float | None = option(
        None, "Nucleus sampling: only the most likely tokens holding this mass (None: off)."
    )
    greedy: bool = option(False, "Take the most likely token instead of sampling.")

    def __post_init__(self):
        n = self.max_new_tokens
        is_int = isinstance(n, int) and not isinstance(n, bool)
        require(is_int and n >= 1, self, "max_new_tokens", "must be an int ≥ 1")
        require(
            self.temperature > 0, self, "temperature", "must be > 0 (greedy=True takes the argmax)"
        )
        require(self.top_k is None or self.top_k >= 1, self, "top_k", "must be ≥ 1 or None")
        require(self.top_p is None or 0 < self.top_p <= 1, self, "top_p", "must be in (0, 1]")
        for name in ("top_k", "top_p"):
            unused = self.greedy and getattr(self, name) is not None
            require(not unused, self, name, "has no effect with greedy=True; leave it None")


@struct.dataclass
class Rollout:
    """Responses sampled by ``sample`` / ``generate``.

    ``logprobs`` are those of the distribution each token was actually drawn from,
    log softmax(filter(zₜ/τ))[aₜ]: with top_k/top_p they are renormalised over the kept tokens (top_k=1
    gives 0), without them they equal log π(aₜ|sₜ) at temperature τ (``rl.token_logprobs``). Greedy
    decoding draws nothing; its logprobs are the unfiltered log softmax(zₜ/τ)[aₜ].
    """

    tokens: jax.Array  # [B, N] int32 response tokens; pad_token_id after a row's EOS
    mask: jax.Array  # [B, N] float32 1 at the policy's tokens (the EOS included), 0 after EOS
    logprobs: jax.Array  # [B, N] float32 log p̃(aₜ|sₜ) of the sampling distribution; 0 if masked
    # With tools (tools.sample_turns): 1 at every token, the tools' too (mask 0); calls per row.
    attention: jax.Array | None = None  # [B, N] float32
    tool_calls: jax.Array | None = None  # [B] int32

    @property
    def attention_mask(self) -> jax.Array:
        """[B, N] the tokens a re-scoring pass attends to (``mask`` when nothing was inserted)."""
        return self.mask if self.attention is None else self.attention


FIRST_BUCKET = 32
"""Response slots of the KV cache's first bucket; each further bucket doubles them (``decode_chunks``)."""

NOISE_BLOCK_BYTES = 16 * 2**20
"""At most this much Gumbel noise ([K, B, V] float32) is drawn ahead, for K decode steps at a time."""


def decode_chunks(prompt_len: int, max_new_tokens: int, first: int | None = None):
    """How the decode steps t = 1 … N − 1 are split by cache size: ((t₀, t₁, slots), …).

    Step t feeds response token t − 1 into slot P + t − 1, so steps t₀ ≤ t < t₁ need P + t₁ − 1
    slots. Buckets hold first, 2·first, 4·first … response slots (capped at N − 1): a step attends
    over fewer than twice the slots filled so far (P + t), and there are ⌈log₂((N − 1)/first)⌉ + 1
    compiled loop bodies. Empty for N = 1.
    """
    chunks, t0, room = [], 1, first or FIRST_BUCKET
    while t0 < max_new_tokens:
        t1 = min(max_new_tokens, room + 1)
        chunks.append((t0, t1, prompt_len + t1 - 1))
        t0, room = t1, 2 * room
    return tuple(chunks)


def noise_block(batch: int, vocab_size: int, max_new_tokens: int) -> int:
    """K, the decode steps whose Gumbel noise [K, B, V] is drawn at once: ≤ NOISE_BLOCK_BYTES, ≥ 1."""
    return max(1, min(max_new_tokens - 1, NOISE_BLOCK_BYTES // (4 * batch * vocab_size)))


def decode_layout(batch: int, prompt_len: int, vocab_size: int, max_new_tokens: int) -> dict:
    """The static layout of the decode loop for B responses: ``_generate``'s ``chunks``
    (``decode_chunks``) and ``noise_steps`` (``noise_block``) keyword arguments."""
    return {
        "chunks": decode_chunks(prompt_len, max_new_tokens),
        "noise_steps": noise_block(batch, vocab_size, max_new_tokens),
    }


@struct.dataclass
class _Decoding:
    """The decode loop's carry before step t: the token step t feeds, the rows already ended, the
    cache and the responses so far."""

    t: jax.Array  # int32 scalar, the next step
    token: jax.Array  # [B] int32 response token t − 1
    done: jax.Array  # [B] bool: the row has emitted its EOS
    cache: KVCache
    tokens: jax.Array  # [B, N] int32
    mask: jax.Array  # [B, N] float32
    logprobs: jax.Array  # [B, N] float32


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Decoder:
    """What every decode step shares (traced values and the static layout; no state)."""

    lm: CausalLM
    draw: Callable  # sample_token with the sampling settings bound
    rng: jax.Array  # the key of token t is fold_in(rng, t)
    kv_mask: jax.Array  # [B, P + N − 1] int32: the prompt's mask, then 1 for every response slot
    first_position: jax.Array  # [B] int32 position of response token 0
    prompt_len: int  # P
    eos_token_id: jax.Array  # int32 scalar (−1: none)
    pad_token_id: jax.Array  # int32 scalar
    greedy: bool
    noise_steps: int  # K, steps whose noise is drawn at once (``noise_block``)


def _prefill(lm: CausalLM, input_ids, attention_mask, group_size: int):
    """The whole prompt in one pass into a cache of P slots → (logits of response token 0 [B, V],
    cache, attention_mask [B, P]). Left padding: the last slot is the last prompt token, whose
    logits predict token 0. With G > 1 each prompt is prefilled once, then G rows sample from it."""
    B, P = input_ids.shape
    cache = lm.init_cache(B, P)
    positions = positions_from_mask(attention_mask)  # [B, P]
    logits, cache = lm.forward_cached(
        input_ids, positions, attention_mask, cache, 0, last_only=True
    )  # [B, 1, V]
    logits = logits[:, 0]  # [B, V]
    if group_size > 1:
        logits, attention_mask = jax.tree.map(
            lambda x: jnp.repeat(x, group_size, axis=0), (logits, attention_mask)
        )  # [B·G, V], [B·G, P]
        cache = cache.repeat(group_size)  # [L, B·G, K, P, d]
    return logits, cache, attention_mask


def _first_token(decoder: _Decoder, logits, cache, max_new_tokens: int) -> _Decoding:
    """Response token 0, drawn from the prefill's logits with key fold_in(rng, 0): the state before
    step 1 (tokens pad_token_id, mask 0 and logprobs 0 everywhere else)."""
    B, N = logits.shape[0], max_new_tokens
    token, logprob = decoder.draw(logits, jax.random.fold_in(decoder.rng, 0))  # [B], [B]
    tokens = jnp.full((B, N), decoder.pad_token_id, jnp.int32).at[:, 0].set(token)  # [B, N]
    mask = jnp.zeros((B, N), jnp.float32).at[:, 0].set(1.0)  # [B, N]
    logprobs = jnp.zeros((B, N), jnp.float32).at[:, 0].set(logprob)  # [B, N]
    done = token == decoder.eos_token_id  # [B] (never true for eos_token_id = −1)
    return _Decoding(
        t=jnp.int32(1), token=token, done=done, cache=cache, tokens=tokens, mask=mask,
        logprobs=logprobs,
    )  # fmt: skip


def _decode_step(decoder: _Decoder, state: _Decoding, kv_mask, noise) -> _Decoding:
    """Step t: feed token t − 1 into slot P + t − 1, draw token t (``noise`` [B, V]; None when
    greedy) and write it at column t; a row that has ended writes pad_token_id, mask 0, logprob 0."""
    t = state.t
    positions = (decoder.first_position + t - 1)[:, None]  # [B, 1]
    logits, cache = decoder.lm.forward_cached(
        state.token[:, None], positions, kv_mask, state.cache, decoder.prompt_len + t - 1
    )  # [B, 1, V]
    token, logprob = decoder.draw(logits[:, 0], None, noise=noise)  # [B], [B]
    alive = ~state.done  # [B]
    token = jnp.where(alive, token, decoder.pad_token_id)  # [B]
    logprob = jnp.where(alive, logprob, 0.0)  # [B]
    tokens = jax.lax.dynamic_update_slice(state.tokens, token[:, None], (0, t))  # [B, N]
    mask = jax.lax.dynamic_update_slice(
        state.mask, alive.astype(jnp.float32)[:, None], (0, t)
    )  # [B, N]
    logprobs = jax.lax.dynamic_update_slice(state.logprobs, logprob[:, None], (0, t))  # [B, N]
    done = state.done | (token == decoder.eos_token_id)  # [B]
    return _Decoding(
        t=t + 1, token=token, done=done, cache=cache, tokens=tokens, mask=mask, logprobs=logprobs
    )


def _decode_bucket(decoder: _Decoder, state: _Decoding, t0: int, t1: int, slots: int):
    """Steps t₀ ≤ t < t₁ over a cache of ``slots`` slots (``decode_chunks``), drawing the Gumbel
    noise of K steps at a time; the loop stops early once every row has ended."""
    state = state.replace(cache=state.cache.grow(slots))  # the bucket's slots, the new ones zero
    kv_mask = decoder.kv_mask[:, :slots]  # [B, slots]
    K = t1 - t0 if decoder.greedy else min(t1 - t0, decoder.noise_steps)  # steps per block
    noise_shape = (state.token.shape[0], decoder.lm.config.vocab_size)  # (B, V)

    def running(state):
        return (state.t < t1) & ~jnp.all(state.done)

    def block(state):
        noise = None
        if not decoder.greedy:
            noise = gumbel_noise(decoder.rng, state.t + jnp.arange(K), noise_shape)  # [K, B, V]

        def body(inner):
            j, state = inner
            state = _decode_step(decoder, state, kv_mask, None if noise is None else noise[j])
            return j + 1, state

        def cond(inner):
            j, state = inner
            return (j < K) & running(state)

        return jax.lax.while_loop(cond, body, (jnp.int32(0), state))[1]

    return jax.lax.while_loop(running, block, state)


@functools.partial(
    jax.jit,
    static_argnames=(
        "graphdef",
        "max_new_tokens",
        "top_k",
        "use_top_p",
        "greedy",
        "chunks",
        "noise_steps",
        "group_size",
    ),
)
def _generate(
    state,
    input_ids,
    attention_mask,
    rng,
    temperature,
    top_p,
    eos_token_id,
    pad_token_id,
    *,
    graphdef,
    max_new_tokens: int,
    top_k,
    use_top_p: bool,
    greedy: bool,
    chunks: tuple,
    noise_steps: int,
    group_size: int = 1,
) -> Rollout:
    """The jitted body of generate: prefill → token 0 → one decode loop per cache bucket.

    temperature, top_p, eos_token_id (−1: none) and pad_token_id are traced scalars, so changing
    them does not recompile. ``chunks`` and ``noise_steps`` (``decode_layout``) are static: how the
    decode loop is laid out."""
    lm = nnx.merge(graphdef, state)
    logits, cache, attention_mask = _prefill(lm, input_ids, attention_mask, group_size)  # [B, V]
    lm, cache = lm.unstack_layers(), cache.per_layer()  # the decode loop's form (layers.KVCache)
    B, N = logits.shape[0], max_new_tokens  # B = responses
    draw = functools.partial(sample_token, temperature=temperature, top_k=top_k,
                             top_p=top_p if use_top_p else None, greedy=greedy)  # fmt: skip
    kv_mask = jnp.concatenate(
        [attention_mask.astype(jnp.int32), jnp.ones((B, N - 1), jnp.int32)], axis=1
    )  # [B, P + N − 1]
    decoder = _Decoder(
        lm=lm, draw=draw, rng=rng, kv_mask=kv_mask,
        first_position=attention_mask.astype(jnp.int32).sum(-1),  # [B]
        prompt_len=input_ids.shape[1], eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        greedy=greedy, noise_steps=noise_steps,
    )  # fmt: skip
    decoding = _first_token(decoder, logits, cache, N)
    for t0, t1, slots in chunks:
        decoding = _decode_bucket(decoder, decoding, t0, t1, slots)
    return Rollout(tokens=decoding.tokens, mask=decoding.mask, logprobs=decoding.logprobs)


def _check_model_and_prompts(model, input_ids, attention_mask, config: SamplingConfig, token_ids):
    """The checks that need the model: its type, the prompt shapes, top_k, token ids, positions."""
    if not isinstance(model, CausalLM):
        raise TypeError(f"generate needs a CausalLM or an ActorCritic, got {type(model).__name__}")
    if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape:
        raise ValueError(
            f"input_ids {input_ids.shape} and attention_mask {attention_mask.shape} must both be [B, P]"
        )
    vocab_size = model.config.vocab_size
    if config.top_k is not None and config.top_k > vocab_size:
        raise ValueError(f"top_k must be in [1, vocab_size={vocab_size}], got {config.top_k}")
    for name, value in token_ids.items():
        if value is not None and not 0 <= value < vocab_size:
            raise ValueError(f"{name}={value} is outside the vocabulary [0, {vocab_size})")
    length = input_ids.shape[1] + config.max_new_tokens
    if model.config.family == "gpt2" and length > model.config.max_position_embeddings:
        raise ValueError(
            f"prompt length {input_ids.shape[1]} + max_new_tokens {config.max_new_tokens} exceeds "
            f"the model's max_position_embeddings={model.config.max_position_embeddings}"
        )


def _run(lm: CausalLM, input_ids, attention_mask, config: SamplingConfig, rng, *, eos_token_id,
         pad_token_id: int, group_size: int) -> Rollout:  # fmt: skip
    """``_generate`` on checked inputs: the settings as traced scalars or static arguments."""
    graphdef, state = nnx.split(lm)
    B, P = input_ids.shape
    return _generate(
        state,
        input_ids,
        attention_mask,
        rng,
        jnp.float32(config.temperature),
        jnp.float32(1.0 if config.top_p is None else config.top_p),
        jnp.int32(-1 if eos_token_id is None else eos_token_id),
        jnp.int32(pad_token_id),
        graphdef=graphdef,
        max_new_tokens=config.max_new_tokens,
        top_k=config.top_k,
        use_top_p=config.top_p is not None,
        greedy=config.greedy,
        group_size=group_size,
        **decode_layout(B * group_size, P, lm.config.vocab_size, config.max_new_tokens),
    )


def generate(
    model,
    input_ids,
    attention_mask,
    *,
    max_new_tokens: int,
    rng,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    greedy: bool = False,
    group_size: int = 1,
) -> Rollout:
    """Sample ``max_new_tokens`` response tokens for a batch of left-padded prompts.

    aₜ ~ softmax(z̃ₜ),  z̃ₜ = filter(zₜ / τ),   logprobsₜ = log softmax(z̃ₜ)[aₜ]

    ``logprobs`` are those of the distribution the token was drawn from: renormalised over the tokens
    top_k / top_p keep (top_k=1 ⇒ 0), and without a filter log softmax(zₜ/τ)[aₜ], the quantity PPO
    recomputes at training time (``rl.token_logprobs``). Greedy decoding takes argmax zₜ and records
    the unfiltered log softmax(zₜ/τ)[aₜ]. After a row's EOS (which is itself valid, mask 1) tokens
    are ``pad_token_id`` with mask 0 and logprobs 0. The settings are validated as a
    :class:`SamplingConfig` (``sample`` takes one directly).

    Args:
      model: a CausalLM, or an ActorCritic (its ``.lm`` generates).
      input_ids: [B, P] int prompt tokens, LEFT-padded.
      attention_mask: [B, P] 1 at real prompt tokens.
      max_new_tokens: N ≥ 1.
      rng: a jax.random key.
      group_size: G responses per prompt: rows i·G … i·G + G − 1 answer prompt i, which is
        prefilled once (what repeating each prompt G times samples, up to float rounding, for
        P·(G − 1) fewer token passes per prompt).
    Returns: Rollout(tokens [B·G, N] int32, mask [B·G, N] float32, logprobs [B·G, N] float32).
    """
    if group_size < 1:
        raise ValueError(f"group_size must be ≥ 1, got {group_size}")
    config = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, greedy=greedy)  # fmt: skip
    if isinstance(model, ActorCritic):
        model = model.lm
    input_ids = jnp.asarray(input_ids, jnp.int32)  # [B, P]
    attention_mask = jnp.asarray(attention_mask, jnp.int32)  # [B, P]
    token_ids = {"eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
    _check_model_and_prompts(model, input_ids, attention_mask, config, token_ids)
    return _run(model, input_ids, attention_mask, config, rng, eos_token_id=eos_token_id,
                pad_token_id=pad_token_id, group_size=group_size)  # fmt: skip


def sample(
    model,
    prompt_ids,
    prompt_mask,
    config: SamplingConfig,
    rng,
    *,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    group_size: int = 1,
) -> Rollout:
    """Responses of ``model`` to left-padded prompts, sampled as ``config`` says: the one entry point.

    aₜ ~ softmax(filter(zₜ / τ)),   logprobsₜ = log softmax(filter(zₜ / τ))[aₜ]   (:func:`generate`)

    Works eagerly and inside another ``jax.jit`` (``model`` may be merged from traced parameters).

    Args:
      model: a CausalLM or an ActorCritic.
      prompt_ids, prompt_mask: [B, P] left-padded prompts.
      config: a SamplingConfig.
      rng: a jax.random key.
      eos_token_id: ends a row (None: rows run to max_new_tokens).  pad_token_id: fills after EOS.
      group_size: G responses per prompt (rows i·G … i·G + G − 1 answer prompt i; run once).
    Returns: Rollout(tokens [B·G, N], mask [B·G, N], logprobs [B·G, N]), N = config.max_new_tokens.
    """
    if not isinstance(config, SamplingConfig):
        raise TypeError(f"sample needs a SamplingConfig, got {type(config).__name__}")
    return generate(
        model,
        prompt_ids,
        prompt_mask,
        rng=rng,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        group_size=group_size,
        **dataclasses.asdict(config),
    )


# ---------------------------------------------------------------------- prompt ⧺ response


def concat_prompt_response(prompt_ids, prompt_mask, response_ids, response_mask):
    """prompt ⧺ response: ids [B, P + N] and attention mask [B, P + N] (int32). Prompts are
    left-padded and responses end in padding: a row's last valid token is its last response token."""
    chex.assert_rank([prompt_ids, prompt_mask, response_ids, response_mask], 2)
    input_ids = jnp.concatenate(
        [prompt_ids, response_ids.astype(prompt_ids.dtype)], axis=1
    )  # [B, P + N]
    mask = jnp.concatenate(
        [prompt_mask.astype(jnp.int32), response_mask.astype(jnp.int32)], axis=1
    )  # [B, P + N]
    return input_ids, mask


def sequences(prompt_ids, prompt_mask, rollout: Rollout):
    """prompt ⧺ a Rollout's responses: (ids, attention mask) [B, P + N] (tools' tokens included)."""
    return concat_prompt_response(prompt_ids, prompt_mask, rollout.tokens, rollout.attention_mask)


def response_slice(x, prompt_len: int, response_len: int):
    """The positions whose outputs score the response: x[:, P−1 : P−1+N].

    logits[:, t] predict token t + 1, so response token j (at P + j) is scored by position P − 1 + j;
    likewise the value of the state before response token j is values[:, P − 1 + j].
    """
    return x[:, prompt_len - 1 : prompt_len - 1 + response_len]


def score_sequences(reward_model, prompt_ids, prompt_mask, response_ids, response_mask):
    """The reward model's score of each prompt ⧺ response: r_φ(x ⧺ y) → [B].

    A RewardModel reads its head at the last valid token of the concatenation: the response's last
    valid token (its EOS, or the last generated token without one). Pure: call it inside ``jax.jit``
    with a model merged from its state.

    Args:
      reward_model: a RewardModel (ids [B, L], mask [B, L] → scores [B]).
      prompt_ids, prompt_mask: [B, P] left-padded prompts.
      response_ids, response_mask: [B, N] responses (a Rollout's tokens and mask).
    Returns: [B] float32 scores.
    """
    chex.assert_equal_shape([prompt_ids, prompt_mask])
    chex.assert_equal_shape([response_ids, response_mask])
    ids, mask = concat_prompt_response(prompt_ids, prompt_mask, response_ids, response_mask)
    scores = reward_model(ids, mask)  # [B]
    chex.assert_shape(scores, (prompt_ids.shape[0],))
    return scores
