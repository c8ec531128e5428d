"""Multi-process training through jax.distributed: two processes × 4 CPU devices (gloo) form one
8-device mesh, and `jaxrlhf ppo` writes the same metrics as one process with 8 devices."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from flax import nnx

from jaxrlhf.data.demo_task import sample_corpus, sample_prompts
from jaxrlhf.logging import read_metrics
from jaxrlhf.models import CausalLM, RewardModel
from jaxrlhf.models.hf import save_pretrained
from jaxrlhf.models.tokenizer import train_bpe_tokenizer
from jaxrlhf.train.distributed import initialize
from jaxrlhf.train.sft import tiny_model_config

MESH = ["--ppo-parallelism", "mesh", "--ppo-mesh", "data=2,fsdp=2,tensor=2"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    rng = np.random.default_rng(0)
    tokenizer = train_bpe_tokenizer(sample_corpus(rng, 300), 384)
    config = tiny_model_config(len(tokenizer), hidden_size=16, num_layers=1,
                               max_position_embeddings=40)  # fmt: skip
    save_pretrained(CausalLM(config, rngs=nnx.Rngs(0)), root / "base", tokenizer=tokenizer)
    reward_model = RewardModel(config, rngs=nnx.Rngs(1))
    save_pretrained(reward_model, root / "rm", tokenizer=tokenizer, pad_token_id=0)
    with open(root / "prompts.jsonl", "w") as f:
        f.writelines(json.dumps({"prompt": p}) + "\n" for p in sample_prompts(rng, 16))
    return root


def ppo_argv(root, out):
    return [
        sys.executable, "-m", "jaxrlhf", "ppo", "--prompts", str(root / "prompts.jsonl"),
        "--policy", str(root / "base"), "--reward-model", str(root / "rm"), "--out", str(out),
        "--quiet", "--ppo-num-iterations", "2", "--ppo-batch-size", "8",
        "--ppo-num-minibatches", "2", "--ppo-epochs", "2", "--ppo-max-new-tokens", "6",
        "--ppo-learning-rate", "1e-3", "--data-max-prompt-length", "16", *MESH,
    ]  # fmt: skip


def env_with(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_write_the_metrics_of_one(workspace, tmp_path):
    start = time.perf_counter()
    one = subprocess.run(
        ppo_argv(workspace, tmp_path / "one"),
        env=env_with(8),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    one_s = time.perf_counter() - start
    assert one.returncode == 0, one.stderr[-3000:]

    port = free_port()
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [
                *ppo_argv(workspace, tmp_path / "two"),
                "--coordinator-address",
                f"127.0.0.1:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
            ],
            env=env_with(4),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    two_s = time.perf_counter() - start
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    print(f"one process × 8 devices: {one_s:.1f} s; two processes × 4 devices: {two_s:.1f} s")

    want, got = (
        read_metrics(tmp_path / "one/metrics.jsonl"),
        read_metrics(tmp_path / "two/metrics.jsonl"),
    )
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2]
    for a, b in zip(got, want):
        for name in b:
            if not name.startswith("time/"):
                np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)
    # One exported policy, one set of checkpoints written by both processes together.
    assert os.path.exists(tmp_path / "two/policy/model.safetensors")
    assert sorted(os.listdir(tmp_path / "two/checkpoints")) == ["2"]


def test_the_distributed_flags_go_together():
    with pytest.raises(ValueError, match="--coordinator-address, --num-processes and --process-id"):
        initialize("127.0.0.1:1234", None, 0)
    assert initialize() is False  # none given: a single process, nothing started
