"""Rollout: KV-cache decoding equals full forward passes, greedy equals transformers, log-probs, EOS."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from models_utils import PAD, hf_checkpoint, hf_model, jit_apply, left_padded_batch

from jaxrlhf import rollout
from jaxrlhf.models import ActorCritic, CausalLM, ModelConfig, RewardModel
from jaxrlhf.models.hf import from_pretrained
from jaxrlhf.models.layers import positions_from_mask
from jaxrlhf.rl import token_logprobs
from jaxrlhf.rollout import Rollout, filter_logits, generate

IDS, MASK = left_padded_batch(seed=1, lengths=(6, 3, 1), width=6)  # [3, 6]
TINY = {
    "vocab_size": 97,
    "hidden_size": 32,
    "num_layers": 1,
    "num_heads": 4,
    "max_position_embeddings": 64,
}
CONFIGS = {
    "gpt2": ModelConfig(family="gpt2", **TINY),
    "llama": ModelConfig(family="llama", num_kv_heads=2, tie_word_embeddings=False, **TINY),
}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cached_decode_logits_equal_a_full_forward_pass(family):
    model = CausalLM(CONFIGS[family], rngs=nnx.Rngs(0))
    new = jnp.array([[5, 6, 7], [8, 9, 10], [11, 12, 13]], jnp.int32)  # three decoded tokens
    B, P = IDS.shape
    kv_mask = jnp.concatenate([MASK, jnp.ones((B, 3), jnp.int32)], axis=1)  # [B, P + 3]
    cache = model.init_cache(B, P + 3)
    # Prefill the prompt, then one token at a time at slot P + t (as generate does).
    logits, cache = jit_apply(
        model, IDS, positions_from_mask(MASK), kv_mask, cache, 0, method="forward_cached"
    )
    steps = [logits]
    for t in range(3):
        position = (MASK.sum(-1) + t)[:, None]  # [B, 1]
        logits, cache = jit_apply(
            model, new[:, t : t + 1], position, kv_mask, cache, P + t, method="forward_cached"
        )
        steps.append(logits)
    cached = np.asarray(jnp.concatenate(steps, axis=1))  # [B, P + 3, V]
    full_ids = jnp.concatenate([IDS, new], axis=1)
    full_mask = jnp.concatenate([MASK, jnp.ones_like(new)], axis=1)
    full = np.asarray(jit_apply(model, full_ids, full_mask))  # [B, P + 3, V]
    valid = np.asarray(full_mask, bool)
    np.testing.assert_allclose(cached[valid], full[valid], atol=1e-5)


def _hf_greedy(name, ids, mask, n, eos):
    with torch.no_grad():
        out = hf_model(name).generate(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=PAD,
        )
    out = out[:, ids.shape[1] :].numpy()
    return np.pad(out, ((0, 0), (0, n - out.shape[1])), constant_values=PAD)  # stopped early


@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2"])
def test_greedy_decoding_equals_transformers_generate(name):
    model = from_pretrained(hf_checkpoint(name))
    n = 10
    # An EOS that stops row 0 after 3 tokens: the token transformers' greedy picks there.
    eos = int(_hf_greedy(name, IDS, MASK, n, eos=None)[0, 2])
    expected = _hf_greedy(name, IDS, MASK, n, eos=eos)
    assert expected[0, 2] == eos and np.all(expected[0, 3:] == PAD)
    ours = generate(
        model, IDS, MASK, max_new_tokens=n, rng=jax.random.key(0), greedy=True, eos_token_id=eos
    )
    np.testing.assert_array_equal(ours.tokens, expected)


def test_eos_handling_masks_and_pads_after_the_eos():
    model = CausalLM(CONFIGS["llama"], rngs=nnx.Rngs(3))
    free = generate(model, IDS, MASK, max_new_tokens=6, rng=jax.random.key(0), greedy=True)
    row0 = np.asarray(free.tokens[0])
    # The EOS: the first token of row 0 (after its first) not generated earlier in that row.
    stop = next(k for k in range(1, 6) if row0[k] not in row0[:k])
    eos = int(row0[stop])
    first_eos = [int(np.argmax(row == eos)) if (row == eos).any() else None for row in free.tokens]
    out = generate(
        model,
        IDS,
        MASK,
        max_new_tokens=6,
        rng=jax.random.key(0),
        greedy=True,
        eos_token_id=eos,
        pad_token_id=PAD,
    )
    assert isinstance(out, Rollout)
    assert out.tokens.dtype == jnp.int32 and out.mask.dtype == jnp.float32
    for b, k in enumerate(first_eos):
        k = 6 if k is None else k + 1  # tokens up to and including the EOS are valid
        np.testing.assert_array_equal(out.tokens[b, :k], free.tokens[b, :k])
        np.testing.assert_array_equal(out.tokens[b, k:], PAD)
        np.testing.assert_array_equal(out.mask[b], [1.0] * k + [0.0] * (6 - k))
        np.testing.assert_array_equal(out.logprobs[b, k:], 0.0)
        assert np.all(out.logprobs[b, :k] < 0)
    assert first_eos[0] == stop


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_sampled_logprobs_equal_a_recomputed_forward_pass(family):
    model = ActorCritic(CONFIGS[family], rngs=nnx.Rngs(1))  # generate uses its .lm
    n, temperature = 6, 0.7
    out = generate(
        model,
        IDS,
        MASK,
        max_new_tokens=n,
        rng=jax.random.key(4),
        temperature=temperature,
        top_k=40,
        top_p=0.95,
        eos_token_id=3,
    )
    full_ids = jnp.concatenate([IDS, out.tokens], axis=1)
    full_mask = jnp.concatenate([MASK, out.mask.astype(jnp.int32)], axis=1)
    logits, _ = jit_apply(model, full_ids, full_mask)  # [B, P + N, V]
    P = IDS.shape[1]
    # logits[:, t] predict token t + 1: the response tokens are predicted by positions P−1 … P+N−2.
    recomputed = token_logprobs(logits[:, P - 1 : -1], out.tokens, temperature=temperature)
    np.testing.assert_allclose(out.logprobs * out.mask, recomputed * out.mask, atol=2e-5)


def test_sampling_follows_the_temperature_scaled_softmax():
    logits = jnp.tile(jnp.array([[2.0, 1.0, 0.0, -1.0, 0.5]]), (4000, 1))  # [4000, 5]
    sample = jax.jit(
        lambda rng: rollout.sample_token(
            logits, rng, temperature=2.0, top_k=None, top_p=None, greedy=False
        )
    )
    tokens = np.asarray(sample(jax.random.key(0)))
    expected = np.asarray(jax.nn.softmax(logits[0] / 2.0))  # [0.34, 0.21, 0.13, 0.08, 0.17]
    counts = np.bincount(tokens, minlength=5) / 4000
    # Frequencies of 4000 draws are within ±0.03 (≈ 4 standard errors) of the probabilities.
    np.testing.assert_allclose(counts, expected, atol=0.03)


def test_filter_logits_hand_derived():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    inf = -np.inf
    # top_p 0.8: mass before each token = [0, 0.5, 0.8, 0.95]; kept iff < 0.8 → the first two.
    np.testing.assert_allclose(
        filter_logits(logits, top_p=0.8), [[np.log(0.5), np.log(0.3), inf, inf]], rtol=1e-6
    )
    np.testing.assert_allclose(
        filter_logits(logits, top_p=0.81),
        [[np.log(0.5), np.log(0.3), np.log(0.15), inf]],
        rtol=1e-6,
    )
    np.testing.assert_allclose(filter_logits(logits, top_p=1.0), logits)
    np.testing.assert_allclose(filter_logits(logits, top_k=1), [[np.log(0.5), inf, inf, inf]])


def test_top_k_one_equals_greedy_and_no_retrace():
    model = CausalLM(CONFIGS["llama"], rngs=nnx.Rngs(0))
    greedy = generate(model, IDS, MASK, max_new_tokens=6, rng=jax.random.key(0), greedy=True)
    count = rollout._TRACES["count"]
    top1 = generate(model, IDS, MASK, max_new_tokens=6, rng=jax.random.key(1), top_k=1)
    np.testing.assert_array_equal(top1.tokens, greedy.tokens)
    assert rollout._TRACES["count"] == count + 1  # a new static argument (top_k): one trace
    # New parameters (a training step), a new key and temperature: the compiled function is reused.
    nnx.update(model, jax.tree.map(lambda x: x * 1.01, nnx.state(model)))
    generate(model, IDS, MASK, max_new_tokens=6, rng=jax.random.key(2), top_k=1, temperature=0.5)
    assert rollout._TRACES["count"] == count + 1


def test_generate_errors():
    model = CausalLM(CONFIGS["gpt2"], rngs=nnx.Rngs(0))
    key = jax.random.key(0)
    with pytest.raises(TypeError, match="RewardModel"):
        generate(
            RewardModel(CONFIGS["gpt2"], rngs=nnx.Rngs(0)), IDS, MASK, max_new_tokens=2, rng=key
        )
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, IDS, MASK, max_new_tokens=0, rng=key)
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        generate(model, IDS, MASK, max_new_tokens=60, rng=key)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, IDS, MASK, max_new_tokens=2, rng=key, top_p=0.0)
    with pytest.raises(ValueError, match="attention_mask"):
        generate(model, IDS, MASK[:, 1:], max_new_tokens=2, rng=key)
