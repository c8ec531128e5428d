"""Small data: a batch larger than the data trains on what there is (one line says so), a warm-up
longer than the run is cut to it, and a constraint no batch can meet is a ValueError naming the
field.
Every trainer: SFT, reward model, DPO (rows), PPO and GRPO (prompts per iteration)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
import train_utils as tu
from flax import nnx

from jaxrlhf.data.preference import PairBatch
from jaxrlhf.models import CausalLM
from jaxrlhf.train.dpo import DPOConfig, train_dpo
from jaxrlhf.train.grpo import GRPOTrainer
from jaxrlhf.train.grpo_config import GRPOConfig
from jaxrlhf.train.optim import scheduled_adamw, supervised_adamw, warmup_for_run
from jaxrlhf.train.ppo import PPOTrainer
from jaxrlhf.train.reward import RewardConfig, reward_model_from_policy, train_reward_model
from jaxrlhf.train.sft import SFTConfig, train_sft

ROWS, LENGTH = 16, 8


def _lm(seed: int = 0) -> CausalLM:
    return CausalLM(tu.tiny_config(), rngs=nnx.Rngs(seed))


def _sequences(seed: int = 0):
    """16 right-padded random sequences [16, 8] (tokens 2 … VOCAB−1, 4 to 8 real)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, tu.VOCAB, size=(ROWS, LENGTH)).astype(np.int32)
    mask = (np.arange(LENGTH)[None] < rng.integers(4, LENGTH + 1, size=(ROWS, 1))).astype(np.int32)
    return np.where(mask > 0, ids, tu.PAD), mask


def _pairs() -> PairBatch:
    """16 pairs: a shared 4-token prompt, two random 4-token responses each."""
    (chosen, chosen_mask), (rejected, _) = _sequences(1), _sequences(2)
    rejected = np.concatenate([chosen[:, :4], rejected[:, 4:]], axis=1)
    full = np.ones_like(chosen_mask)
    return PairBatch(chosen, full, rejected, full, num_truncated=0, prompt_length=4)


def _params(model) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def _changed(before, after) -> bool:
    """Whether any parameter differs (``before``: a model, or its _params taken before a trainer
    donated its state)."""
    before = before if isinstance(before, list) else _params(before)
    return any(not np.allclose(a, b) for a, b in zip(before, _params(after)))


def _notes(capsys) -> list[str]:
    return capsys.readouterr().err.splitlines()


# ---------------------------------------------------------------------------- the schedule


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_a_warmup_longer_than_the_run_is_cut_to_its_last_step(schedule):
    # T = 5 steps, warmup 30 → w = T − 1 = 4: η(t) = η₀·t/4 for t ≤ 4, so η(0) = 0, η(1) = η₀/4 and
    # the last step t = 4 runs at the peak η₀ (the decay would start after the run).
    config = SFTConfig(steps=5, learning_rate=0.2, lr_schedule=schedule, warmup_steps=30)
    optimizer = config.optimizer
    assert optimizer.warmup_steps == 4
    lr = optimizer.schedule_fn()
    np.testing.assert_allclose([lr(0), lr(1), lr(4)], [0.0, 0.05, 0.2], rtol=1e-6, atol=1e-9)
    # A warm-up that fits is kept: T = 10, w = 4, linear decay over the last 6 steps:
    # η(9) = η₀ · (1 − (9 − 4)/6) = η₀/6.
    fits = supervised_adamw(SFTConfig(learning_rate=0.6, warmup_steps=4), 10)
    assert fits.warmup_steps == 4
    np.testing.assert_allclose(fits.schedule_fn()(9), 0.1, rtol=1e-6)
    assert [warmup_for_run(30, t) for t in (1, 2, 31, 40)] == [0, 1, 30, 30]


def test_the_rl_trainers_cut_the_warmup_in_the_same_place():
    config = tu.tiny_ppo_config(num_iterations=2, ppo_epochs=1, num_minibatches=1, warmup_steps=9)
    assert config.optimizer.total_steps == 2 and config.optimizer.warmup_steps == 1
    grpo = GRPOConfig(num_iterations=3, batch_size=2, group_size=2, warmup_steps=50)
    assert scheduled_adamw(grpo, 3).warmup_steps == 2


# ---------------------------------------------------------------------------- supervised trainers


def test_sft_with_more_batch_than_sequences_trains_on_all_of_them(capsys):
    ids, mask = _sequences()
    model = _lm()
    config = SFTConfig(steps=3, batch_size=64, learning_rate=1e-2, warmup_steps=30)
    trained, metrics = train_sft(model, ids, mask, config, progress=False)
    assert _notes(capsys) == [
        "SFT: batch_size 64 > the 16 training sequences: training on batches of 16",
        "SFT: warmup_steps 30 ≥ the run's 3 steps: warming up over 2",
    ]
    assert metrics["num_train"] == 16 and len(metrics["loss"]) == 3
    # every step sees all 16 rows; warm-up over 2: η(0) = 0 leaves the model as it was, so the
    # second loss equals the first; η(1) = η₀/2 then moves it.
    np.testing.assert_allclose(metrics["loss"][1], metrics["loss"][0], rtol=1e-5)
    assert metrics["loss"][2] < metrics["loss"][1]
    assert _changed(model, trained)


def test_a_resumed_clamped_sft_run_compares_equal_to_its_checkpoint(tmp_path, capsys):
    ids, mask = _sequences()
    config = SFTConfig(
        steps=3, batch_size=64, learning_rate=1e-2, warmup_steps=30, checkpoint_dir=str(tmp_path)
    )  # the config of the test above but for checkpoint_dir: its compiled step serves
    first, _ = train_sft(_lm(), ids, mask, config, progress=False)
    # the same flags again: the saved (clamped) config matches, the run is complete, nothing to do
    again, metrics = train_sft(_lm(), ids, mask, config, progress=False)
    assert metrics["loss"] == []
    assert not _changed(first, again)
    line = "SFT: batch_size 64 > the 16 training sequences: training on batches of 16"
    assert _notes(capsys).count(line) == 2
    # another batch size is another run: refused, naming the field
    with pytest.raises(
        ValueError, match=r"SFTConfig differs .* batch_size \(checkpoint 16, now 8\)"
    ):
        train_sft(_lm(), ids, mask, dataclasses.replace(config, batch_size=8), progress=False)


def test_sft_batch_on_devices_is_a_multiple_of_them(capsys):
    ids, mask = _sequences()
    config = SFTConfig(steps=1, batch_size=64, parallelism="shard_map", num_devices=3)
    _, metrics = train_sft(_lm(), ids[:7], mask[:7], config, progress=False)
    assert _notes(capsys) == [
        "SFT: batch_size 64 > the 7 training sequences: training on batches of 6"
    ]
    assert metrics["num_train"] == 7 and len(metrics["loss"]) == 1
    refused = (
        r"^SFTConfig\.num_devices = 3: the 2 training sequences cannot fill one batch "
        r"\(a multiple of the 3 devices the batch is split over\)$"
    )
    with pytest.raises(ValueError, match=refused):
        train_sft(_lm(), ids[:2], mask[:2], config, progress=False)


def test_reward_model_with_more_batch_than_pairs_trains_on_all_of_them(capsys):
    rm = reward_model_from_policy(_lm(), seed=0)
    config = RewardConfig(epochs=2, batch_size=64, learning_rate=1e-2, warmup_steps=10,
                          eval_fraction=0.0)  # fmt: skip
    trained, metrics = train_reward_model(rm, _pairs(), config, progress=False)
    assert _notes(capsys) == [
        "reward model: batch_size 64 > the 16 training pairs: training on batches of 16",
        "reward model: warmup_steps 10 ≥ the run's 2 steps: warming up over 1",
    ]
    assert metrics["num_train_pairs"] == 16 and len(metrics["loss"]) == 2
    np.testing.assert_allclose(metrics["loss"][1], metrics["loss"][0], rtol=1e-5)  # η(0) = 0
    assert _changed(rm, trained)


def test_dpo_with_more_batch_than_pairs_trains_on_all_of_them(capsys):
    model = _lm()
    config = DPOConfig(epochs=3, batch_size=64, learning_rate=1e-2, beta=0.5, eval_fraction=0.0)
    trained, metrics = train_dpo(model, _pairs(), config, progress=False)
    assert _notes(capsys) == [
        "DPO: batch_size 64 > the 16 training pairs: training on batches of 16"
    ]
    assert metrics["num_train_pairs"] == 16 and len(metrics["loss"]) == 3
    np.testing.assert_allclose(metrics["loss"][0], np.log(2.0), rtol=1e-5)  # π = π_ref
    assert metrics["loss"][-1] < metrics["loss"][0]
    assert _changed(model, trained)


# ---------------------------------------------------------------------------- RL trainers


def test_ppo_with_more_batch_than_prompts_uses_all_it_can(capsys):
    config = tu.tiny_ppo_config(
        num_iterations=1, batch_size=64, num_minibatches=2, ppo_epochs=1, max_new_tokens=3
    )
    trainer = tu.tiny_trainer(config)  # 16 prompts
    assert _notes(capsys) == ["PPO: batch_size 64 > the 16 prompts: training on batches of 16"]
    assert trainer.config.batch_size == 16 and trainer.config.minibatch_size == 8
    before = _params(trainer.actor())  # (the trainer's state is donated)
    (metrics,) = trainer.train(progress=False)
    assert metrics["episode"] == 16.0
    assert _changed(before, trainer.actor())


def test_ppo_batch_fits_minibatches_and_devices_or_names_the_field(capsys):
    # 2 minibatches split over 3 devices: batch_size a multiple of 6 → 12 of the 16 prompts
    config = tu.tiny_ppo_config(batch_size=96, num_minibatches=2, parallelism="pmap",
                                num_devices=3)  # fmt: skip
    trainer = tu.tiny_trainer(config)
    assert _notes(capsys) == ["PPO: batch_size 96 > the 16 prompts: training on batches of 12"]
    assert trainer.config.batch_size == 12 and trainer.config.minibatch_size == 6
    ids, mask = tu.tiny_prompts()
    tight = tu.tiny_ppo_config(batch_size=8, num_minibatches=4)
    refused = (
        r"^PPOConfig\.num_minibatches = 4: the 3 prompts cannot fill one batch "
        r"\(batch_size must be a multiple of num_minibatches × devices = 4\)$"
    )
    with pytest.raises(ValueError, match=refused):
        PPOTrainer.from_sft(tight, _lm(), ids[:3], mask[:3], reward_fn=tu.target_fraction_reward)


def test_grpo_with_more_batch_than_prompts_uses_all_it_can(capsys):
    # group_size 2, 4 minibatches: batch_size·2 a multiple of 4 → an even batch: 14 of 15 prompts
    ids, mask = tu.tiny_prompts(num=15)
    config = GRPOConfig(num_iterations=1, batch_size=64, group_size=2, num_minibatches=4,
                        max_new_tokens=3, learning_rate=1e-2)  # fmt: skip
    trainer = GRPOTrainer.from_sft(config, _lm(), ids, mask, reward_fn=tu.target_fraction_reward,
                                   eos_token_id=tu.EOS)  # fmt: skip
    assert _notes(capsys) == ["GRPO: batch_size 64 > the 15 prompts: training on batches of 14"]
    assert trainer.config.batch_size == 14 and trainer.config.rollouts == 28
    before = _params(trainer.actor())  # (the trainer's state is donated)
    (metrics,) = trainer.train(progress=False)
    assert np.isfinite(metrics["reward"])
    assert _changed(before, trainer.actor())
    refused = (
        r"^GRPOConfig\.num_minibatches = 4: the 1 prompts cannot fill one batch "
        r"\(batch_size·group_size \(2\) must be a multiple of num_minibatches × devices = 4\)$"
    )
    with pytest.raises(ValueError, match=refused):
        GRPOTrainer.from_sft(config, _lm(), ids[:1], mask[:1], reward_fn=tu.target_fraction_reward)
