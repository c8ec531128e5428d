"""Hardening: a non-finite loss or gradient skips its update (and K in a row stop the run with the
last good checkpoint intact); a PPO run killed with SIGKILL at any moment resumes to the very same
metrics; the same command twice writes the same metrics.

tests/conftest.py forces 8 CPU devices; the train-step tests use 2 of them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import train_utils as tu
from flax import nnx

from jaxrlhf.data.demo_task import sample_corpus, sample_prompts
from jaxrlhf.logging import read_metrics
from jaxrlhf.models import CausalLM
from jaxrlhf.models.hf import save_pretrained
from jaxrlhf.models.tokenizer import train_bpe_tokenizer
from jaxrlhf.train import state as st
from jaxrlhf.train.checkpoint import all_steps, restore_checkpoint
from jaxrlhf.train.loop import LoopConfig, NonFiniteError, epoch_batches, fit
from jaxrlhf.train.optim import OptimizerConfig
from jaxrlhf.train.ppo import PPOConfig
from jaxrlhf.train.reward import reward_model_from_policy
from jaxrlhf.train.sft import tiny_model_config

ADAM = OptimizerConfig(learning_rate=0.1, total_steps=10, schedule="constant", max_grad_norm=1.0)


def host(tree):
    """A host (numpy) copy of a pytree: the steps donate their input state."""
    return jax.tree.map(np.array, tree)


def assert_bitwise_equal(a, b):
    la, lb = jax.tree.leaves(host(a)), jax.tree.leaves(host(b))
    assert jax.tree.structure(host(a)) == jax.tree.structure(host(b))
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(x, y)


# ============================================================================ the train step


@dataclasses.dataclass(frozen=True)
class SquaredError:
    """Σ (x·w − y)² over the rows, as one (sum, count) term."""

    weights: tuple = (("mse", 1.0),)

    def __call__(self, params, batch):
        x, y = batch
        return {"mse": (jnp.sum((x @ params["w"] - y) ** 2), jnp.asarray(y.shape[0]))}


def regression(num_rows=8, nan_rows=()):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((num_rows, 3)).astype(np.float32)
    y = rng.standard_normal(num_rows).astype(np.float32)
    y[list(nan_rows)] = np.nan
    return {"w": jnp.asarray(rng.standard_normal(3), jnp.float32)}, (x, y)


@pytest.mark.parametrize("mode", ["single", "pmap", "shard_map"])
def test_a_finite_step_is_exactly_the_plain_optax_update(mode):
    params, batch = regression()
    stepper = st.make_train_step(SquaredError(), ADAM, parallelism=mode,
                                 num_devices=None if mode == "single" else 2)  # fmt: skip
    state = st.init_train_state(params, ADAM)
    got, metrics = stepper.step(stepper.put_state(state), stepper.put_batch(batch))
    # The oracle: optax by hand on the gradient of the mean squared error.
    grads = jax.grad(lambda p: jnp.mean((batch[0] @ p["w"] - batch[1]) ** 2))(params)
    optimizer = ADAM.build()
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    np.testing.assert_allclose(
        stepper.get_state(got).params["w"], optax.apply_updates(params, updates)["w"], rtol=1e-6
    )
    assert float(metrics["nonfinite_skipped"]) == 0.0


@pytest.mark.parametrize("mode", ["single", "pmap", "shard_map"])
@pytest.mark.parametrize("poison", ["nan", "inf"])
def test_a_non_finite_loss_skips_the_update_on_every_device(mode, poison):
    # One bad row on one of the two devices: after the psum every device skips alike.
    params, (x, y) = regression()
    y[5] = np.nan if poison == "nan" else np.inf
    stepper = st.make_train_step(SquaredError(), ADAM, parallelism=mode,
                                 num_devices=None if mode == "single" else 2)  # fmt: skip
    state = st.init_train_state(params, ADAM)
    device_state = stepper.put_state(state)
    before = host(stepper.get_state(device_state))
    after, metrics = stepper.step(device_state, stepper.put_batch((x, y)))
    after = stepper.get_state(after)
    assert_bitwise_equal(after.params, before.params)
    assert_bitwise_equal(after.opt_state, before.opt_state)  # Adam moments, counts
    assert int(after.step) == 1  # one batch consumed
    assert float(metrics["nonfinite_skipped"]) == 1.0
    assert not np.isfinite(float(metrics["loss"]))


def test_a_non_finite_gradient_with_a_finite_loss_is_skipped():
    # sqrt at 0: the loss is 0 (finite) but its gradient is inf · 0 = NaN.
    @dataclasses.dataclass(frozen=True)
    class Sqrt:
        weights: tuple = (("root", 1.0),)

        def __call__(self, params, batch):
            return {"root": (jnp.sum(jnp.sqrt(params["w"] * batch)), jnp.asarray(1.0))}

    stepper = st.make_train_step(Sqrt(), ADAM)
    state = st.init_train_state({"w": jnp.zeros(2)}, ADAM)
    before = host(state)
    after, metrics = stepper.step(state, jnp.ones(2))
    assert float(metrics["loss"]) == 0.0 and float(metrics["nonfinite_skipped"]) == 1.0
    assert_bitwise_equal(after.params, before.params)
    assert_bitwise_equal(after.opt_state, before.opt_state)


@pytest.mark.parametrize("mode", ["single", "pmap"])
def test_run_steps_counts_the_skipped_minibatches_and_applies_the_others(mode):
    # Minibatch 1 of 3 holds a NaN: the result equals running minibatches 0 and 2 alone.
    params, data = regression(num_rows=12, nan_rows=[5])
    stepper = st.make_train_step(SquaredError(), ADAM, parallelism=mode,
                                 num_devices=None if mode == "single" else 2)  # fmt: skip
    indices = np.arange(12).reshape(3, 4)
    got, metrics = st.run_steps(stepper, st.init_train_state(params, ADAM), data, indices)
    want, _ = st.run_steps(stepper, st.init_train_state(params, ADAM), data, indices[[0, 2]])
    assert float(metrics["nonfinite_skipped"]) == 1.0  # summed, not averaged
    assert int(got.step) == 3 and int(want.step) == 2
    assert_bitwise_equal(got.params, want.params)
    assert_bitwise_equal(got.opt_state, want.opt_state)


# ============================================================================ the loops


def test_config_refuses_a_zero_skip_limit_naming_the_field():
    with pytest.raises(ValueError, match=r"PPOConfig\.max_nonfinite_skips = 0"):
        PPOConfig(max_nonfinite_skips=0)
    with pytest.raises(ValueError, match=r"LoopConfig\.max_nonfinite_skips = -1"):
        LoopConfig(max_nonfinite_skips=-1)


def test_fit_stops_after_k_skipped_steps_keeping_the_last_good_checkpoint(tmp_path):
    # batch_size 1: steps 3 and 4 read the two poisoned rows (epoch_batches says which).
    order = epoch_batches(8, 1, 0, seed=0)[:, 0]
    params, data = regression(num_rows=8, nan_rows=[order[2], order[3]])
    config = LoopConfig(checkpoint_dir=str(tmp_path), checkpoint_every=1, keep_checkpoints=2,
                        max_nonfinite_skips=2)  # fmt: skip
    stepper = st.make_train_step(SquaredError(), ADAM)
    seen = []
    with pytest.raises(NonFiniteError, match=r"at step 4: 2 consecutive steps .*max_nonfinite"):
        fit(stepper, st.init_train_state(params, ADAM), data, batch_size=1, steps=8, seed=0,
            config=config, desc="t", progress=False,
            callback=lambda step, m, s: seen.append((step, m["nonfinite_skipped"], host(s))))  # fmt: skip
    assert [(step, skipped) for step, skipped, _ in seen] == [(1, 0), (2, 0), (3, 1), (4, 1)]
    assert all_steps(tmp_path) == [1, 2]  # nothing saved inside the run of skips
    restored, _ = restore_checkpoint(tmp_path, st.init_train_state(params, ADAM))
    assert_bitwise_equal(restored, seen[1][2])
    assert_bitwise_equal(seen[3][2].params, seen[1][2].params)  # the skips changed nothing
    assert_bitwise_equal(seen[3][2].opt_state, seen[1][2].opt_state)


# ============================================================================ PPO with a NaN reward


def nan_reward_on(iterations: set[int]):
    """The toy reward, NaN for every row on the given (1-based) iterations; the counter is the
    number of calls, one per iteration."""
    calls = []

    def reward_fn(prompt_ids, prompt_mask, rollout):
        calls.append(None)
        scores = tu.target_fraction_reward(prompt_ids, prompt_mask, rollout)
        return jnp.full_like(scores, jnp.nan) if len(calls) in iterations else scores

    return reward_fn


def test_a_nan_reward_skips_that_ppo_iteration_and_training_continues():
    config = tu.tiny_ppo_config(num_iterations=3)
    trainer = tu.tiny_trainer(config, reward_fn=nan_reward_on({2}))
    updates = config.ppo_epochs * config.num_minibatches
    first = trainer.step()
    assert first["nonfinite_skipped"] == 0.0
    before = host(trainer.state)
    second = trainer.step()
    assert second["nonfinite_skipped"] == updates  # every minibatch saw the NaN
    assert np.isnan(second["objective/scores"]) and np.isnan(second["loss"])
    assert_bitwise_equal(trainer.state.train.params, before.train.params)
    assert_bitwise_equal(trainer.state.train.opt_state, before.train.opt_state)
    assert int(trainer.state.iteration) == 2  # the iteration itself is done
    third = trainer.step()
    assert third["nonfinite_skipped"] == 0.0 and np.isfinite(third["loss"])
    moved = jax.tree.leaves(host(trainer.state.train.params))
    assert any(
        not np.array_equal(a, b) for a, b in zip(moved, jax.tree.leaves(before.train.params))
    )


def test_k_nan_iterations_stop_ppo_naming_the_iteration_with_the_checkpoint_intact(tmp_path):
    config = tu.tiny_ppo_config(num_iterations=6, checkpoint_dir=str(tmp_path), checkpoint_every=1,
                                keep_checkpoints=2, max_nonfinite_skips=2)  # fmt: skip
    trainer = tu.tiny_trainer(config, reward_fn=nan_reward_on({3, 4, 5, 6}))
    logged = []
    with pytest.raises(NonFiniteError, match=r"at iteration 4: 2 consecutive iterations") as err:
        trainer.train(progress=False, callback=lambda it, m: logged.append(it))
    assert "PPOConfig.max_nonfinite_skips = 2" in str(err.value) and str(tmp_path) in str(err.value)
    assert logged == [1, 2, 3, 4]
    assert all_steps(tmp_path) == [1, 2]  # the last good checkpoint, untouched
    fresh = tu.tiny_trainer(config)
    assert fresh.restore(str(tmp_path)) == 2
    assert_bitwise_equal(fresh.state.train.params, trainer.state.train.params)
    assert_bitwise_equal(fresh.state.train.opt_state, trainer.state.train.opt_state)


# ============================================================================ kill -9 and determinism
#
# Real `jaxrlhf` processes, eight of them:
#   ppo_a, rm_a         first, side by side: the uninterrupted runs (they fill the compilation cache)
#   then, side by side:
#   ppo_b, rm_b         the same commands again (determinism)
#   killed_in_save      the PPO run paused inside orbax's finalize of checkpoint 2 (everything written
#                       into the temporary directory, not yet renamed) and SIGKILLed there
#   killed_at_random    its resume, SIGKILLed a seeded random delay after its checkpoint 2 is final
#   finished            the resume of that, to the end; its metrics must equal ppo_a's
#   ppo_nan             PPO against a reward model whose scores are NaN (also in the second group)
# The kill hook is a wrapper script that patches orbax in the killed process only: the product code
# runs unchanged. The processes share a persistent XLA compilation cache in the test's directory (the
# CLI caches compiled programs by default too), so only the first two compile.

DATA_FLAGS = ["--data-max-prompt-length", "20", "--data-max-response-length", "8"]
ITERATIONS = 4
TIMEOUT_S = 600  # per process; only reached when something hangs

PAUSE_IN_FINALIZE = """
import os, sys, time
from orbax.checkpoint._src.path import atomicity

finalize = atomicity.AtomicRenameTemporaryPath.finalize

async def paused_finalize(self):
    if os.path.basename(str(self._final_path)) == os.environ["PAUSE_AT_STEP"]:
        with open(os.environ["PAUSE_SIGNAL"], "w") as f:
            f.write(str(self._tmp_path))
        time.sleep(TIMEOUT)  # the test SIGKILLs the process here
    return await finalize(self)

atomicity.AtomicRenameTemporaryPath.finalize = paused_finalize
from jaxrlhf.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny base LM with its tokenizer, a reward model on its trunk, prompts and pairs."""
    root = tmp_path_factory.mktemp("robust")
    rng = np.random.default_rng(0)
    tokenizer = train_bpe_tokenizer(sample_corpus(rng, 300), 384)
    config = tiny_model_config(len(tokenizer), hidden_size=16, num_layers=1,
                               max_position_embeddings=32)  # fmt: skip
    base = CausalLM(config, rngs=nnx.Rngs(0))
    save_pretrained(base, root / "base", tokenizer=tokenizer)
    reward_model = reward_model_from_policy(base, seed=1)
    save_pretrained(reward_model, root / "rm", tokenizer=tokenizer)
    reward_model.score.bias[...] = jnp.full_like(reward_model.score.bias[...], jnp.nan)
    with pytest.warns(UserWarning, match="bias nan"):  # scores every reply NaN
        save_pretrained(reward_model, root / "rm_nan", tokenizer=tokenizer)
    prompts = sample_prompts(rng, 16)
    with open(root / "prefs.jsonl", "w") as f:
        f.writelines(
            json.dumps({"prompt": p, "chosen": " great .", "rejected": " awful ."}) + "\n"
            for p in prompts
        )
    with open(root / "prompts.jsonl", "w") as f:
        f.writelines(json.dumps({"prompt": p}) + "\n" for p in prompts)
    (root / "pause.py").write_text(PAUSE_IN_FINALIZE.replace("TIMEOUT", str(TIMEOUT_S)))
    return root


def ppo_argv(ws, out, reward_model="rm"):
    return ["ppo", "--prompts", str(ws / "prompts.jsonl"), "--policy", str(ws / "base"),
            "--reward-model", str(ws / reward_model), "--out", str(out), "--quiet",
            "--ppo-batch-size", "4", "--ppo-max-new-tokens", "4", "--ppo-epochs", "1",
            "--ppo-num-iterations", str(ITERATIONS), "--ppo-checkpoint-every", "1",
            *DATA_FLAGS]  # fmt: skip


def rm_argv(ws, out):
    return ["train-rm", "--data", str(ws / "prefs.jsonl"), "--model", str(ws / "base"),
            "--out", str(out), "--rm-epochs", "1", "--rm-batch-size", "4", "--quiet",
            *DATA_FLAGS]  # fmt: skip


def start(argv, log, cache, script=None, **env):
    """A `jaxrlhf` process (or the pause wrapper running one), output into ``log``, compiled
    programs cached under ``cache``."""
    command = [sys.executable, *([str(script)] if script else ["-m", "jaxrlhf.cli"]), *argv]
    env = {
        **os.environ,
        "JAXRLHF_COMPILE_CACHE": "0",  # not the user's cache: this test's, through JAX's variables
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        **env,
    }
    with open(log, "w") as f:
        return subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env=env)


def finish(process, log) -> int:
    code = process.wait(timeout=TIMEOUT_S)
    assert code == 0, f"{process.args} → {code}:\n{log.read_text()[-3000:]}"
    return code


def wait_for(condition, process, log):
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        assert process.poll() is None, f"{process.args} ended first:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{process.args}: waited {TIMEOUT_S} s"
        time.sleep(0.01)


def kill(process) -> int:
    process.send_signal(signal.SIGKILL)
    return process.wait(timeout=TIMEOUT_S)


def temporary_dirs(directory):
    return sorted(n for n in os.listdir(directory) if "orbax-checkpoint-tmp" in n)


def finalized(directory):
    """The step directories (renamed, so complete), read without orbax: a CheckpointManager would
    clean up the temporary directories this test inspects."""
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


@pytest.fixture(scope="module")
def runs(workspace, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    out = {name: root / name for name in ("ppo_a", "ppo_b", "rm_a", "rm_b", "killed", "ppo_nan")}
    checkpoints = out["killed"] / "checkpoints"
    signal_file = root / "paused"
    processes = {}
    result = {"out": out}

    def run(name, argv, **kwargs):
        processes[name] = start(argv, root / f"{name}.log", root / "xla", **kwargs)
        return processes[name]

    def done(name):
        result[name] = finish(processes[name], root / f"{name}.log")

    try:
        run("ppo_a", ppo_argv(workspace, out["ppo_a"]))
        run("rm_a", rm_argv(workspace, out["rm_a"]))
        done("ppo_a")
        run("ppo_b", ppo_argv(workspace, out["ppo_b"]))
        paused = run("killed_in_save", ppo_argv(workspace, out["killed"]),
                     script=workspace / "pause.py", PAUSE_AT_STEP="2",
                     PAUSE_SIGNAL=str(signal_file))  # fmt: skip
        done("rm_a")
        run("rm_b", rm_argv(workspace, out["rm_b"]))
        nan = run("ppo_nan", [*ppo_argv(workspace, out["ppo_nan"], "rm_nan"),
                              "--ppo-max-nonfinite-skips", "2"])  # fmt: skip

        # 1. Kill inside the save of checkpoint 2: its files are written, not yet renamed.
        wait_for(signal_file.exists, paused, root / "killed_in_save.log")
        result["in_save"] = {
            "tmp_dir": os.path.basename(signal_file.read_text()),
            "tmp_dirs": temporary_dirs(checkpoints),
            "code": kill(paused),
            "steps": finalized(checkpoints),
            "logged": [r["step"] for r in read_metrics(out["killed"] / "metrics.jsonl")],
        }
        # 2. Resume, and kill again at a seeded random moment after its checkpoint 2 is final.
        resumed = run("killed_at_random", ppo_argv(workspace, out["killed"]))
        wait_for(lambda: 2 in finalized(checkpoints), resumed, root / "killed_at_random.log")
        time.sleep(np.random.default_rng(12).uniform(0.0, 0.5))
        result["at_random"] = {
            "code": kill(resumed),
            "log": (root / "killed_at_random.log").read_text(),
        }
        # 3. Resume to the end.
        run("finished", ppo_argv(workspace, out["killed"]))
        done("finished")
        result["finished_log"] = (root / "finished.log").read_text()
        for name in ("ppo_b", "rm_b"):
            done(name)
        result["ppo_nan"] = nan.wait(timeout=TIMEOUT_S)
        result["ppo_nan_log"] = (root / "ppo_nan.log").read_text()
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    return result


def records(path):
    """The metrics records without the wall-clock timings (time/*)."""
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in read_metrics(path)]


def test_ppo_killed_during_a_save_and_at_random_resumes_to_the_uninterrupted_metrics(runs):
    in_save = runs["in_save"]
    assert in_save["code"] == -signal.SIGKILL
    assert in_save["tmp_dir"].startswith("2.orbax-checkpoint-tmp")
    assert in_save["tmp_dirs"] == [in_save["tmp_dir"]]  # checkpoint 2 was mid-save
    assert in_save["steps"] == [1]  # …and is invisible: checkpoint 1 is the latest
    assert in_save["logged"] == [1, 2]  # iteration 2 had been logged before its save
    assert (
        "resumed from" in runs["at_random"]["log"] and "at iteration 1" in runs["at_random"]["log"]
    )
    assert runs["finished"] == 0 and "resumed from" in runs["finished_log"]
    checkpoints = runs["out"]["killed"] / "checkpoints"
    assert temporary_dirs(checkpoints) == [] and all_steps(checkpoints) == [3, 4]
    got = records(runs["out"]["killed"] / "metrics.jsonl")
    want = records(runs["out"]["ppo_a"] / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(1, ITERATIONS + 1))
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for key in w:
            np.testing.assert_allclose(g[key], w[key], rtol=1e-6, atol=1e-7, err_msg=key)


def test_the_same_ppo_command_twice_writes_the_same_metrics(runs):
    assert runs["ppo_a"] == runs["ppo_b"] == 0
    a = records(runs["out"]["ppo_a"] / "metrics.jsonl")
    assert [r["step"] for r in a] == list(range(1, ITERATIONS + 1))
    assert a == records(runs["out"]["ppo_b"] / "metrics.jsonl")


def test_the_same_train_rm_command_twice_writes_the_same_metrics(runs):
    assert runs["rm_a"] == runs["rm_b"] == 0
    a = read_metrics(runs["out"]["rm_a"] / "metrics.jsonl")
    assert len(a) == 3 and all(np.isfinite(r["train/loss"]) for r in a)  # 14 train pairs / 4
    assert a == read_metrics(runs["out"]["rm_b"] / "metrics.jsonl")


def test_a_nan_reward_model_stops_the_ppo_command_with_one_error_line(runs):
    assert runs["ppo_nan"] == 2, runs["ppo_nan_log"][-3000:]
    errors = [line for line in runs["ppo_nan_log"].splitlines() if "error" in line.lower()]
    assert len(errors) == 1, errors
    assert errors[0].startswith("error: non-finite loss or gradient at iteration 2: 2 consecutive")
    assert "--ppo-max-nonfinite-skips 2" in errors[0]
    logged = read_metrics(runs["out"]["ppo_nan"] / "metrics.jsonl")
    updates = PPOConfig(batch_size=4).num_minibatches  # × ppo_epochs = 1
    assert [(r["step"], r["nonfinite_skipped"]) for r in logged] == [(1, updates), (2, updates)]
    assert all(r["objective/scores"] is None for r in logged)  # NaN is written as null
    assert all_steps(runs["out"]["ppo_nan"] / "checkpoints") == []  # never a good state to save
