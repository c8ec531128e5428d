"""Two-iteration smoke runs of every `jaxrlhf` command, end to end through the real code path."""

import json
import os

import numpy as np
import pytest
from flax import nnx

from jaxrlhf.cli import main
from jaxrlhf.data.demo_task import sample_corpus, sample_prompts
from jaxrlhf.logging import read_metrics
from jaxrlhf.models import CausalLM
from jaxrlhf.models.hf import from_pretrained, save_pretrained
from jaxrlhf.models.tokenizer import train_bpe_tokenizer
from jaxrlhf.train.sft import tiny_model_config

DATA_FLAGS = ["--data-max-prompt-length", "20", "--data-max-response-length", "8"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny base LM (HF directory with tokenizer), preference pairs and prompts, on disk."""
    root = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    corpus = sample_corpus(rng, 300)
    tokenizer = train_bpe_tokenizer(corpus, 384)
    model = CausalLM(
        tiny_model_config(len(tokenizer), hidden_size=16, num_layers=1, max_position_embeddings=32),
        rngs=nnx.Rngs(0),
    )
    save_pretrained(model, root / "base", tokenizer=tokenizer)
    prompts = sample_prompts(rng, 16)
    with open(root / "prefs.jsonl", "w") as f:
        f.writelines(
            json.dumps({"prompt": p, "chosen": " great .", "rejected": " awful ."}) + "\n"
            for p in prompts
        )
    with open(root / "prompts.jsonl", "w") as f:
        f.writelines(json.dumps({"prompt": p}) + "\n" for p in prompts)
    return root


def test_generate(workspace, capsys):
    argv = ["generate", "--model", str(workspace / "base"), "--prompt", "the food was"]
    assert (
        main([*argv, "--prompt", "the room was", "--max-new-tokens", "4", "--greedy", *DATA_FLAGS])
        == 0
    )
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["prompt"] for line in lines] == ["the food was", "the room was"]
    assert all(isinstance(line["completion"], str) for line in lines)


def test_train_rm_then_ppo_then_resume(workspace, capsys):
    rm_out, ppo_out = workspace / "rm", workspace / "ppo"
    argv = [
        "train-rm",
        "--data",
        str(workspace / "prefs.jsonl"),
        "--model",
        str(workspace / "base"),
    ]
    argv += ["--out", str(rm_out), "--rm-epochs", "2", "--rm-batch-size", "4", "--quiet"]
    assert main(argv + DATA_FLAGS) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_train_pairs"] + summary["num_eval_pairs"] == 16
    assert len(read_metrics(rm_out / "metrics.jsonl")) == 2 * (summary["num_train_pairs"] // 4)
    reward_model = from_pretrained(rm_out / "reward_model", head="reward")
    assert reward_model.config.vocab_size == from_pretrained(workspace / "base").config.vocab_size

    ppo = [
        "ppo",
        "--prompts",
        str(workspace / "prompts.jsonl"),
        "--policy",
        str(workspace / "base"),
    ]
    ppo += ["--reward-model", str(rm_out / "reward_model"), "--out", str(ppo_out), "--quiet"]
    ppo += ["--ppo-batch-size", "4", "--ppo-max-new-tokens", "4", "--ppo-ppo-epochs", "1"]
    ppo += ["--ppo-lr-schedule", "constant"]  # so that the run may be extended on resume
    assert main([*ppo, "--ppo-num-iterations", "2", *DATA_FLAGS]) == 0
    records = read_metrics(ppo_out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite(r["objective/kl"]) for r in records)
    assert os.path.exists(ppo_out / "report.md") and os.path.exists(ppo_out / "policy/config.json")
    # Asking for 3 iterations in the same directory resumes from the checkpoint at 2.
    assert main([*ppo, "--ppo-num-iterations", "3", *DATA_FLAGS]) == 0
    assert [r["step"] for r in read_metrics(ppo_out / "metrics.jsonl")] == [1, 2, 3]
    capsys.readouterr()
    # A setting that changes the run is refused on resume, naming it (the checkpoints survive).
    assert main([*ppo, "--ppo-num-iterations", "4", "--ppo-seed", "7", *DATA_FLAGS]) == 2
    assert "seed (checkpoint 0, now 7)" in capsys.readouterr().err
    # --no-resume over an earlier run's checkpoints: refused, nothing deleted.
    with pytest.raises(SystemExit, match="holds the checkpoints of an earlier run"):
        main([*ppo, "--no-resume", *DATA_FLAGS])
    assert sorted(os.listdir(ppo_out / "checkpoints")) == ["2", "3"]
    # A linear learning-rate decay is laid out over num_iterations: extending it is refused.
    linear = [a if a != "constant" else "linear" for a in ppo]
    linear[linear.index("--out") + 1] = str(workspace / "ppo_linear")
    assert main([*linear, "--ppo-num-iterations", "1", *DATA_FLAGS]) == 0
    assert main([*linear, "--ppo-num-iterations", "2", *DATA_FLAGS]) == 2
    assert "num_iterations (checkpoint 1, now 2)" in capsys.readouterr().err


def test_bad_flag_value_names_the_field(workspace, capsys):
    argv = [
        "ppo",
        "--prompts",
        str(workspace / "prompts.jsonl"),
        "--policy",
        str(workspace / "base"),
    ]
    argv += ["--reward-model", str(workspace / "base"), "--out", str(workspace / "bad")]
    assert main([*argv, "--ppo-clip-eps", "1.5"]) == 2
    assert "PPOConfig.clip_eps = 1.5" in capsys.readouterr().err


def test_bad_data_names_the_row_and_column(workspace, capsys):
    bad = workspace / "bad.jsonl"
    bad.write_text(
        json.dumps({"prompt": "the food was", "chosen": " good .", "rejected": ""}) + "\n"
    )
    argv = ["train-rm", "--data", str(bad), "--model", str(workspace / "base"), "--out", "x"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "rejected" in err and "row 0" in err


def test_demo_smoke(tmp_path):
    argv = ["demo", "--out-dir", str(tmp_path), "--quiet", "--hidden-size", "16"]
    argv += ["--num-layers", "1", "--num-sentences", "200", "--num-prompts", "16"]
    argv += ["--num-eval-prompts", "8", "--num-pairs", "24", "--eval-every", "1"]
    argv += ["--sft-steps", "80", "--sft-warmup-steps", "5", "--sft-batch-size", "32"]
    argv += ["--rm-epochs", "1", "--rm-batch-size", "8", "--rm-eval-fraction", "0.25"]
    argv += ["--ppo-num-iterations", "2", "--ppo-batch-size", "8", "--ppo-max-new-tokens", "12"]
    argv += ["--ppo-separate-critic", "--ppo-critic-init", "reward_model"]
    argv += ["--ppo-checkpoint-dir", str(tmp_path / "ckpt")]
    assert main(argv) == 0
    # Each PPO run checkpoints into a directory of its own.
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["kl", "no_kl"]
    assert os.listdir(tmp_path / "ckpt" / "kl") == ["2"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["policies"]) == {"base policy (SFT)", "PPO, β = 0.1", "PPO, β = 0"}
    assert 0.0 <= summary["reward_model"]["held_out_accuracy"] <= 1.0
    report = (tmp_path / "report.md").read_text()
    assert "Held-out pairwise accuracy" in report and "![reward](plots/reward.png)" in report
    assert [r["step"] for r in read_metrics(tmp_path / "metrics_no_kl.jsonl")] == [1, 2]
    assert os.path.exists(tmp_path / "policy" / "model.safetensors")
