"""Log-probabilities and entropy from hidden states, the LM head applied a chunk of tokens at a time.

    zₜ = hₜ · Wᵀ / τ                                   (W: [V, D], the LM head or tied embedding)
    log π(aₜ|sₜ) = zₜ[aₜ] − logsumexp(zₜ)
    H(π(·|sₜ)) = logsumexp(zₜ) − Σ_v softmax(zₜ)_v · zₜ[v]

``rl.token_logprobs`` and ``rl.token_entropy`` compute the same from logits [..., T, V]: the
readable reference, and what the tests compare this with. A loss built on them holds the float32
logits of every scored token of the minibatch at once, and their gradient in the backward pass:
for Qwen2.5-0.5B (V = 151,936) and 1,024 tokens, 0.6 GiB each, and several such buffers. Here the
M scored tokens are cut into chunks of C, and a ``lax.scan`` over the chunks computes each chunk's
logits, keeps its [C] log-probs and entropies, and drops the [C, V] logits; the body is under
``jax.checkpoint``, so the backward pass recomputes one chunk's logits at a time too. At most one
[C, V] block (and its cotangent) is live: memory O(C·V) instead of O(M·V), for one more matmul of
the head in the backward pass.

Why a rematerialised scan and not a hand-written VJP (MaxText's vocabulary tiling, Cut
Cross-Entropy): both keep one chunk's logits; the scan gets its gradient, entropy's included, from
autodiff, so there is no backward formula to keep in step with the forward one, and the head's
weight gradient is summed over chunks by the scan itself.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp

CHUNK_BYTES = 64 * 2**20  # the default chunk: its float32 logits [C, V] fill at most 64 MiB


def default_chunk(num_tokens: int, vocab_size: int) -> int:
    """The chunk size used when none is given: as many tokens as fit CHUNK_BYTES of float32
    logits, at most ``num_tokens`` (then there is one chunk: the plain computation)."""
    return max(1, min(num_tokens, CHUNK_BYTES // (4 * vocab_size)))


def _chunk_terms(hidden, *, weight, tokens, temperature, entropy, entropy_grad):
    """One chunk: hidden [C, D], weight [V, D], tokens [C] → (logprobs [C], entropy [C])."""
    logits = jnp.einsum(
        "cd,vd->cv", hidden, weight.astype(hidden.dtype), preferred_element_type=jnp.float32
    )  # [C, V] float32
    logits = logits / temperature
    lse = jax.nn.logsumexp(logits, axis=-1)  # [C]
    picked = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0]  # [C]
    if not entropy:
        return picked - lse, jnp.zeros_like(lse)
    z = logits if entropy_grad else jax.lax.stop_gradient(logits)
    z_lse = lse if entropy_grad else jax.lax.stop_gradient(lse)
    probs = jnp.exp(z - z_lse[:, None])  # [C, V]
    return picked - lse, z_lse - jnp.sum(probs * z, axis=-1)


def head_logprobs(
    hidden,
    weight,
    tokens,
    *,
    temperature: float = 1.0,
    logits_chunk_size: int | None = None,
    entropy: bool = False,
    entropy_grad: bool = False,
):
    """log π(aₜ|sₜ) (and the entropy H(π(·|sₜ))) of ``tokens`` from the final hidden states, the
    LM head applied ``logits_chunk_size`` tokens at a time (module docstring).

    Args:
      hidden: [..., T, D] final-norm hidden states; hidden[..., t] predicts tokens[..., t].
      weight: [V, D] the LM head's matrix (the tied embedding, or the untied kernel transposed).
      tokens: [..., T] integer ids.
      temperature: τ > 0.
      logits_chunk_size: tokens per chunk C, in [1, M] for the M = prod(...)·T tokens given;
        None: :func:`default_chunk`.
      entropy: also return the entropy (else zeros).
      entropy_grad: let the entropy's gradient flow (only a loss with an entropy bonus needs it:
        without, its backward pass is not computed).
    Returns:
      (logprobs [..., T], entropy [..., T]), float32.
    """
    chex.assert_rank(weight, 2)
    if hidden.shape[:-1] != tokens.shape or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden {hidden.shape}, tokens {tokens.shape} and weight {weight.shape} do not match: "
            "hidden must be tokens plus a [D] axis and weight [V, D]"
        )
    lead, D = tokens.shape, hidden.shape[-1]
    M = max(1, int(tokens.size))
    C = default_chunk(M, weight.shape[0]) if logits_chunk_size is None else logits_chunk_size
    if not 1 <= C <= M:
        raise ValueError(
            f"logits_chunk_size = {C}: must be in [1, {M}] (the number of tokens scored here)"
        )
    chunks = -(-M // C)
    terms = functools.partial(
        _chunk_terms, weight=weight, temperature=temperature, entropy=entropy,
        entropy_grad=entropy_grad,
    )  # fmt: skip
    if chunks == 1:  # all logits fit one chunk: the plain computation, nothing recomputed
        logprobs, ent = terms(hidden.reshape(-1, D), tokens=tokens.reshape(-1).astype(jnp.int32))
        return logprobs.reshape(lead), ent.reshape(lead)
    pad = chunks * C - M
    h = jnp.pad(hidden.reshape(-1, D), ((0, pad), (0, 0))).reshape(chunks, C, D)
    t = jnp.pad(tokens.reshape(-1).astype(jnp.int32), (0, pad)).reshape(chunks, C)

    @jax.checkpoint  # the backward pass recomputes the chunk's logits instead of storing them
    def body(carry, xs):
        return carry, terms(xs[0], tokens=xs[1])

    _, (logprobs, ent) = jax.lax.scan(body, None, (h, t))  # [chunks, C] each
    logprobs, ent = (x.reshape(-1)[:M].reshape(lead) for x in (logprobs, ent))
    return logprobs, ent
