"""Rollout: sample responses from the actor with a jitted prefill and a KV-cache decode loop.

    prompts [B, P] (left-padded) ──prefill──▶ KV cache (P slots filled) + logits of the next token
    for t = 0 … N−1:  aₜ ~ softmax(zₜ / τ) (top-k / top-p filtered);  log π(aₜ|sₜ) from the same zₜ;
                      run aₜ through the model once, writing its keys/values into slot P + t.

The cache is preallocated with P + N − 1 slots, so every decode step does the same work whatever t is.
The compiled function is cached by ``jax.jit`` per (graphdef, shapes, static arguments): calling
``generate`` again in a training loop with new parameters does not retrace.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx, struct

from jaxrlhf.models.heads import ActorCritic, CausalLM
from jaxrlhf.models.layers import positions_from_mask
from jaxrlhf.rl import token_logprobs


@struct.dataclass
class Rollout:
    """Responses sampled by ``generate``."""

    tokens: jax.Array  # [B, N] int32 response tokens; pad_token_id after a row's EOS
    mask: jax.Array  # [B, N] float32 1 at valid response tokens (the EOS included), 0 after it
    logprobs: (
        jax.Array
    )  # [B, N] float32 log π(aₜ|sₜ) under the temperature-scaled policy; 0 if masked


def filter_logits(logits, *, top_k: int | None = None, top_p=None):
    """Keep the top_k largest logits, then the smallest set of most likely tokens whose probability
    mass reaches top_p (nucleus sampling, Holtzman et al. 2019); the rest become −∞.

    A token is kept by top_p iff the mass of the tokens strictly more likely than it is < top_p, so
    the most likely token is always kept. logits: [B, V] (already divided by the temperature).
    """
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [B, 1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V] descending
        probs = jax.nn.softmax(sorted_logits, axis=-1)  # [B, V]
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # [B, V]
        keep = mass_before < top_p  # [B, V]
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def sample_token(logits, rng, *, temperature, top_k, top_p, greedy: bool):
    """One token per row: argmax (greedy) or a draw from softmax(filter(logits / τ)). [B, V] → [B]."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = filter_logits(logits / temperature, top_k=top_k, top_p=top_p)  # [B, V]
    return jax.random.categorical(rng, scaled, axis=-1).astype(jnp.int32)


_TRACES = {
    "count": 0
}  # incremented each time _generate is traced (tests check there is no retrace)


@functools.partial(
    jax.jit,
    static_argnames=(
        "graphdef",
        "max_new_tokens",
        "top_k",
        "use_top_p",
        "greedy",
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
) -> Rollout:
    """The jitted body of generate. temperature, top_p, eos_token_id (−1: none) and pad_token_id are
    traced scalars, so changing them does not recompile."""
    _TRACES["count"] += 1
    lm = nnx.merge(graphdef, state)
    B, P = input_ids.shape
    N = max_new_tokens
    top_p = top_p if use_top_p else None
    sample = functools.partial(
        sample_token, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy
    )

    def logprob(step_logits, token):  # [B, V], [B] → [B]
        return token_logprobs(step_logits[:, None], token[:, None], temperature=temperature)[:, 0]

    def is_eos(token):  # [B] → [B] bool (never true for eos_token_id = −1)
        return token == eos_token_id

    # Prefill: the whole prompt in one pass; slots P … P+N−2 will hold generated tokens 0 … N−2.
    kv_mask = jnp.concatenate(
        [attention_mask.astype(jnp.int32), jnp.ones((B, N - 1), jnp.int32)], axis=1
    )  # [B, P + N − 1]
    cache = lm.init_cache(B, P + N - 1)
    positions = positions_from_mask(attention_mask)  # [B, P]
    logits, cache = lm.forward_cached(input_ids, positions, kv_mask, cache, 0)  # [B, P, V]
    first_position = attention_mask.astype(jnp.int32).sum(-1)  # [B] position of response token 0

    step_logits = logits[:, -1]  # [B, V] (left padding: the last slot is the last prompt token)
    token = sample(step_logits, jax.random.fold_in(rng, 0))  # [B]
    tokens = jnp.full((B, N), pad_token_id, jnp.int32).at[:, 0].set(token)  # [B, N]
    mask = jnp.zeros((B, N), jnp.float32).at[:, 0].set(1.0)  # [B, N]
    logprobs = jnp.zeros((B, N), jnp.float32).at[:, 0].set(logprob(step_logits, token))
    done = is_eos(token)  # [B]

    def cond(carry):
        t, _, done, *_ = carry
        return (t < N) & ~jnp.all(done)

    def body(carry):
        t, previous, done, cache, tokens, mask, logprobs = carry
        # Feed token t−1 (slot P + t − 1), get the distribution of token t.
        positions = (first_position + t - 1)[:, None]  # [B, 1]
        logits, cache = lm.forward_cached(previous[:, None], positions, kv_mask, cache, P + t - 1)
        step_logits = logits[:, 0]  # [B, V]
        token = sample(step_logits, jax.random.fold_in(rng, t))  # [B]
        alive = ~done  # [B]
        token = jnp.where(alive, token, pad_token_id)
        tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, t))
        mask = jax.lax.dynamic_update_slice(mask, alive.astype(jnp.float32)[:, None], (0, t))
        lp = jnp.where(alive, logprob(step_logits, token), 0.0)  # [B]
        logprobs = jax.lax.dynamic_update_slice(logprobs, lp[:, None], (0, t))
        done = done | is_eos(token)
        return t + 1, token, done, cache, tokens, mask, logprobs

    carry = (jnp.int32(1), token, done, cache, tokens, mask, logprobs)
    _, _, _, _, tokens, mask, logprobs = jax.lax.while_loop(cond, body, carry)
    return Rollout(tokens=tokens, mask=mask, logprobs=logprobs)


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
) -> Rollout:
    """Sample ``max_new_tokens`` response tokens for a batch of left-padded prompts.

    aₜ ~ softmax(filter(zₜ / τ)),   logprobsₜ = log softmax(zₜ / τ)[aₜ]   (jaxrlhf.rl.token_logprobs)

    top_k / top_p only filter what is sampled; ``logprobs`` are those of the temperature-scaled
    policy, the same quantity PPO recomputes at training time. Greedy decoding takes the argmax.
    After a row's EOS (which is itself valid, mask 1) tokens are ``pad_token_id`` with mask 0.

    Args:
      model: a CausalLM, or an ActorCritic (its ``.lm`` generates).
      input_ids: [B, P] int prompt tokens, LEFT-padded.
      attention_mask: [B, P] 1 at real prompt tokens.
      max_new_tokens: N ≥ 1.
      rng: a jax.random key.
    Returns: Rollout(tokens [B, N] int32, mask [B, N] float32, logprobs [B, N] float32).
    """
    if isinstance(model, ActorCritic):
        model = model.lm
    if not isinstance(model, CausalLM):
        raise TypeError(f"generate needs a CausalLM or an ActorCritic, got {type(model).__name__}")
    input_ids = jnp.asarray(input_ids, jnp.int32)
    attention_mask = jnp.asarray(attention_mask, jnp.int32)
    if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape:
        raise ValueError(
            f"input_ids {input_ids.shape} and attention_mask {attention_mask.shape} must both be [B, P]"
        )
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int ≥ 1, got {max_new_tokens!r}")
    if not greedy and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    config = model.config
    if top_k is not None and not 1 <= top_k <= config.vocab_size:
        raise ValueError(f"top_k must be in [1, vocab_size={config.vocab_size}], got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    for name, value in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
        if value is not None and not 0 <= value < config.vocab_size:
            raise ValueError(f"{name}={value} is outside the vocabulary [0, {config.vocab_size})")
    length = input_ids.shape[1] + max_new_tokens
    if config.family == "gpt2" and length > config.max_position_embeddings:
        raise ValueError(
            f"prompt length {input_ids.shape[1]} + max_new_tokens {max_new_tokens} exceeds the "
            f"model's max_position_embeddings={config.max_position_embeddings}"
        )
    graphdef, state = nnx.split(model)
    return _generate(
        state,
        input_ids,
        attention_mask,
        rng,
        jnp.float32(temperature),
        jnp.float32(1.0 if top_p is None else top_p),
        jnp.int32(-1 if eos_token_id is None else eos_token_id),
        jnp.int32(pad_token_id),
        graphdef=graphdef,
        max_new_tokens=max_new_tokens,
        top_k=top_k,
        use_top_p=top_p is not None,
        greedy=greedy,
    )
