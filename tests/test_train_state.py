"""The one train step (jaxrlhf.train.state): under jax.pmap and shard_map it equals the
single-device step, for a regression, for PPO, SFT and the reward model.

tests/conftest.py forces 8 CPU devices; these tests use 4 of them. Each batch is split so that devices
hold *different* numbers of valid tokens (one holds none), which is where a naive average of
per-device means goes wrong.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_utils as tu

from jaxrlhf.rl import masked_sum
from jaxrlhf.train import state as st
from jaxrlhf.train.optim import OptimizerConfig

ADAM = OptimizerConfig(learning_rate=0.1, total_steps=10, schedule="constant", max_grad_norm=None)


def test_eight_devices_are_forced():
    assert jax.local_device_count() == 8


@dataclasses.dataclass(frozen=True)
class MSELoss:
    """A masked token-mean regression loss as a (sum, count) pair, plus an unweighted metric."""

    weights: tuple = (("mse", 1.0),)

    def __call__(self, params, batch):
        x, y, mask = batch
        pred = jnp.tanh(x @ params["w"]) @ params["v"]  # [b]
        return {"mse": (masked_sum((pred - y) ** 2, mask), jnp.sum(mask)),
                "abs": (masked_sum(jnp.abs(pred - y), mask), jnp.sum(mask))}  # fmt: skip


def _four(mode):
    return None if mode == "single" else 4


def mse_loss(params, batch):
    (total, count), _ = MSELoss()(params, batch).values()
    return total / count


def mse_problem():
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    params = {"w": jax.random.normal(k[0], (3, 5)), "v": jax.random.normal(k[1], (5,))}
    x = jax.random.normal(k[2], (8, 3))
    y = jax.random.normal(k[3], (8,))
    # Devices get rows [0,1], [2,3], [4,5], [6,7]: 2, 1, 1 and 0 valid rows.
    mask = jnp.array([1, 1, 1, 0, 1, 0, 0, 0], jnp.float32)
    return params, (x, y, mask)


def test_the_single_device_step_is_the_gradient_of_the_mean_loss():
    params, batch = mse_problem()
    stepper = st.make_train_step(MSELoss(), ADAM)
    state, metrics = stepper.step(st.init_train_state(params, ADAM), batch)
    loss, grads = jax.value_and_grad(mse_loss)(params, batch)  # the oracle: plain autodiff
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
    np.testing.assert_allclose(metrics["mse"], loss, rtol=1e-6)
    norm = np.sqrt(sum(float(jnp.sum(g**2)) for g in jax.tree.leaves(grads)))
    np.testing.assert_allclose(metrics["grad_norm"], norm, rtol=1e-5)
    assert int(state.step) == 1


@pytest.mark.parametrize("parallelism", ["pmap", "shard_map"])
def test_wrappers_equal_the_single_device_step_on_a_regression(parallelism):
    params, batch = mse_problem()
    results = {}
    for mode in ("single", parallelism):
        stepper = st.make_train_step(MSELoss(), ADAM, parallelism=mode, num_devices=_four(mode))
        state = stepper.put_state(st.init_train_state(params, ADAM))
        for _ in range(3):
            state, metrics = stepper.step(state, stepper.put_batch(batch))
        results[mode] = (stepper.get_state(state), metrics)
    single, multi = results["single"], results[parallelism]
    assert int(multi[0].step) == 3
    for a, b in zip(jax.tree.leaves(single[0].params), jax.tree.leaves(multi[0].params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for name in ("mse", "abs", "loss", "grad_norm"):
        np.testing.assert_allclose(single[1][name], multi[1][name], rtol=1e-5)
    # The naive average of per-device means would differ: check it does.
    x, y, mask = (np.asarray(a) for a in batch)
    pred = np.tanh(x @ np.asarray(params["w"])) @ np.asarray(params["v"])
    per_device = [
        (((pred - y) ** 2 * m).sum() / max(m.sum(), 1)) for pred, y, m in
        zip(np.split(pred, 4), np.split(y, 4), np.split(mask, 4))
    ]  # fmt: skip
    assert abs(np.mean(per_device) - float(mse_loss(params, batch))) > 0.05


def test_split_batch_rejects_an_indivisible_batch():
    with pytest.raises(ValueError, match="not divisible by 4 devices"):
        st.split_batch(jnp.zeros((6, 2)), 4)


def test_unknown_parallelism_is_rejected():
    with pytest.raises(ValueError, match="parallelism='tpu'"):
        st.make_train_step(MSELoss(), ADAM, parallelism="tpu")


def test_the_callers_parameters_survive_the_donated_step():
    params, batch = mse_problem()
    stepper = st.make_train_step(MSELoss(), ADAM)
    state = st.init_train_state(params, ADAM)
    stepper.step(state, batch)
    np.asarray(params["w"])  # still alive: init_train_state copied them before donation


def _copy(tree):
    return jax.tree.map(jnp.copy, tree)


@pytest.mark.parametrize("parallelism", ["shard_map", "pmap"])
def test_ppo_update_is_the_same_under_data_parallelism_and_one_device(parallelism):
    # A real PPO update (2 epochs × 2 minibatches of 8 rollouts) of the tiny learning setup, run by
    # the single-device step and by the wrapped one on the same experience and shuffles.
    trainer = tu.tiny_trainer(tu.learning_config())
    exp, perms = _experience(trainer)
    minibatches = np.asarray(perms).reshape(-1, 8)
    tokens = np.asarray(exp.response_mask.sum(-1))[minibatches].reshape(-1, 4, 2).sum(-1)
    assert any(len(set(row.tolist())) > 1 for row in tokens)  # uneven across devices
    results = {}
    for mode in ("single", parallelism):
        stepper = st.make_train_step(
            trainer.loss, trainer.config.optimizer, parallelism=mode, num_devices=_four(mode)
        )
        results[mode] = st.run_steps(stepper, _copy(trainer.state.train), exp, minibatches)
    (single_state, single_metrics), (state, metrics) = results["single"], results[parallelism]
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


def _experience(trainer):
    """The Experience and shuffles of the trainer's first iteration (as iteration() builds them)."""
    from jaxrlhf.train.ppo import split_rng

    c, state = trainer.config, trainer.state
    _, rollout_rng, perms = split_rng(state.rng, epochs=c.ppo_epochs, batch_size=c.batch_size)
    ids, mask = trainer.prompt_batch(0)
    from jaxrlhf.rollout import sample
    from jaxrlhf.train.experience import score_rollout

    params = state.train.params
    actor = tu.nnx.merge(trainer.actor_graphdef, params["lm"])
    rollout = sample(actor, ids, mask, c.sampling, rollout_rng, eos_token_id=tu.EOS)
    scores = tu.target_fraction_reward(ids, mask, rollout)
    exp, _ = score_rollout(
        params, trainer.reference_state, ids, mask, rollout, scores, 0.01,
        policy_graphdef=trainer.graphdef, reference_graphdef=trainer.reference_graphdef,
        kl_estimator="k1", gamma=1.0, lam=0.95, temperature=1.0, whiten_rewards=False,
        use_sampler_logprobs=False, eos_token_id=tu.EOS,
    )  # fmt: skip
    return exp, perms


def test_a_shard_map_trainer_iteration_equals_the_single_device_one():
    single = tu.tiny_trainer(tu.learning_config())
    sharded = tu.tiny_trainer(tu.learning_config(parallelism="shard_map"))
    m_single, m_sharded = single.step(), sharded.step()
    for name in tu.TRL_METRICS:
        np.testing.assert_allclose(m_single[name], m_sharded[name], rtol=1e-4, atol=1e-6)
    for a, b in zip(
        jax.tree.leaves(single.state.train.params), jax.tree.leaves(sharded.state.train.params)
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _assert_models_close(a, b, **tol):
    for x, y in zip(jax.tree.leaves(tu.nnx.state(a)), jax.tree.leaves(tu.nnx.state(b))):
        np.testing.assert_allclose(x, y, **tol)


def test_sft_is_the_same_under_shard_map_and_one_device():
    from data_utils import small_task, tiny_lm

    from jaxrlhf.train import SFTConfig, train_sft

    task = small_task()
    ids, mask = (a[:32] for a in task.corpus_batch())
    model = tiny_lm(task.vocab_size)
    runs = {}
    for mode in ("single", "shard_map"):
        config = SFTConfig(steps=3, batch_size=16, learning_rate=3e-3, lr_schedule="cosine",
                           warmup_steps=1, parallelism=mode)  # fmt: skip
        runs[mode] = train_sft(model, ids, mask, config, progress=False)
    (single, m_single), (sharded, m_sharded) = runs["single"], runs["shard_map"]
    np.testing.assert_allclose(m_single["loss"], m_sharded["loss"], rtol=1e-5)
    np.testing.assert_allclose(m_single["grad_norm"], m_sharded["grad_norm"], rtol=1e-4)
    _assert_models_close(single, sharded, rtol=1e-4, atol=1e-6)
    assert m_single["loss"][-1] < m_single["loss"][0]


def test_reward_training_is_the_same_under_pmap_and_one_device():
    from data_utils import tiny_lm, tokenizer
    from test_reward import _easy_pairs

    from jaxrlhf.train import RewardConfig, reward_model_from_policy, train_reward_model

    pairs = _easy_pairs(32, seed=0)
    rm = reward_model_from_policy(tiny_lm(len(tokenizer())), seed=0)
    runs = {}
    for mode in ("single", "pmap"):
        config = RewardConfig(epochs=2, batch_size=16, learning_rate=1e-3, lr_schedule="cosine",
                              warmup_steps=1, eval_fraction=0.0,
                              center_rewards_coefficient=0.1, parallelism=mode)  # fmt: skip
        runs[mode] = train_reward_model(rm, pairs, config, progress=False)
    (single, m_single), (multi, m_multi) = runs["single"], runs["pmap"]
    for name in ("loss", "accuracy", "grad_norm"):
        np.testing.assert_allclose(m_single[name], m_multi[name], rtol=1e-4, atol=1e-6)
    _assert_models_close(single, multi, rtol=1e-4, atol=1e-6)
