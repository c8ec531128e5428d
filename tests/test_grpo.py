"""GRPO and its relatives: the config, the group helpers, Python reward functions, and runs that
learn a token-level reward with every advantage estimator."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_utils as tu
from flax import nnx

from jaxrlhf.models import CausalLM
from jaxrlhf.rollout import Rollout
from jaxrlhf.train.grpo import (
    GRPOTrainer,
    _merge_groups,
    minibatch_indices,
    text_reward_fn,
    zero_std_groups,
)
from jaxrlhf.train.grpo_config import GRPOConfig


def tiny_grpo_config(**overrides) -> GRPOConfig:
    fields = {"num_iterations": 12, "batch_size": 4, "group_size": 4, "num_minibatches": 2,
              "epochs": 1, "max_new_tokens": 6, "learning_rate": 1e-2, "lr_schedule": "constant",
              "seed": 0}  # fmt: skip
    return GRPOConfig(**{**fields, **overrides})


def grpo_trainer(config, reward_fn=tu.target_fraction_reward):
    ids, mask = tu.tiny_prompts()
    sft = CausalLM(tu.tiny_config(), rngs=nnx.Rngs(0))
    return GRPOTrainer.from_sft(config, sft, ids, mask, reward_fn=reward_fn, eos_token_id=tu.EOS)


@pytest.mark.parametrize(
    "field, value",
    [("group_size", 1), ("num_minibatches", 3), ("advantage", "ppo"), ("clip_eps", 1.0),
     ("importance_level", "batch"), ("kl_in", "value"), ("tis_cap", 0.0),
     ("loss_aggregation", "sum")],
)  # fmt: skip
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"GRPOConfig\.{field} = "):
        tiny_grpo_config(**{field: value})


def test_minibatches_hold_whole_groups_and_zero_signal_groups_are_found():
    idx = np.asarray(
        minibatch_indices(jax.random.PRNGKey(0), epochs=2, rollouts=12, minibatch=6, group_size=3)
    )  # 2 epochs × 2 minibatches of 2 groups of 3
    assert idx.shape == (4, 6)
    for epoch in (idx[:2], idx[2:]):  # every row once per epoch
        np.testing.assert_array_equal(np.sort(epoch.ravel()), np.arange(12))
    groups = idx.reshape(-1, 3)  # each minibatch: whole groups, rows in order
    np.testing.assert_array_equal(groups - groups[:, :1], np.tile([0, 1, 2], (8, 1)))
    assert np.all(groups[:, 0] % 3 == 0)
    rows = np.asarray(minibatch_indices(jax.random.PRNGKey(0), epochs=1, rollouts=12, minibatch=6))
    assert sorted(rows.ravel()) == list(range(12))  # group_size 1: a permutation of the rows
    scores = jnp.array([1.0, 1.0, 0.0, 2.0, 3.0, 3.0])  # groups of 2: equal, unequal, equal
    np.testing.assert_array_equal(zero_std_groups(scores, 2), [True, False, True])


def test_dynamic_sampling_fills_zero_signal_groups_from_a_new_draw():
    kept = (jnp.arange(6.0), jnp.array([1.0, 1.0, 0.0, 2.0, 5.0, 5.0]))  # groups 0 and 2: no signal
    new = (
        jnp.arange(6.0) + 10,
        jnp.array([4.0, 4.0, 7.0, 8.0, 1.0, 2.0]),
    )  # groups 1 and 2: signal
    # the scores are the last element of a group tuple; pad to the (ids, mask, rollout, scores) shape
    merged, filled = _merge_groups(
        (*kept[:1], None, None, kept[1]), (*new[:1], None, None, new[1]), 2
    )
    assert filled == 2
    np.testing.assert_array_equal(merged[3], [7.0, 8.0, 0.0, 2.0, 1.0, 2.0])
    np.testing.assert_array_equal(merged[0], [12.0, 13.0, 2.0, 3.0, 14.0, 15.0])


def test_python_reward_functions_are_summed_with_weights():
    class Chars:  # a tokenizer stand-in: token t is the letter chr(ord('a') + t)
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(ord("a") + t) for t in ids)

    def length(prompts, completions):
        return [len(c) for c in completions]

    def has_b(prompts, completions):
        return [0.5 * ("b" in c) for c in completions]

    fn = text_reward_fn([length, has_b], Chars(), weights=[1.0, 2.0])
    rollout = Rollout(tokens=jnp.array([[1, 2, 0], [0, 0, 0]]),
                      mask=jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]),
                      logprobs=jnp.zeros((2, 3)))  # fmt: skip
    scores = fn(jnp.zeros((2, 1), jnp.int32), jnp.ones((2, 1)), rollout)
    np.testing.assert_allclose(scores, [2 + 2 * 0.5, 1 + 0.0])  # "bc", "a"
    bad = text_reward_fn([lambda p, c: [1.0]], Chars())
    with pytest.raises(ValueError, match="returned 1 values for 2 completions"):
        bad(jnp.zeros((2, 1), jnp.int32), jnp.ones((2, 1)), rollout)


def test_grpo_raises_the_reward():
    history = grpo_trainer(tiny_grpo_config()).train(progress=False)
    rewards = [m["reward"] for m in history]
    assert np.mean(rewards[:2]) < 0.15 and np.mean(rewards[-3:]) > 0.4, rewards
    for m in history:
        for name in ("reward", "reward_std", "frac_reward_zero_std", "loss/policy"):
            assert math.isfinite(m[name]), name
        assert "kl" not in m  # β = 0: no reference pass, so no KL to report


@pytest.mark.parametrize(
    "overrides",
    [{"advantage": "dr_grpo", "loss_aggregation": "seq_mean_token_sum_norm"},
     {"advantage": "rloo", "kl_coef": 0.1},
     {"advantage": "reinforce_pp", "kl_coef": 0.1, "kl_in": "reward"},
     {"clip_eps_high": 0.28, "importance_level": "sequence", "epochs": 2, "tis_cap": 2.0}],
)  # fmt: skip
def test_every_variant_runs_an_iteration(overrides):
    metrics = grpo_trainer(tiny_grpo_config(num_iterations=1, **overrides)).step()
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    if overrides.get("kl_coef"):  # k3 against the reference: 0 at the first minibatch (π = π_ref)
        assert 0.0 <= metrics["kl"] < 0.05, metrics["kl"]
    assert metrics["tis/mean_abs_logprob_diff"] < 1e-4  # same model samples and trains


def test_constant_rewards_are_reported_and_resampled():
    constant = lambda prompt_ids, prompt_mask, rollout: jnp.ones(prompt_ids.shape[0])
    metrics = grpo_trainer(tiny_grpo_config(num_iterations=1), constant).step()
    assert metrics["frac_reward_zero_std"] == 1.0 and metrics["loss/policy"] == 0.0
    # With dynamic sampling, groups without signal are replaced (here: by groups of fresh prompts
    # whose target-token rewards differ).
    trainer = grpo_trainer(tiny_grpo_config(num_iterations=1, dynamic_sampling=True))
    metrics = trainer.step()
    assert metrics["frac_reward_zero_std"] <= 0.25


def test_arithmetic_demo_end_to_end(tmp_path, monkeypatch):
    """`jaxrlhf demo --task arithmetic --algo rloo`'s code path, shortened (50 SFT steps, 2 RLOO
    iterations): the summary, metrics and report it writes, with values in their ranges."""
    import json

    from jaxrlhf.demo import DemoConfig, common, run_demo

    monkeypatch.setitem(common.ARITHMETIC_SFT, "steps", 50)
    demo = DemoConfig(task="arithmetic", algo="rloo", out_dir=str(tmp_path))
    grpo = GRPOConfig(num_iterations=2, batch_size=8, group_size=4, learning_rate=1e-4,
                      lr_schedule="constant")  # fmt: skip
    summary = run_demo(demo, grpo=grpo, progress=False, echo=lambda line: None)
    assert summary == json.loads((tmp_path / "summary.json").read_text())
    assert summary["algo"] == "rloo" and summary["num_eval_prompts"] == 200
    for name in ("held_out_accuracy", "held_out_well_formed"):
        assert set(summary[name]) == {"before", "after"}
        assert all(0.0 <= v <= 1.0 for v in summary[name].values()), summary
    # 50 steps of the signing demonstrator: most non-negative answers come out signed, ill-formed.
    assert summary["held_out_well_formed"]["before"] < 0.7, summary
    records = [
        json.loads(line) for line in (tmp_path / "metrics_rloo.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in records] == [1, 2]
    assert (tmp_path / "report.md").exists()
