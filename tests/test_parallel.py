"""The per-device train step under jax.pmap and shard_map equals the single-device step.

tests/conftest.py forces 4 CPU devices. Each batch is split so that devices hold *different* numbers
of valid tokens (one holds none), which is where a naive average of per-device means goes wrong.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import train_utils as tu

from jaxrlhf.rl import masked_mean
from jaxrlhf.train import parallel as par


def test_four_devices_are_forced():
    assert jax.local_device_count() == 4


def mse_loss(params, batch, axis_name):
    """A masked token-mean regression loss, written per device with its device share."""
    x, y, mask = batch
    pred = jnp.tanh(x @ params["w"]) @ params["v"]  # [b]
    share = par.device_share(jnp.sum(mask), axis_name)
    loss = masked_mean((pred - y) ** 2, mask) * share
    return loss, {"mse": loss}


def mse_problem():
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    params = {"w": jax.random.normal(k[0], (3, 5)), "v": jax.random.normal(k[1], (5,))}
    x = jax.random.normal(k[2], (8, 3))
    y = jax.random.normal(k[3], (8,))
    # Devices get rows [0,1], [2,3], [4,5], [6,7]: 2, 1, 1 and 0 valid rows.
    mask = jnp.array([1, 1, 1, 0, 1, 0, 0, 0], jnp.float32)
    return params, (x, y, mask)


def test_device_share_is_one_on_a_single_device():
    assert float(par.device_share(jnp.float32(7.0), None)) == 1.0


@pytest.mark.parametrize("parallelism", ["pmap", "shard_map"])
def test_wrappers_equal_the_single_device_step_on_a_regression(parallelism):
    params, batch = mse_problem()
    optimizer = optax.adam(0.1)
    results = {}
    for mode in ("single", parallelism):
        stepper = par.make_train_step(mse_loss, optimizer, parallelism=mode)
        state = stepper.put_state(par.init_train_state(params, optimizer))
        for _ in range(3):
            state, metrics = stepper.step(state, stepper.put_batch(batch))
        results[mode] = (stepper.get_state(state), metrics)
    single, multi = results["single"], results[parallelism]
    assert int(multi[0].step) == 3
    for a, b in zip(jax.tree.leaves(single[0].params), jax.tree.leaves(multi[0].params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for name in ("mse", "loss", "grad_norm"):
        np.testing.assert_allclose(single[1][name], multi[1][name], rtol=1e-5)
    # The naive average of per-device means (no device share) would differ: check it does.
    naive = np.mean([0.0 if m.sum() == 0 else 1.0 for m in np.split(np.asarray(batch[2]), 4)])
    assert naive != 1.0


def test_split_batch_rejects_an_indivisible_batch():
    with pytest.raises(ValueError, match="not divisible by 4 devices"):
        par.split_batch(jnp.zeros((6, 2)), 4)


def test_unknown_parallelism_is_rejected():
    with pytest.raises(ValueError, match="parallelism='tpu'"):
        par.make_train_step(mse_loss, optax.sgd(0.1), parallelism="tpu")


def test_ppo_update_is_the_same_under_shard_map_and_one_device():
    # A real PPO update (2 epochs × 2 minibatches of 8 rollouts) of the tiny learning setup, run by
    # the single-device step and by the shard_map-wrapped one on the same experience and shuffles.
    # (pmap runs the same per-device function; it is compared on the regression above, which
    # compiles in a fraction of the time of a transformer's gradient.)
    trainer = tu.tiny_trainer(tu.learning_config())
    exp, _, _, perms = trainer.collect(trainer.state)
    minibatches = np.asarray(perms).reshape(-1, 8)
    tokens = np.asarray(exp.response_mask.sum(-1))[minibatches].reshape(-1, 4, 2).sum(-1)
    assert any(len(set(row.tolist())) > 1 for row in tokens)  # uneven: the device shares matter
    results = {}
    for mode in ("single", "shard_map"):
        update = trainer.programs.update_fn(mode, None)
        results[mode] = update(trainer.state.train, exp, perms)
    (single_state, single_metrics), (state, metrics) = results["single"], results["shard_map"]
    assert int(state.step) == int(single_state.step) == 4
    for a, b in zip(jax.tree.leaves(single_state.params), jax.tree.leaves(state.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(single_state.opt_state), jax.tree.leaves(state.opt_state)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
    for name in single_metrics:
        np.testing.assert_allclose(single_metrics[name], metrics[name], rtol=1e-4, atol=1e-6)
    # The parameters did move (the comparison is not between two untouched copies).
    moved = [
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(
            jax.tree.leaves(single_state.params), jax.tree.leaves(trainer.state.train.params)
        )
    ]
    assert max(moved) > 1e-4


def test_a_shard_map_trainer_iteration_equals_the_single_device_one():
    single = tu.tiny_trainer(tu.learning_config())
    sharded = tu.tiny_trainer(tu.learning_config(parallelism="shard_map"))
    assert sharded.programs is single.programs  # same compiled rollout/experience programs
    m_single, m_sharded = single.step(), sharded.step()
    for name in tu.TRL_METRICS:
        np.testing.assert_allclose(m_single[name], m_sharded[name], rtol=1e-4, atol=1e-6)
    for a, b in zip(
        jax.tree.leaves(single.state.train.params), jax.tree.leaves(sharded.state.train.params)
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_distributed_init_is_off_by_default_and_a_no_op():
    assert tu.PPOConfig().distributed_init is False
    par.maybe_initialize_distributed(False)  # must not touch jax.distributed
    assert jax.process_count() == 1
