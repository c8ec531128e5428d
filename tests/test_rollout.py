"""Rollout: KV-cache decoding equals full forward passes, greedy equals transformers, the log-probs
are those of the distribution sampled from, EOS, no retrace, prompt ⧺ response and its score."""

import dataclasses

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
from jaxrlhf.rollout import (
    Rollout,
    SamplingConfig,
    concat_prompt_response,
    filter_logits,
    generate,
    response_slice,
    sample,
    score_sequences,
    sequences,
)

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


def _response_logits(model, rollout):
    """Logits [B, N, V] that predict each response token, from one full forward pass of prompt ⧺
    response (logits[:, t] predict token t + 1: positions P−1 … P+N−2)."""
    logits = jit_apply(model, *sequences(IDS, MASK, rollout))  # [B, P + N, V] (or (logits, values))
    logits = logits[0] if isinstance(logits, tuple) else logits
    return np.asarray(response_slice(logits, IDS.shape[1], rollout.tokens.shape[1]))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_unfiltered_logprobs_equal_a_recomputed_forward_pass(family):
    # No top_k / top_p: the sampler's log-probs are log softmax(z/τ)[a], what PPO recomputes.
    model = ActorCritic(CONFIGS[family], rngs=nnx.Rngs(1))  # sample uses its .lm
    config = SamplingConfig(max_new_tokens=6, temperature=0.7)
    out = sample(model, IDS, MASK, config, jax.random.key(4), eos_token_id=3)
    logits = _response_logits(model, out)  # [B, N, V]
    recomputed = token_logprobs(logits, out.tokens, temperature=0.7)
    np.testing.assert_allclose(out.logprobs * out.mask, recomputed * out.mask, atol=2e-5)


def test_top_k_one_records_logprob_zero_and_equals_greedy():
    # top_k = 1 keeps one token: it is drawn with probability 1, so log p̃(a) = 0 exactly.
    model = CausalLM(CONFIGS["llama"], rngs=nnx.Rngs(0))
    greedy = sample(
        model, IDS, MASK, SamplingConfig(max_new_tokens=6, greedy=True), jax.random.key(0)
    )
    top1 = sample(model, IDS, MASK, SamplingConfig(max_new_tokens=6, top_k=1), jax.random.key(1))
    np.testing.assert_array_equal(top1.tokens, greedy.tokens)
    np.testing.assert_allclose(top1.logprobs, 0.0, atol=1e-6)
    assert np.all(np.asarray(greedy.logprobs) < 0)  # greedy records the unfiltered log-probs


def _filtered_logprob_oracle(logits, tokens, *, temperature, top_k=None, top_p=None):
    """NumPy: log p̃(a) of the renormalised top-k / nucleus distribution of z/τ, per position."""
    out = np.zeros(tokens.shape)
    for index in np.ndindex(tokens.shape):
        z = logits[index].astype(np.float64) / temperature  # [V]
        order = np.argsort(-z)  # most likely first
        keep = order[:top_k] if top_k is not None else order
        if top_p is not None:
            p = np.exp(z[keep] - z[keep].max())
            p /= p.sum()
            keep = keep[(np.cumsum(p) - p) < top_p]  # mass strictly before each token < top_p
        assert tokens[index] in keep, "sampled a token the filter drops"
        kept = z[keep]
        out[index] = z[tokens[index]] - (kept.max() + np.log(np.exp(kept - kept.max()).sum()))
    return out


@pytest.mark.parametrize(
    "family, top_k, top_p", [("gpt2", 2, None), ("llama", 2, None), ("llama", None, 0.6)]
)
def test_filtered_logprobs_equal_a_numpy_oracle_of_the_renormalised_distribution(
    family, top_k, top_p
):
    model = CausalLM(CONFIGS[family], rngs=nnx.Rngs(2))
    config = SamplingConfig(max_new_tokens=6, temperature=0.7, top_k=top_k, top_p=top_p)
    out = sample(model, IDS, MASK, config, jax.random.key(5), eos_token_id=3)
    logits = _response_logits(model, out)  # [B, N, V]
    valid = np.asarray(out.mask) > 0
    tokens = np.asarray(out.tokens)
    expected = _filtered_logprob_oracle(logits, tokens, temperature=0.7, top_k=top_k, top_p=top_p)
    np.testing.assert_allclose(np.asarray(out.logprobs)[valid], expected[valid], atol=2e-5)
    # They are not the unfiltered log-probs (which are lower: the kept mass is < 1).
    unfiltered = np.asarray(token_logprobs(jnp.asarray(logits), out.tokens, temperature=0.7))
    assert np.all(np.asarray(out.logprobs)[valid] > unfiltered[valid])


def test_sampling_follows_the_temperature_scaled_softmax():
    logits = jnp.tile(jnp.array([[2.0, 1.0, 0.0, -1.0, 0.5]]), (4000, 1))  # [4000, 5]
    draw = jax.jit(
        lambda rng: rollout.sample_token(
            logits, rng, temperature=2.0, top_k=None, top_p=None, greedy=False
        )
    )
    tokens, logprobs = draw(jax.random.key(0))
    tokens = np.asarray(tokens)
    expected = np.asarray(jax.nn.softmax(logits[0] / 2.0))  # [0.34, 0.21, 0.13, 0.08, 0.17]
    counts = np.bincount(tokens, minlength=5) / 4000
    # Frequencies of 4000 draws are within ±0.03 (≈ 4 standard errors) of the probabilities.
    np.testing.assert_allclose(counts, expected, atol=0.03)
    np.testing.assert_allclose(logprobs, np.log(expected)[tokens], rtol=1e-5)


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


def test_new_params_temperature_or_top_p_do_not_retrace_a_new_static_argument_does():
    # A model shape no other test uses, so _generate's jit cache holds nothing for it yet; the
    # number of compiled entries then counts the traces of this test.
    config = ModelConfig(family="llama", **{**TINY, "vocab_size": 101, "hidden_size": 16})
    model = CausalLM(config, rngs=nnx.Rngs(0))
    before = rollout._generate._cache_size()
    sample(model, IDS, MASK, SamplingConfig(max_new_tokens=4, top_p=0.9), jax.random.key(0))
    assert rollout._generate._cache_size() == before + 1
    # New parameters (a training step), a new key, temperature and top_p: the program is reused.
    nnx.update(model, jax.tree.map(lambda x: x * 1.01, nnx.state(model)))
    again = SamplingConfig(max_new_tokens=4, temperature=0.5, top_p=0.5)
    sample(model, IDS, MASK, again, jax.random.key(1), eos_token_id=3, pad_token_id=1)
    assert rollout._generate._cache_size() == before + 1
    # A new static argument (top_k) is a new program.
    sample(model, IDS, MASK, SamplingConfig(max_new_tokens=4, top_k=3), jax.random.key(2))
    assert rollout._generate._cache_size() == before + 2


def test_sample_inside_jit_with_traced_params_equals_eager():
    # The PPO trainer samples from a jitted function whose parameters are tracers.
    model = CausalLM(CONFIGS["gpt2"], rngs=nnx.Rngs(2))
    config = SamplingConfig(max_new_tokens=5, temperature=0.8)
    graphdef, state = nnx.split(model)

    @jax.jit
    def rollout_fn(state, rng):
        return sample(nnx.merge(graphdef, state), IDS, MASK, config, rng, eos_token_id=3)

    inside = rollout_fn(state, jax.random.key(7))
    eager = sample(model, IDS, MASK, config, jax.random.key(7), eos_token_id=3)
    np.testing.assert_array_equal(inside.tokens, eager.tokens)
    np.testing.assert_array_equal(inside.mask, eager.mask)
    np.testing.assert_allclose(inside.logprobs, eager.logprobs, atol=1e-5)


def test_sampling_config_validation_names_the_field():
    cases = [
        ({"max_new_tokens": 0}, r"SamplingConfig.max_new_tokens = 0: must be an int ≥ 1"),
        ({"temperature": 0.0}, r"SamplingConfig.temperature = 0.0: must be > 0"),
        ({"top_k": 0}, r"SamplingConfig.top_k = 0: must be ≥ 1 or None"),
        ({"top_p": 0.0}, r"SamplingConfig.top_p = 0.0: must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"SamplingConfig.top_p = 1.5: must be in \(0, 1\]"),
        ({"greedy": True, "top_k": 5}, r"SamplingConfig.top_k = 5: has no effect with greedy"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            SamplingConfig(**kwargs)
    config = SamplingConfig(top_k=5, top_p=1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.top_k = 3  # frozen
    with pytest.raises(TypeError, match="SamplingConfig"):
        sample(CausalLM(CONFIGS["gpt2"], rngs=nnx.Rngs(0)), IDS, MASK, {"top_k": 5}, None)


def test_concat_prompt_response_and_response_slice_hand_values():
    prompt_ids, prompt_mask = jnp.array([[0, 7, 8]]), jnp.array([[0, 1, 1]])  # left-padded
    response_ids, response_mask = jnp.array([[9, 2, 0]]), jnp.array([[1.0, 1.0, 0.0]])
    ids, mask = concat_prompt_response(prompt_ids, prompt_mask, response_ids, response_mask)
    np.testing.assert_array_equal(ids, [[0, 7, 8, 9, 2, 0]])
    np.testing.assert_array_equal(mask, [[0, 1, 1, 1, 1, 0]])
    assert mask.dtype == jnp.int32
    # P = 3, N = 3: the outputs at positions 2, 3, 4 predict response tokens 0, 1, 2.
    x = jnp.arange(6)[None]  # [1, 6]
    np.testing.assert_array_equal(response_slice(x, 3, 3), [[2, 3, 4]])
    rollout_ = Rollout(tokens=response_ids, mask=response_mask, logprobs=jnp.zeros((1, 3)))
    for a, b in zip(sequences(prompt_ids, prompt_mask, rollout_), (ids, mask)):
        np.testing.assert_array_equal(a, b)


def test_score_sequences_is_the_reward_of_prompt_then_response():
    reward_model = RewardModel(CONFIGS["gpt2"], rngs=nnx.Rngs(3))
    response_ids = jnp.array([[5, 6, 2, 0], [7, 0, 0, 0], [8, 9, 10, 11]])  # [B, N]
    response_mask = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], jnp.float32)  # [B, N]
    ids = jnp.concatenate([IDS, response_ids], axis=1)  # [B, P + N]
    mask = jnp.concatenate([MASK, response_mask.astype(jnp.int32)], axis=1)  # [B, P + N]
    expected = np.asarray(jit_apply(reward_model, ids, mask))  # [B]
    graphdef, state = nnx.split(reward_model)

    def score(state, response_ids):
        model = nnx.merge(graphdef, state)
        return score_sequences(model, IDS, MASK, response_ids, response_mask)

    garbage = jnp.where(response_mask > 0, response_ids, 42)  # [B, N]
    for fn in (score, jax.jit(score)):
        np.testing.assert_allclose(fn(state, response_ids), expected, atol=1e-5)
        # Garbage in the masked response positions changes nothing.
        np.testing.assert_allclose(fn(state, garbage), expected, atol=1e-5)


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
