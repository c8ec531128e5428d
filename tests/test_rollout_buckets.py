"""The decode loop's layout (cache buckets, Gumbel noise drawn ahead) changes nothing it samples:
long generations across several buckets equal a step-by-step oracle of full forward passes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from models_utils import left_padded_batch

from jaxrlhf import rollout
from jaxrlhf.models import CausalLM, ModelConfig
from jaxrlhf.models.layers import KVCache
from jaxrlhf.rollout import decode_chunks, generate, gumbel_noise

IDS, MASK = left_padded_batch(seed=2, lengths=(5, 2, 1), width=5)  # [3, 5]
CONFIG = ModelConfig(
    family="llama",
    vocab_size=97,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    max_position_embeddings=64,
)


def test_decode_chunks_hand_values():
    # Step t writes slot P + t − 1: steps 1 … 32 need P + 32 slots, 33 … 63 need P + 63.
    assert decode_chunks(16, 64) == ((1, 33, 48), (33, 64, 79))
    assert decode_chunks(16, 130) == ((1, 33, 48), (33, 65, 80), (65, 129, 144), (129, 130, 145))
    assert decode_chunks(5, 20, first=4) == ((1, 5, 9), (5, 9, 13), (9, 17, 21), (17, 20, 24))
    assert decode_chunks(7, 2) == ((1, 2, 8),) and decode_chunks(7, 1) == ()


def test_cache_grow_keeps_the_filled_slots_and_adds_zeros():
    cache = KVCache.zeros(CONFIG, 2, 3)
    L, K, d = CONFIG.num_layers, CONFIG.num_kv_heads, CONFIG.head_dim
    assert cache.keys.shape == (L, 2, K, 3, d)  # stacked like the scanned blocks
    keys = cache.keys + jnp.arange(1, L + 1)[:, None, None, None, None]  # layer l holds l + 1
    grown = cache.replace(keys=keys, values=keys).grow(5)
    assert grown.length == 5 and grown.keys.shape == (L, 2, K, 5, d)
    np.testing.assert_array_equal(grown.keys[:, :, :, :3], keys)
    np.testing.assert_array_equal(grown.values[:, :, :, 3:], 0.0)
    repeated = grown.repeat(3)  # each row three times, rows stay in order
    assert repeated.keys.shape == (L, 6, K, 5, d)
    np.testing.assert_array_equal(repeated.keys[:, 3:6], jnp.repeat(grown.keys[:, 1:2], 3, axis=1))
    with pytest.raises(ValueError, match="cannot grow a cache of 5 slots to 4"):
        grown.grow(4)
    # The per-layer form (what the decode loop carries) holds the same numbers, layer by layer, and
    # grows and repeats to the same numbers.
    per_layer = cache.replace(keys=keys, values=keys).per_layer()
    assert not per_layer.is_stacked and len(per_layer.keys) == L
    assert per_layer.keys[1].shape == (2, K, 3, d) and per_layer.length == 3
    np.testing.assert_array_equal(per_layer.keys[1], keys[1])
    for a, b in zip(
        jax.tree.leaves(per_layer.grow(5).repeat(3).stacked()), jax.tree.leaves(repeated)
    ):
        np.testing.assert_array_equal(a, b)


def test_gumbel_noise_drawn_ahead_is_the_noise_of_each_steps_key():
    rng = jax.random.key(7)
    noise = gumbel_noise(rng, jnp.arange(3, 7), (2, 5))  # [4, 2, 5]
    logits = jax.random.normal(jax.random.key(1), (2, 5)) * 3  # [2, 5]
    for j, t in enumerate(range(3, 7)):
        key = jax.random.fold_in(rng, t)
        np.testing.assert_array_equal(noise[j], jax.random.gumbel(key, (2, 5)))
        np.testing.assert_array_equal(  # Gumbel-max is jax.random.categorical's own draw
            jnp.argmax(logits + noise[j], -1), jax.random.categorical(key, logits)
        )


@functools.partial(jax.jit, static_argnames="graphdef")
def _full_logits(graphdef, state, ids, mask):
    return nnx.merge(graphdef, state)(ids, mask)  # [B, L, V]


def _oracle(model, n: int, rng, temperature: float, greedy: bool):
    """Token t ~ softmax(z/τ) (argmax z when greedy) with z from a full forward pass, no cache,
    of prompt ⧺ tokens 0 … t−1 (right-padded to P + N); the key of token t is fold_in(rng, t)."""
    B, P = IDS.shape
    ids = np.concatenate([IDS, np.zeros((B, n), np.int32)], axis=1)  # [B, P + N]
    mask = np.concatenate([MASK, np.zeros((B, n), np.int32)], axis=1)
    graphdef, state = nnx.split(model)
    logprobs = np.zeros((B, n), np.float32)
    for t in range(n):
        z = _full_logits(graphdef, state, ids, mask)[:, P + t - 1] / temperature  # [B, V]
        if greedy:
            token = np.asarray(jnp.argmax(z, -1))
        else:
            token = np.asarray(jax.random.categorical(jax.random.fold_in(rng, t), z))
        logprobs[:, t] = np.asarray(jax.nn.log_softmax(z))[np.arange(B), token]
        ids[:, P + t], mask[:, P + t] = token, 1
    return ids[:, P:], logprobs


@pytest.mark.parametrize("greedy", [False, True])
def test_generation_across_buckets_and_noise_blocks_equals_the_oracle(greedy, monkeypatch):
    n, rng = 23, jax.random.key(3)
    model = CausalLM(CONFIG, rngs=nnx.Rngs(5))
    tokens, logprobs = _oracle(model, n, rng, 0.8, greedy)
    # Buckets of 4, 8, 16, 22 response slots, noise drawn 3 steps at a time (B·V·4 bytes a step).
    monkeypatch.setattr(rollout, "FIRST_BUCKET", 4)
    monkeypatch.setattr(rollout, "NOISE_BLOCK_BYTES", 3 * 4 * IDS.shape[0] * CONFIG.vocab_size)
    assert len(decode_chunks(IDS.shape[1], n)) == 4
    out = generate(model, IDS, MASK, max_new_tokens=n, rng=rng, temperature=0.8, greedy=greedy)
    np.testing.assert_array_equal(out.tokens, tokens)
    np.testing.assert_allclose(out.logprobs, logprobs, atol=2e-5)
    # The default layout (one bucket of 32 for N = 23, one noise block) samples the same.
    monkeypatch.undo()
    again = generate(model, IDS, MASK, max_new_tokens=n, rng=rng, temperature=0.8, greedy=greedy)
    np.testing.assert_array_equal(again.tokens, tokens)
