"""Models without Hugging Face: config validation, shapes, padding invariance, heads, dropout, jit/grad."""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from models_utils import jit_apply

from jaxrlhf.models import ActorCritic, CausalLM, ModelConfig, RewardModel, ValueModel
from jaxrlhf.models.heads import last_token_index, scalar_head, with_settings
from jaxrlhf.models.layers import (
    causal_mask,
    dropout,
    fold_rng,
    positions_from_mask,
    rope_cos_sin,
    rope_inv_freq,
)

TINY = {
    "vocab_size": 64,
    "hidden_size": 32,
    "num_layers": 1,
    "num_heads": 4,
    "max_position_embeddings": 64,
}
CONFIGS = {
    "gpt2": ModelConfig(family="gpt2", **TINY),
    "llama": ModelConfig(
        family="llama", num_kv_heads=2, tie_word_embeddings=False, attention_bias=True, **TINY
    ),
}

# Row 0: 3 real tokens after 2 pads; row 1: 5 real tokens.
IDS = jnp.array([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]], jnp.int32)
MASK = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], jnp.int32)


def test_config_defaults():
    config = ModelConfig(family="gpt2", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4)
    assert config.num_kv_heads == 4
    assert config.head_dim == 8  # 32 / 4
    assert config.intermediate_size == 128  # 4 · 32
    assert config.hidden_act == "gelu_new"
    assert config.dropout == 0.0 and config.dtype == "float32"
    assert ModelConfig(family="llama", **TINY).hidden_act == "silu"
    # replace() derives the defaulted fields again from the new values.
    wider = config.replace(family="llama", hidden_size=64)
    assert (wider.head_dim, wider.intermediate_size, wider.hidden_act) == (16, 256, "silu")
    assert wider.replace(head_dim=8).head_dim == 8


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"family": "bert"}, "family"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"num_heads": 3}, "hidden_size"),  # 32 not divisible by 3
        ({"family": "llama", "num_kv_heads": 3}, "num_kv_heads"),
        ({"dropout": 1.0}, "dropout"),
        ({"dtype": "float16"}, "dtype"),
        ({"family": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope_scaling"),
        (
            {"family": "llama", "rope_scaling": {"rope_type": "llama3", "factor": 2.0}},
            "rope_scaling",
        ),
        ({"hidden_act": "relu"}, "hidden_act"),
        ({"pad_token_id": 64}, "pad_token_id"),
    ],
)
def test_config_errors_name_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**{**dict(family="gpt2", **TINY), **changes})


def test_config_hf_round_trip():
    config = ModelConfig(
        family="llama",
        num_kv_heads=2,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
        hf_model_type="mistral",
        **TINY,
    )
    assert ModelConfig.from_hf(config.to_hf()) == config
    assert ModelConfig.from_hf(CONFIGS["gpt2"].to_hf()) == CONFIGS["gpt2"]
    with pytest.raises(ValueError, match="model_type='bert'"):
        ModelConfig.from_hf({"model_type": "bert", "vocab_size": 10})
    # transformers 4.x layout (rope_theta + rope_scaling with "type") is read as well as 5.x's.
    old_style = {
        **config.to_hf(),
        "rope_parameters": None,
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "linear", "factor": 2.0},
    }
    assert ModelConfig.from_hf(old_style) == config
    # Mistral's sliding window is not implemented: a window shorter than the longest sequence
    # (max_position_embeddings=64) warns; one at least that long is exact and says nothing.
    with pytest.warns(UserWarning, match="sliding_window=16 .* at most 16 tokens"):
        assert ModelConfig.from_hf({**config.to_hf(), "sliding_window": 16}) == config
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ModelConfig.from_hf({**config.to_hf(), "sliding_window": 64}) == config


def test_positions_and_causal_mask_hand_derived():
    # cumsum([0,0,1,1,1]) − 1 = [-1,-1,0,1,2] → clipped at 0.
    np.testing.assert_array_equal(positions_from_mask(MASK), [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])
    # Two new queries at slots 1 and 2 of a 3-slot cache whose slot 0 is padding.
    mask = causal_mask(jnp.array([[0, 1, 1]]), 2, cache_index=1)
    np.testing.assert_array_equal(mask[0], [[False, True, False], [False, True, True]])


def test_rope_inv_freq_hand_derived():
    config = ModelConfig(family="llama", vocab_size=8, hidden_size=8, num_layers=1, num_heads=2)
    # head_dim 4: ωᵢ = 10000^(−2i/4) = [1, 0.01].
    np.testing.assert_allclose(rope_inv_freq(config), [1.0, 0.01], rtol=1e-6)
    linear = config.replace(rope_scaling={"rope_type": "linear", "factor": 4.0})
    np.testing.assert_allclose(rope_inv_freq(linear), [0.25, 0.0025], rtol=1e-6)
    # llama3 with L = 100, low = 1, high = 4, factor 8: wavelengths 2π ≈ 6.28 (< L/4 = 25: kept) and
    # 2π/0.01 ≈ 628 (> L/1 = 100: divided by 8).
    llama3 = config.replace(
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 100,
        }
    )
    np.testing.assert_allclose(rope_inv_freq(llama3), [1.0, 0.01 / 8], rtol=1e-6)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_heads_shapes_and_dtypes(family):
    config = CONFIGS[family]
    logits = jit_apply(CausalLM(config, rngs=nnx.Rngs(0)), IDS, MASK)
    assert logits.shape == (2, 5, 64) and logits.dtype == jnp.float32
    logits, values = jit_apply(ActorCritic(config, rngs=nnx.Rngs(0)), IDS, MASK)
    assert logits.shape == (2, 5, 64) and values.shape == (2, 5) and values.dtype == jnp.float32
    assert jit_apply(ValueModel(config, rngs=nnx.Rngs(0)), IDS, MASK).shape == (2, 5)
    assert jit_apply(RewardModel(config, rngs=nnx.Rngs(0)), IDS, MASK).shape == (2,)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_left_padding_gives_the_unpadded_logits(family):
    model = CausalLM(CONFIGS[family], rngs=nnx.Rngs(1))
    padded = jit_apply(model, IDS, MASK)[0, 2:]  # [3, V]
    unpadded = jit_apply(model, IDS[:1, 2:], MASK[:1, 2:])[0]  # [3, V]
    np.testing.assert_allclose(padded, unpadded, atol=1e-5)
    # Garbage in the padded slots changes nothing at the real ones.
    garbage = IDS.at[0, :2].set(jnp.array([33, 44]))
    np.testing.assert_allclose(jit_apply(model, garbage, MASK)[0, 2:], padded, atol=1e-6)


def test_actor_critic_shares_the_lm_trunk():
    model = ActorCritic(CONFIGS["llama"], rngs=nnx.Rngs(0))
    logits, values = jit_apply(model, IDS, MASK)
    np.testing.assert_allclose(logits, jit_apply(model.lm, IDS, MASK), atol=1e-6)
    hidden = jit_apply(model.lm, IDS, MASK, method="hidden")  # [B, T, D]
    expected = hidden @ model.value_head.kernel[...][:, 0] + model.value_head.bias[...][0]
    np.testing.assert_allclose(values, expected, atol=1e-5)


def test_reward_model_reads_the_last_real_token():
    np.testing.assert_array_equal(last_token_index(jnp.array([[0, 1, 1, 0], [1, 0, 0, 0]])), [2, 0])
    model = RewardModel(CONFIGS["gpt2"], rngs=nnx.Rngs(0))
    per_token = jit_apply(model, IDS, MASK, method="token_scores")  # [B, T]
    np.testing.assert_allclose(jit_apply(model, IDS, MASK), per_token[:, -1], atol=1e-6)
    # A right-padded row is read at its last real token, not at the end.
    right = jnp.array([[5, 6, 7, 0, 0]])
    right_mask = jnp.array([[1, 1, 1, 0, 0]])
    np.testing.assert_allclose(
        jit_apply(model, right, right_mask), jit_apply(model, IDS[:1], MASK[:1]), atol=1e-5
    )


def test_scalar_head_initialisation():
    small = RewardModel(CONFIGS["gpt2"], rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(small.score.bias[...], [0.0])
    # The same initialiser at D = 1023: std 1/√(D + 1) = 1/32; the sample std of 1023 draws is
    # within a few percent of it.
    config = ModelConfig(family="gpt2", vocab_size=8, hidden_size=1023, num_layers=1, num_heads=1)
    head = scalar_head(config, std=1.0 / math.sqrt(1023 + 1), rngs=nnx.Rngs(0))
    assert abs(np.asarray(head.kernel[...]).std() * 32 - 1.0) < 0.1


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_dropout_off_by_default_and_on_with_the_switch(family):
    rng = jax.random.key(0)
    model = CausalLM(CONFIGS[family], rngs=nnx.Rngs(0))
    clean = jit_apply(model, IDS, MASK)
    np.testing.assert_array_equal(jit_apply(model, IDS, MASK, dropout_rng=rng), clean)
    noisy = CausalLM(CONFIGS[family].replace(dropout=0.5), rngs=nnx.Rngs(0))
    np.testing.assert_allclose(jit_apply(noisy, IDS, MASK), clean, atol=1e-6)  # no key: no dropout
    dropped = jit_apply(noisy, IDS, MASK, dropout_rng=rng)
    assert not np.allclose(dropped, clean, atol=1e-3)
    # The same key gives the same mask (pure function of the key); another key, another mask.
    np.testing.assert_array_equal(jit_apply(noisy, IDS, MASK, dropout_rng=rng), dropped)
    other = jit_apply(noisy, IDS, MASK, dropout_rng=jax.random.key(1))
    assert not np.allclose(other, dropped, atol=1e-3)


def test_bfloat16_params_give_float32_logits_close_to_float32():
    config = CONFIGS["llama"]
    model32 = ActorCritic(config, rngs=nnx.Rngs(0))
    model16 = ActorCritic(config.replace(dtype="bfloat16"), rngs=nnx.Rngs(0))
    # Same weights, rounded to bfloat16.
    nnx.update(model16, jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(model32)))
    assert model16.lm.model.embed_tokens.embedding[...].dtype == jnp.bfloat16
    logits16, values16 = jit_apply(model16, IDS, MASK)
    logits32, values32 = jit_apply(model32, IDS, MASK)
    assert logits16.dtype == jnp.float32 and values16.dtype == jnp.float32
    # Logits of size ~0.3: bfloat16 keeps ~3 significant digits through two layers.
    np.testing.assert_allclose(logits16, logits32, atol=0.02)
    np.testing.assert_allclose(values16, values32, atol=0.02)


def test_split_merge_jit_and_grad_over_state():
    model = ActorCritic(CONFIGS["gpt2"], rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    @jax.jit
    def loss_fn(state, ids, mask):
        logits, values = nnx.merge(graphdef, state)(ids, mask)
        return jnp.mean(jax.nn.logsumexp(logits, -1)) + jnp.mean(values**2)

    loss, grads = jax.value_and_grad(loss_fn)(state, IDS, MASK)
    eager_logits, eager_values = model(IDS, MASK)
    expected = jnp.mean(jax.nn.logsumexp(eager_logits, -1)) + jnp.mean(eager_values**2)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    leaves = jax.tree.leaves(grads)
    assert len(leaves) == len(jax.tree.leaves(state))
    assert all(np.isfinite(g).all() for g in leaves)
    assert float(jnp.abs(grads["value_head"]["kernel"][...]).sum()) > 0
    n_params = sum(math.prod(x.shape) for x in leaves)
    assert n_params > 10_000


def unrolled_trunk(trunk, input_ids, attention_mask, dropout_rng=None):
    """The reference for the scanned blocks: a Python loop over the layers, layer l's parameters
    sliced out of the stack by hand, its dropout key fold_in(rng, l + offset) as the scan's."""
    config = trunk.config
    positions = positions_from_mask(attention_mask)
    mask = causal_mask(attention_mask, input_ids.shape[1])
    if config.family == "gpt2":  # with GPT2Model's embedding dropout, key fold_in(rng, 0)
        x = trunk.wte(input_ids) + trunk.wpe(positions)
        x = dropout(x, config.dropout, fold_rng(dropout_rng, 0))
        blocks, args, offset, final = trunk.h, (mask,), 1, trunk.ln_f
    else:
        x = trunk.embed_tokens(input_ids)
        args = rope_cos_sin(positions, rope_inv_freq(config)) + (mask,)
        blocks, offset, final = trunk.layers, 0, trunk.norm
    graphdef, stacked = nnx.split(blocks)
    for layer in range(config.num_layers):
        block = nnx.merge(graphdef, jax.tree.map(lambda p, layer=layer: p[layer], stacked))
        x, _ = block(x, *args, None, 0, fold_rng(dropout_rng, layer + offset))
    return final(x)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("remat", [False, True])
def test_scanned_layers_equal_the_unrolled_loop(family, remat):
    config = CONFIGS[family].replace(num_layers=3, dropout=0.1 if family == "gpt2" else 0.0)
    lm = CausalLM(config, rngs=nnx.Rngs(3))
    trunk = lm.model
    blocks = trunk.h if family == "gpt2" else trunk.layers
    # Every block parameter is one [L, ...] array, and layers differ (each drew its own init).
    kernel = (blocks.mlp.c_fc if family == "gpt2" else blocks.mlp.up_proj).kernel[...]
    assert kernel.shape == (3, 32, config.intermediate_size)
    assert float(jnp.abs(kernel[0] - kernel[1]).max()) > 1e-3
    rng = jax.random.key(7) if family == "gpt2" else None  # dropout on: the per-layer keys agree

    def scanned(state):
        model = nnx.merge(graphdef, state)
        positions, mask = positions_from_mask(MASK), causal_mask(MASK, IDS.shape[1])
        return model(IDS, positions, mask, dropout_rng=rng, remat=remat)[0]

    def unrolled(state):
        return unrolled_trunk(nnx.merge(graphdef, state), IDS, MASK, rng)

    graphdef, state = nnx.split(trunk)
    want, got = jax.jit(unrolled)(state), jax.jit(scanned)(state)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    weights = jax.random.normal(jax.random.key(0), want.shape) / want.size  # a mean-like loss

    def objective(f):
        return jax.jit(jax.grad(lambda s: jnp.sum(f(s) * weights)))(state)

    for a, b in zip(jax.tree.leaves(objective(scanned)), jax.tree.leaves(objective(unrolled))):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("remat", [False, True])
def test_a_list_of_blocks_equals_the_scanned_stack(family, remat):
    """scan_layers off: the same weights (made in the same order), held as L blocks and run in a
    Python loop, give the scan's hidden states and gradients; with_settings converts either way."""
    config = CONFIGS[family].replace(num_layers=3, dropout=0.1 if family == "gpt2" else 0.0)
    stacked = CausalLM(config, rngs=nnx.Rngs(3))
    listed = CausalLM(config.replace(scan_layers=False, remat=remat), rngs=nnx.Rngs(3))
    blocks = getattr(listed.model, listed.model.BLOCKS)
    assert isinstance(blocks, nnx.List) and len(blocks) == 3
    converted = with_settings(stacked, scan_layers=False, remat=remat)
    for a, b in zip(jax.tree.leaves(nnx.state(listed)), jax.tree.leaves(nnx.state(converted))):
        np.testing.assert_array_equal(a, b)
    back = with_settings(listed, scan_layers=True, remat=False)
    for a, b in zip(jax.tree.leaves(nnx.state(back)), jax.tree.leaves(nnx.state(stacked))):
        np.testing.assert_array_equal(a, b)
    rng = jax.random.key(7) if family == "gpt2" else None  # dropout on: the per-layer keys agree
    weights = jax.random.normal(jax.random.key(0), (*IDS.shape, 32)) / IDS.size

    def value_and_grad(model):
        graphdef, state = nnx.split(model)

        def objective(state):
            hidden = nnx.merge(graphdef, state).hidden(IDS, MASK, dropout_rng=rng)
            return jnp.sum(hidden * weights)

        value, grads = jax.jit(jax.value_and_grad(objective))(state)
        return value, nnx.merge(graphdef, grads)

    want, want_grads = value_and_grad(stacked)
    got, got_grads = value_and_grad(listed)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    got_grads = with_settings(got_grads, scan_layers=True)  # the gradient in the stacked layout
    for a, b in zip(jax.tree.leaves(nnx.state(got_grads)), jax.tree.leaves(nnx.state(want_grads))):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_cached_scan_writes_every_layers_keys(family):
    """A prompt run through the KV cache in two pieces gives the logits of one pass, and every
    layer's slice of the stacked cache holds that layer's keys (not a copy of another's)."""
    config = CONFIGS[family].replace(num_layers=3)
    lm = CausalLM(config, rngs=nnx.Rngs(0))
    ids, mask = IDS[1:], MASK[1:]  # [1, 5]
    positions = positions_from_mask(mask)
    cache = lm.init_cache(1, 5)
    first, cache = lm.forward_cached(ids[:, :3], positions[:, :3], mask, cache, 0)
    second, cache = lm.forward_cached(ids[:, 3:], positions[:, 3:], mask, cache, 3)
    whole = jit_apply(lm, ids, mask)
    np.testing.assert_allclose(jnp.concatenate([first, second], 1), whole, atol=1e-5, rtol=1e-5)
    assert cache.keys.shape[0] == 3
    assert float(jnp.abs(cache.keys[0] - cache.keys[1]).max()) > 1e-3


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_per_layer_loop_that_decodes_equals_the_scan(family):
    """generate decodes with the blocks unstacked (a Python loop) and the cache per layer: the
    second piece of a prompt through that form gives the scan's logits and cache."""
    config = CONFIGS[family].replace(num_layers=3)
    lm = CausalLM(config, rngs=nnx.Rngs(0))
    ids, mask = IDS[1:], MASK[1:]  # [1, 5]
    positions = positions_from_mask(mask)
    _, cache = lm.forward_cached(ids[:, :3], positions[:, :3], mask, lm.init_cache(1, 5), 0)
    want, want_cache = lm.forward_cached(ids[:, 3:], positions[:, 3:], mask, cache, 3)
    looped = lm.unstack_layers()
    blocks = getattr(looped.model, looped.model.BLOCKS)
    assert len(blocks) == 3
    got, got_cache = looped.forward_cached(ids[:, 3:], positions[:, 3:], mask, cache.per_layer(), 3)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert not got_cache.is_stacked
    np.testing.assert_allclose(got_cache.stacked().keys, want_cache.keys, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got_cache.stacked().values, want_cache.values, atol=1e-5, rtol=1e-5)
