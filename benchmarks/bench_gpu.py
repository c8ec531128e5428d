"""One accelerator: seconds per PPO / GRPO update at real model sizes, float32 vs bfloat16 compute.

For each size (random GPT-2 weights, vocabulary 50,257 like GPT-2's) and each compute dtype
(``LoopConfig.compute_dtype``; master weights stay float32), one PPO iteration (actor, frozen
reference, separate critic, reward model: 4 models) and one GRPO iteration (G = 4, no critic, no
reference) are timed after their first, compiling iteration. The GRPO run also reports the
rollout / trainer log-prob mismatch (``tis/mean_abs_logprob_diff``, ``tis/max_ratio``), the quantity
truncated importance sampling corrects: ~0 when the sampler and the trainer compute alike, and what
bf16 compute costs in agreement when they don't.

    python benchmarks/bench_gpu.py                          # 124M and 355M, float32 and bfloat16
    python benchmarks/bench_gpu.py --sizes 124M --dtypes bfloat16 --updates 3

Runs on whatever ``jax.devices()[0]`` is (a GPU or TPU; on CPU use the small sizes of
bench_ppo.py). Nothing is downloaded: models are random, prompts are random token ids.
"""

from __future__ import annotations

import argparse
import json
import time

SIZES = {  # name: (hidden, layers, heads)
    "tiny": (64, 2, 4),  # the test suite's smoke run
    "26M": (512, 8, 8),
    "124M": (768, 12, 12),  # GPT-2 small
    "355M": (1024, 24, 16),  # GPT-2 medium
}
VOCAB, POSITIONS = 50257, 1024
PAD, EOS = 0, 50256


def model_config(name: str):
    from jaxrlhf.models import ModelConfig

    hidden, layers, heads = SIZES[name]
    return ModelConfig(family="gpt2", vocab_size=VOCAB, hidden_size=hidden, num_layers=layers,
                       num_heads=heads, max_position_embeddings=POSITIONS)  # fmt: skip


def timed(trainer, updates: int) -> dict:
    import jax
    import numpy as np

    start = time.perf_counter()
    trainer.step()
    jax.block_until_ready(trainer.state)
    first = time.perf_counter() - start
    times, metrics = [], {}
    for _ in range(updates):
        start = time.perf_counter()
        metrics = trainer.step()
        jax.block_until_ready(trainer.state)
        times.append(time.perf_counter() - start)
    return {"first_s": first, "update_s": float(np.median(times)), "metrics": metrics}


def bench(name: str, dtype: str, algo: str, *, batch: int, prompt_len: int, new_tokens: int,
          updates: int) -> dict:  # fmt: skip
    import numpy as np
    from flax import nnx

    from jaxrlhf.models import CausalLM, RewardModel
    from jaxrlhf.train import PPOConfig, PPOTrainer
    from jaxrlhf.train.experience import reward_model_fn
    from jaxrlhf.train.grpo import GRPOTrainer
    from jaxrlhf.train.grpo_config import GRPOConfig

    config = model_config(name)
    sft = CausalLM(config, rngs=nnx.Rngs(0))
    reward_model = RewardModel(config, rngs=nnx.Rngs(2))
    rng = np.random.default_rng(0)
    prompts = rng.integers(2, EOS, size=(batch * (updates + 1), prompt_len)).astype(np.int32)
    common = {"num_iterations": updates + 1, "max_new_tokens": new_tokens, "learning_rate": 1e-6,
              "compute_dtype": dtype}  # fmt: skip
    if algo == "ppo":
        ppo = PPOConfig(batch_size=batch, num_minibatches=1, ppo_epochs=1, separate_critic=True,
                        critic_init="reward_model", missing_eos_penalty=None, kl_coef=0.05,
                        **common)  # fmt: skip
        trainer = PPOTrainer.from_sft(
            ppo,
            sft,
            prompts,
            np.ones_like(prompts),
            reward_model=reward_model,
            eos_token_id=EOS,
            pad_token_id=PAD,
        )
    else:
        grpo = GRPOConfig(batch_size=batch // 4, group_size=4, kl_coef=0.0, **common)
        trainer = GRPOTrainer.from_sft(grpo, sft, prompts, np.ones_like(prompts),
                                       reward_fn=reward_model_fn(reward_model),
                                       eos_token_id=EOS, pad_token_id=PAD)  # fmt: skip
    result = timed(trainer, updates)
    metrics = result.pop("metrics")
    keep = ("tis/mean_abs_logprob_diff", "tis/max_ratio", "grad_norm", "nonfinite_skipped")
    result.update({k: metrics[k] for k in keep if k in metrics})
    tokens = batch * (prompt_len + new_tokens)
    result["tokens_per_s"] = tokens / result["update_s"]
    return result


def main(argv=None) -> int:
    import jax

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["124M", "355M"], choices=list(SIZES))
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--algos", nargs="+", default=["ppo", "grpo"], choices=["ppo", "grpo"])
    parser.add_argument("--batch", type=int, default=64, help="responses per update")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--updates", type=int, default=3)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}", flush=True)
    print(f"{args.batch} responses × ({args.prompt_len} prompt + {args.new_tokens} new tokens)")
    print("| size | algo | compute | s/update | first update (s) | tokens/s | "
          "mean abs Δlog p (rollout vs train) | max ratio |")  # fmt: skip
    print("|---|---|---|---:|---:|---:|---:|---:|")
    rows = []
    for name in args.sizes:
        for algo in args.algos:
            for dtype in args.dtypes:
                r = bench(name, dtype, algo, batch=args.batch, prompt_len=args.prompt_len,
                          new_tokens=args.new_tokens, updates=args.updates)  # fmt: skip
                rows.append({"size": name, "algo": algo, "dtype": dtype, **r})
                diff = r.get("tis/mean_abs_logprob_diff")
                ratio = r.get("tis/max_ratio")
                print(f"| {name} | {algo} | {dtype} | {r['update_s']:.3f} | {r['first_s']:.1f} | "
                      f"{r['tokens_per_s']:,.0f} | {'' if diff is None else f'{diff:.2e}'} | "
                      f"{'' if ratio is None else f'{ratio:.3f}'} |", flush=True)  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
