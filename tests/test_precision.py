"""Mixed precision (bf16 compute, fp32 master weights) and activation checkpointing (remat)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import train_utils as tu
from flax import nnx

from jaxrlhf.models import CausalLM
from jaxrlhf.models.heads import with_settings
from jaxrlhf.train import state as st
from jaxrlhf.train.optim import OptimizerConfig
from jaxrlhf.train.sft import NextTokenLoss, next_token_loss


def batch():
    ids, mask = tu.tiny_prompts(num=8, length=6)
    return jnp.asarray(ids), jnp.asarray(mask)


def one_step(model, learning_rate):
    graphdef, params = nnx.split(model)
    optimizer = OptimizerConfig(learning_rate=learning_rate, total_steps=1, schedule="constant")
    state = st.init_train_state(params, optimizer)
    new_state, metrics = st.make_train_step(NextTokenLoss(graphdef), optimizer).step(state, batch())
    return params, new_state.params, metrics


def test_bf16_compute_with_fp32_master_weights_keeps_a_tiny_update():
    # Adam moves every weight by ≈ lr on its first step. At lr = 1e-6 a float32 weight keeps that
    # change; a bfloat16 weight (8 bits of mantissa: spacing ≈ 4e-5 at 0.01) rounds it away.
    model = CausalLM(tu.tiny_config(), rngs=nnx.Rngs(0))
    mixed = with_settings(model, param_dtype="float32", compute_dtype="bfloat16")
    before, after, _ = one_step(mixed, 1e-6)
    moved = [np.abs(np.asarray(a) - np.asarray(b)) for a, b in
             zip(jax.tree.leaves(after), jax.tree.leaves(before))]  # fmt: skip
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(after))
    assert all(0.5e-6 < float(d.max()) < 2e-6 for d in moved)
    pure_bf16 = with_settings(model, param_dtype="bfloat16")
    before, after, _ = one_step(pure_bf16, 1e-6)
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)):
        big = np.abs(np.asarray(b, np.float32)) > 0.01
        np.testing.assert_array_equal(np.asarray(a)[big], np.asarray(b)[big])  # lost


def test_bf16_compute_gives_float32_outputs_close_to_float32_compute():
    model = CausalLM(tu.tiny_config("llama", num_heads=4, num_kv_heads=2), rngs=nnx.Rngs(0))
    mixed = with_settings(model, compute_dtype="bfloat16")
    ids, mask = batch()
    logits, want = mixed(ids, mask), model(ids, mask)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, want, atol=5e-2)
    assert float(jnp.max(jnp.abs(logits - want))) > 1e-6  # really computed in bf16
    np.testing.assert_allclose(
        next_token_loss(logits, ids, mask), next_token_loss(want, ids, mask), rtol=1e-2
    )


def test_remat_gives_the_same_step():
    model = CausalLM(tu.tiny_config("llama", num_heads=4, num_kv_heads=2), rngs=nnx.Rngs(0))
    _, want, want_metrics = one_step(model, 1e-3)
    _, got, metrics = one_step(with_settings(model, remat=True), 1e-3)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(metrics["grad_norm"], want_metrics["grad_norm"], rtol=1e-6)


def test_ppo_with_bf16_compute_and_frozen_models_in_bf16():
    config = tu.tiny_ppo_config(num_iterations=1, compute_dtype="bfloat16",
                                frozen_dtype="bfloat16", remat=True)  # fmt: skip
    trainer = tu.tiny_trainer(config)
    metrics = trainer.step()
    assert all(np.isfinite(metrics[name]) for name in tu.TRL_METRICS)
    params = jax.tree.leaves(trainer.state.train.params)
    assert all(p.dtype == jnp.float32 for p in params)  # master weights
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(trainer.reference_state))
    assert trainer.policy().config.compute_dtype == "bfloat16" and trainer.policy().config.remat
