"""Seconds per GRPO update: jaxrlhf vs trl's GRPOTrainer (no vLLM), on the same GPT-2 shapes.

One update = one full GRPO iteration: 8 prompts × 16 tokens, each sampled G = 4 times → 16 new
tokens (32 completions), scored by a reward model (a GPT-2 with a scalar head), group-relative
advantages, then one optimiser step on the 32 completions (1 epoch, 1 minibatch, β = 0: no
reference pass, trl's default). float32, dropout off, temperature 1, same shapes on both sides.

    .venv/bin/python benchmarks/bench_grpo.py                  # 174k, 3.5M, 26M
    .venv/bin/python benchmarks/bench_grpo.py --sizes 174k --skip-trl

As in bench_ppo.py, trl runs in a fresh subprocess (torch is slower in a process where JAX ran), and
the first update of each side (compilation / warm-up) is reported separately; it and the next two
are not timed, and each side reports the median of the next ``--updates``. This machine's speed
drifts by tens of percent over minutes, so the two sides alternate for ``--rounds`` rounds (ours,
trl, ours, trl, …) and each reports the median of its rounds' medians. "Our GFLOP/s" is matmul_flops (the work our update does) over our time, against
the float32 matmul peak measured in the same run; "trl / (our FLOPs at peak)" is the largest ratio an
update doing that work could reach on this machine.

On a GPU both sides run there (trl with ``use_cpu=False``, its clock waiting for the GPU at the end of
each update), and both compute float32 matmuls in full float32: torch's default, and
``jax_default_matmul_precision="highest"`` for ours.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_ppo import (
    EOS,
    PAD,
    POSITIONS,
    SIZES,
    VOCAB,
    matmul_params,
    measure_matmul_peak,
    offline_tokenizer,
    trl_clock,
)

PROMPTS, GROUP, PROMPT_LEN, RESPONSE_LEN = 8, 4, 16, 16
WARMUP = 3  # untimed updates on both sides: the first (compilation), then two to settle


def matmul_flops(hidden: int, layers: int) -> float:
    """Analytic matmul FLOPs of one of our updates (attention's T² terms left out), with each prompt
    run once per group (B prompts of P tokens, R = B·G responses of N tokens):

    sampling 2·p_lm·(B·P + R·(N − 1)) (prefill, then N − 1 decode steps); reward model
    2·p_trunk·(B·P + R·N); train step 6·(p_trunk·(B·P + R·N) + V·D·R·N) (LM head on the responses).
    """
    p_lm = matmul_params(hidden, layers, VOCAB, lm_head=True)
    p_trunk = matmul_params(hidden, layers, VOCAB, lm_head=False)
    prompts, responses = PROMPTS * PROMPT_LEN, PROMPTS * GROUP * RESPONSE_LEN
    sampling = 2 * p_lm * (prompts + PROMPTS * GROUP * (RESPONSE_LEN - 1))
    reward = 2 * p_trunk * (prompts + responses)
    train = 6 * (p_trunk * (prompts + responses) + VOCAB * hidden * responses)
    return sampling + reward + train


def prompt_token_ids(updates: int):
    rng = np.random.default_rng(0)
    return rng.integers(2, VOCAB, size=(PROMPTS * (updates + WARMUP), PROMPT_LEN)).astype(np.int32)


def bench_jaxrlhf(name: str, updates: int) -> dict:
    import jax
    from flax import nnx

    from jaxrlhf.models import CausalLM, ModelConfig, RewardModel, num_params
    from jaxrlhf.train.experience import reward_model_fn
    from jaxrlhf.train.grpo import GRPOTrainer
    from jaxrlhf.train.grpo_config import GRPOConfig

    hidden, layers, heads = SIZES[name]
    config = ModelConfig(family="gpt2", vocab_size=VOCAB, hidden_size=hidden, num_layers=layers,
                         num_heads=heads, max_position_embeddings=POSITIONS)  # fmt: skip
    sft = CausalLM(config, rngs=nnx.Rngs(0))
    reward_fn = reward_model_fn(RewardModel(config, rngs=nnx.Rngs(2)))
    grpo = GRPOConfig(num_iterations=updates + WARMUP, batch_size=PROMPTS, group_size=GROUP,
                      max_new_tokens=RESPONSE_LEN, learning_rate=1e-6, kl_coef=0.0)  # fmt: skip
    prompts = prompt_token_ids(updates)
    trainer = GRPOTrainer.from_sft(grpo, sft, prompts, np.ones_like(prompts), reward_fn=reward_fn,
                                   eos_token_id=EOS, pad_token_id=PAD)  # fmt: skip
    times = []
    for _ in range(updates + WARMUP):
        start = time.perf_counter()
        trainer.step()
        jax.block_until_ready(trainer.state)
        times.append(time.perf_counter() - start)
    return {
        "params": num_params(sft),
        "first_s": times[0],
        "update_s": float(np.median(times[WARMUP:])),
    }


def bench_trl(name: str, updates: int, cuda: bool = False) -> dict:
    import torch
    from datasets import Dataset
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(0)
    hidden, layers, heads = SIZES[name]
    hf = GPT2Config(vocab_size=VOCAB, n_positions=POSITIONS, n_embd=hidden, n_layer=layers,
                    n_head=heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                    pad_token_id=PAD, eos_token_id=EOS, bos_token_id=EOS, num_labels=1)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = offline_tokenizer(tmp)
        prompts = [" ".join(f"t{t}" for t in row) for row in prompt_token_ids(updates).tolist()]
        clock = trl_clock(cuda=cuda)
        args = GRPOConfig(
            output_dir=tmp, per_device_train_batch_size=PROMPTS * GROUP, num_generations=GROUP,
            max_completion_length=RESPONSE_LEN, temperature=1.0, beta=0.0, num_iterations=1,
            learning_rate=1e-6, max_steps=updates + WARMUP, use_cpu=not cuda, bf16=False, fp16=False,
            report_to="none", save_strategy="no", logging_steps=10**6, disable_tqdm=True, seed=0,
        )  # fmt: skip
        trainer = GRPOTrainer(
            model=GPT2LMHeadModel(hf), reward_funcs=GPT2ForSequenceClassification(hf), args=args,
            train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer,
            reward_processing_classes=tokenizer, callbacks=[clock],
        )  # fmt: skip
        trainer.train()
    times = np.diff(clock.marks)
    return {"first_s": float(times[0]), "update_s": float(np.median(times[WARMUP:]))}


def summarize(rounds: list) -> dict | None:
    """One side's rounds → the first round's result with update_s = the median over rounds (each
    round's own in update_s_rounds)."""
    if rounds[0] is None:
        return None
    per_round = [r["update_s"] for r in rounds]
    return {**rounds[0], "update_s": float(np.median(per_round)), "update_s_rounds": per_round}


def run_trl_subprocess(name: str, updates: int, cuda: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "trl.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--trl-only", name] + ["--cuda"] * cuda
        subprocess.run([*cmd, "--updates", str(updates), "--json", out], check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip
        with open(out) as f:
            return json.load(f)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default=",".join(SIZES), help="comma-separated: 174k,3.5M,26M")
    parser.add_argument("--updates", type=int, default=10, help="timed updates after warm-up")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of both sides")
    parser.add_argument("--skip-trl", action="store_true", help="time jaxrlhf only")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--trl-only", default=None, help=argparse.SUPPRESS)  # the subprocess
    parser.add_argument("--cuda", action="store_true", help=argparse.SUPPRESS)  # trl on the GPU
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.trl_only:
        with open(args.json, "w") as f:
            json.dump(bench_trl(args.trl_only, args.updates, args.cuda), f)
        return 0
    import jax

    # Both sides on the same kind of device: trl on CUDA when JAX runs on a GPU. torch computes
    # float32 matmuls in full float32 there (TF32 off by default), so JAX is told to as well.
    cuda = jax.default_backend() == "gpu"
    if cuda:
        jax.config.update("jax_default_matmul_precision", "highest")
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()})", flush=True)
    peak = measure_matmul_peak()
    print(f"measured float32 matmul peak (1024³ jnp.matmul): {peak / 1e9:.1f} GFLOP/s", flush=True)
    rows = {"peak_flops": peak}
    print("| model (params) | jaxrlhf s/update | trl s/update | trl / jaxrlhf | our GFLOP/s "
          "(% of peak) | trl / (our FLOPs at peak) | first update: ours / trl |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---|")
    for name in args.sizes.split(","):
        rounds = [(bench_jaxrlhf(name, args.updates),
                   None if args.skip_trl else run_trl_subprocess(name, args.updates, cuda))
                   for _ in range(args.rounds)]  # fmt: skip
        ours, theirs = summarize([r[0] for r in rounds]), summarize([r[1] for r in rounds])
        flops = matmul_flops(*SIZES[name][:2])
        ours["flops_per_s"] = flops / ours["update_s"]
        rows[name] = {"jaxrlhf": ours, "trl": theirs, "matmul_flops": flops}
        ratio = f"{theirs['update_s'] / ours['update_s']:.1f}×" if theirs else "–"
        trl_s = f"{theirs['update_s']:.3f}" if theirs else "–"
        # the largest ratio possible: our matmul work at the measured peak
        bound = f"{theirs['update_s'] / (flops / peak):.1f}×" if theirs else "–"
        first = f"{ours['first_s']:.1f} s / " + (f"{theirs['first_s']:.1f} s" if theirs else "–")
        print(f"| {name} ({ours['params'] / 1e6:.2f}M) | {ours['update_s']:.3f} | {trl_s} | "
              f"{ratio} | {ours['flops_per_s'] / 1e9:.1f} ({100 * ours['flops_per_s'] / peak:.0f}%) | "
              f"{bound} | {first} |", flush=True)  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
