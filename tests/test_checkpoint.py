"""Orbax checkpoints: round trip, atomicity (partial saves are invisible), exact resume."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
import train_utils as tu

from jaxrlhf.train.checkpoint import (
    all_steps,
    latest_step,
    restore_checkpoint,
    save_checkpoint,
)


def assert_trees_equal(a, b, **tol):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


def trained_state():
    return tu.uninterrupted_run().state


def test_round_trip_restores_state_and_config(tmp_path):
    state = trained_state()
    config = tu.learning_config()
    save_checkpoint(tmp_path, 12, state, config=config)
    fresh = tu.tiny_trainer(tu.learning_config(), policy_seed=3).state  # other values, same shapes
    restored, saved_config = restore_checkpoint(tmp_path, fresh)
    assert_trees_equal(restored, state, rtol=0, atol=0)
    assert type(restored) is type(state) and type(restored.kl) is type(state.kl)
    assert int(restored.iteration) == 12
    assert saved_config["class"] == "PPOConfig"
    assert saved_config["kl_target"] == config.kl_target and saved_config["adaptive_kl"] is True


def test_no_temporary_directory_survives_a_save(tmp_path):
    save_checkpoint(tmp_path, 1, {"x": np.arange(3.0)})
    assert os.listdir(tmp_path) == ["1"]
    assert os.path.exists(tmp_path / "1" / "commit_success.txt")


def test_a_partial_save_is_invisible_and_cleaned_up(tmp_path):
    good = {"x": np.arange(4.0)}
    save_checkpoint(tmp_path, 3, good)
    # A run killed while writing step 7 leaves only orbax's temporary directory behind.
    partial = tmp_path / "7.orbax-checkpoint-tmp-1234567"
    partial.mkdir()
    (partial / "state").mkdir()
    (partial / "state" / "half_written").write_bytes(b"\x00\x01")
    assert latest_step(tmp_path) == 3
    assert all_steps(tmp_path) == [3]
    restored, _ = restore_checkpoint(tmp_path, good)
    np.testing.assert_array_equal(restored["x"], good["x"])
    save_checkpoint(tmp_path, 4, {"x": np.ones(4)})  # the next manager removes the leftover
    assert sorted(os.listdir(tmp_path)) == ["3", "4"]


def test_an_existing_checkpoint_is_never_overwritten(tmp_path):
    save_checkpoint(tmp_path, 2, {"x": np.zeros(2)})
    with pytest.raises(FileExistsError, match="step 2 already exists"):
        save_checkpoint(tmp_path, 2, {"x": np.ones(2)})
    restored, _ = restore_checkpoint(tmp_path, {"x": np.zeros(2)})
    np.testing.assert_array_equal(restored["x"], np.zeros(2))


def test_keep_deletes_only_older_checkpoints(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"x": np.full(2, float(step))}, keep=2)
    assert all_steps(tmp_path) == [2, 3]
    restored, _ = restore_checkpoint(tmp_path, {"x": np.zeros(2)}, step=2)
    np.testing.assert_array_equal(restored["x"], [2.0, 2.0])


def test_restore_without_a_checkpoint_names_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint under"):
        restore_checkpoint(tmp_path, {"x": np.zeros(2)})


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    full = tu.uninterrupted_run()  # N = 12 iterations in one go
    k = 5
    config = tu.learning_config(checkpoint_dir=str(tmp_path), checkpoint_every=k)
    first = tu.tiny_trainer(config)
    first_history = first.train(k, progress=False)  # saves at iteration 5
    del first
    assert all_steps(tmp_path) == [k]

    # A new trainer with a differently initialised policy: everything that matters comes from
    # the checkpoint (params, Adam moments, rng, iteration, adaptive β).
    resumed = tu.tiny_trainer(config, policy_seed=11)
    assert resumed.restore(str(tmp_path)) == k
    rest_history = resumed.train(progress=False)  # iterations 6 … 12, saving at 10 and 12

    history = first_history + rest_history
    assert len(history) == len(full.history) == 12
    for got, want in zip(history, full.history):
        for name in tu.TRL_METRICS:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-7, err_msg=name)
    assert_trees_equal(resumed.state, full.state, rtol=1e-6, atol=1e-7)
    assert all_steps(tmp_path) == [10, 12]  # keep_checkpoints = 2


def test_resume_refuses_a_checkpoint_saved_with_other_settings(tmp_path):
    config = tu.tiny_ppo_config(num_iterations=1, checkpoint_dir=str(tmp_path))
    tu.tiny_trainer(config).train(progress=False)
    changed = tu.replace(config, batch_size=16, seed=1)
    with pytest.raises(
        ValueError, match=r"batch_size \(checkpoint 8, now 16\), seed \(checkpoint 0"
    ):
        tu.tiny_trainer(changed).restore(str(tmp_path))
    # Devices, checkpointing and (under a constant learning rate) the run's length may change.
    allowed = tu.replace(
        config, num_iterations=4, parallelism="shard_map", num_devices=4, keep_checkpoints=3
    )
    assert tu.tiny_trainer(allowed).restore(str(tmp_path)) == 1


def test_sft_resumes_exactly_like_an_uninterrupted_run(tmp_path):
    from data_utils import small_task, tiny_lm

    from jaxrlhf.train import SFTConfig, train_sft

    task = small_task()
    ids, mask = (a[:64] for a in task.corpus_batch())
    model = tiny_lm(task.vocab_size)
    config = SFTConfig(steps=6, batch_size=16, warmup_steps=1)
    full, full_metrics = train_sft(model, ids, mask, config, progress=False)
    # The same run, interrupted after 4 steps (a checkpoint at 4), then resumed in a new call.
    first = tu.replace(config, checkpoint_dir=str(tmp_path), checkpoint_every=4)
    train_sft(model, ids, mask, tu.replace(first, steps=6, checkpoint_every=4), progress=False)
    assert all_steps(tmp_path) == [4, 6]
    import shutil

    shutil.rmtree(tmp_path / "6")  # as if killed between the saves at 4 and 6
    resumed, metrics = train_sft(model, ids, mask, first, progress=False)
    assert len(metrics["loss"]) == 2  # only steps 5 and 6 ran
    np.testing.assert_allclose(metrics["loss"], full_metrics["loss"][4:], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(tu.nnx.state(resumed)), jax.tree.leaves(tu.nnx.state(full))):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match=r"SFTConfig differs .* learning_rate"):
        train_sft(model, ids, mask, tu.replace(first, learning_rate=0.5), progress=False)


def test_a_checkpoint_of_the_other_block_layout_is_refused_clearly(tmp_path):
    """Blocks held one per layer (``layers/0``, ``layers/1``, …: scan_layers off, or a jaxrlhf from
    before the blocks were stacked) cannot fill stacked [L, ...] parameters, nor the other way
    round: refused with the flag that resumes it, not orbax's tree dump; with it, it resumes."""
    from flax import nnx

    from jaxrlhf.models import CausalLM, ModelConfig
    from jaxrlhf.models.heads import with_settings

    config = ModelConfig(family="llama", vocab_size=32, hidden_size=16, num_layers=2, num_heads=2)
    stacked = CausalLM(config, rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(stacked, nnx.Param))
    listed = nnx.to_pure_dict(nnx.state(with_settings(stacked, scan_layers=False), nnx.Param))
    assert sorted(listed["model"]["layers"]) == [0, 1]
    save_checkpoint(tmp_path, 3, {"params": listed})
    with pytest.raises(ValueError, match=r"step 3.*one per layer.*resume with scan_layers off"):
        restore_checkpoint(tmp_path, {"params": params})
    restored, _ = restore_checkpoint(tmp_path, {"params": listed})
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(listed)):
        np.testing.assert_array_equal(a, b)
    save_checkpoint(tmp_path / "stacked", 2, {"params": params})
    with pytest.raises(ValueError, match=r"step 2.*stacked.*drop --no-scan-layers"):
        restore_checkpoint(tmp_path / "stacked", {"params": listed})
    # Any other mismatch names the differing paths.
    save_checkpoint(tmp_path / "other", 1, {"params": {"a": np.zeros(2)}})
    with pytest.raises(ValueError, match=r"does not have the structure.*'b'"):
        restore_checkpoint(tmp_path / "other", {"params": {"b": np.zeros(2)}})
