"""Every script of benchmarks/ at a tiny size, as a user runs it (a subprocess), so none can rot
unnoticed: each must finish, print its table and write JSON whose figures are finite and consistent
(the README's figures come from the full-size runs of the same scripts)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run(script: str, *args: str, tmp_path: Path) -> tuple[str, object]:
    """Run benchmarks/``script`` with ``args`` and ``--json``; (stdout, the JSON it wrote)."""
    out = tmp_path / "result.json"
    command = [sys.executable, str(BENCHMARKS / script), *args]
    if script != "bench_rollout.py":  # the one without --json
        command += ["--json", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the script sets its own
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, f"{script} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout, (json.loads(out.read_text()) if out.exists() else None)


def numbers(tree) -> list[float]:
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in numbers(v)]
    if isinstance(tree, list):
        return [x for v in tree for x in numbers(v)]
    return [float(tree)] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


def test_bench_rollout_tiny(tmp_path):
    stdout, _ = run("bench_rollout.py", "--sizes", "tiny", "--new-tokens", "8", "--repeats", "1",
                    tmp_path=tmp_path)  # fmt: skip
    rows = [line for line in stdout.splitlines() if line.startswith("| gpt2-tiny | 0.175M | 8 |")]
    assert rows, stdout
    speedups = [float(cell.strip().rstrip("×x")) for row in rows for cell in row.split("|")[1:-1]
                if cell.strip().endswith(("×", "x"))]  # fmt: skip
    assert speedups and all(s > 0 for s in speedups)


@pytest.mark.parametrize("script", ["bench_ppo.py", "bench_grpo.py"])
def test_bench_update_against_trl_tiny(script, tmp_path):
    args = ["--sizes", "174k", "--updates", "1"] + (["--rounds", "1"] if "grpo" in script else [])
    stdout, result = run(script, *args, tmp_path=tmp_path)
    sizes = result.get("sizes", result)  # bench_ppo nests the sizes, bench_grpo does not
    ours, trl = sizes["174k"]["jaxrlhf"], sizes["174k"]["trl"]
    assert ours["params"] == 173824  # hidden 64, 2 layers, vocabulary 1024: counted by hand below
    assert 0 < ours["update_s"] < ours["first_s"]  # the first update also compiles
    assert trl["update_s"] > 0 and "| 174k" in stdout
    assert all(math.isfinite(x) for x in numbers(result))


def test_bench_ppo_with_the_blocks_in_a_loop_and_lora_tiny(tmp_path):
    _, result = run("bench_ppo.py", "--sizes", "174k", "--updates", "1", "--skip-trl",
                    "--no-scan-layers", "--lora-rank", "1", tmp_path=tmp_path)  # fmt: skip
    assert result["scan_layers"] is False and "trl" not in result["sizes"]["174k"]
    row = result["sizes"]["174k"]
    ours, lora = row["jaxrlhf"], row["jaxrlhf_lora"]
    assert ours["params"] == 173824 and 0 < ours["update_s"] < ours["first_s"]
    assert ours["lora_rank"] == 0 and lora["lora_rank"] == 1 and 0 < lora["update_s"]
    assert row["lora_speedup"] == ours["update_s"] / lora["update_s"]


def test_parameter_count_of_the_174k_model():
    """The count the two tests above expect, from the GPT-2 shapes: embeddings V·D + 128·D, per
    block 12·D² + 13·D (attention 4D² + 4D, MLP 8D² + 5D, two norms 4D), a final norm 2D; the
    value head D + 1 is not counted."""
    v, d, positions, layers = 1024, 64, 128, 2
    assert v * d + positions * d + layers * (12 * d * d + 13 * d) + 2 * d == 173824


def test_critic_init_tiny(tmp_path):
    _, result = run("critic_init.py", "--iterations", "2", "--sft-steps", "150",
                         tmp_path=tmp_path)  # fmt: skip
    assert set(result) == {
        "shared trunk, zero head", "shared trunk, random head",
        "separate, SFT trunk, zero head", "separate, from the reward model",
    }  # fmt: skip
    assert all(len(v) == 2 for v in result.values())
    assert result["shared trunk, zero head"][0] == 0.0  # a zero head predicts 0: explains nothing
    assert list(tmp_path.iterdir()) == [tmp_path / "result.json"]  # no scratch left behind


def test_bench_gpu_runs_on_cpu_tiny(tmp_path):
    _, rows = run("bench_gpu.py", "--sizes", "tiny", "--dtypes", "float32", "--batch", "4",
                  "--prompt-len", "8", "--new-tokens", "8", "--updates", "1", tmp_path=tmp_path)  # fmt: skip
    assert [(r["size"], r["algo"]) for r in rows] == [("tiny", "ppo"), ("tiny", "grpo")]
    assert all(r["update_s"] > 0 and r["tokens_per_s"] > 0 for r in rows)


def test_bench_memory_one_layer(tmp_path):
    """Qwen2.5-0.5B cut to one block on 8 forced CPU devices: the row and its parameter count."""
    _, rows = run("bench_memory.py", "--models", "qwen2.5-0.5b", "--num-layers", "1", "--devices",
                  "8", "--precisions", "bf16+remat", "--per-device-batch", "1", "--prompt", "16",
                  "--response", "16", tmp_path=tmp_path)  # fmt: skip
    (row,) = rows
    d, f, v, kv = 896, 4864, 151936, 128  # hidden, MLP, vocabulary, 2 KV heads × 64
    block = (
        d * d + d + 2 * (d * kv + kv) + d * d + 3 * d * f + 2 * d
    )  # q(+bias) k v(+bias) o, MLP, norms
    params = v * d + block + d + d + 1  # tied embeddings, final norm, value head
    assert row["step"]["params_total"] == 4 * params  # float32 master weights
    assert 0 < row["step_gib"] < 8 and 0 < row["rollout_gib"] < row["step_gib"] + 1
    assert row["mesh"] == "fsdp=8" and row["devices"] == 8
    assert 0 < row["step_compile_s"] < row["measure_s"] and "compile_s" not in row["step"]


def test_bench_memory_lora_rank_trains_the_adapters_alone(tmp_path):
    """--lora-rank 8 on the same one-block Qwen2.5-0.5B: the model's count is unchanged plus the
    adapters; what is trained is the adapters and the value head."""
    _, rows = run("bench_memory.py", "--models", "qwen2.5-0.5b", "--num-layers", "1", "--devices",
                  "8", "--precisions", "bf16+remat", "--per-device-batch", "1", "--prompt", "16",
                  "--response", "16", "--lora-rank", "8", tmp_path=tmp_path)  # fmt: skip
    (row,) = rows
    d, f, kv, r = 896, 4864, 128, 8
    adapters = r * (
        (d + d) + 2 * (d + kv) + (d + d) + 2 * (d + f) + (f + d)
    )  # q k v o gate up down
    assert row["trained_m"] * 1e6 == adapters + d + 1  # + the value head
    assert (
        row["step"]["params_count"]
        == 151936 * d
        + (d * d + d + 2 * (d * kv + kv) + d * d + 3 * d * f + 2 * d)
        + d
        + d
        + 1
        + adapters
    )
    assert row["lora_rank"] == 8 and 0 < row["step_gib"] < 2
