"""Seconds per PPO update: jaxrlhf vs trl 1.12.0's PPOTrainer, on the same GPT-2 shapes, one process.

One update = one full PPO iteration: rollout of 16 prompts × 16 tokens → 16 new tokens, reward-model
scores, reference log-probs and values, KL-penalised rewards and GAE, then 1 PPO epoch of 1 minibatch
(a single optimiser step). Both sides use the same work: an actor, a frozen reference, a separate
value model and a reward model, all GPT-2 of the same size, float32, dropout off, temperature 1.

    .venv/bin/python benchmarks/bench_ppo.py                 # all three sizes, both trainers
    .venv/bin/python benchmarks/bench_ppo.py --sizes 174k --updates 3 --skip-trl

The first update of each side (jit compilation for us, allocator/kernel warm-up for torch) is timed
separately; the table reports the mean of the following ``--updates`` updates. Our achieved FLOP/s
counts matmul FLOPs analytically — 2·(matmul params) per token for a forward pass, 6· for a training
pass — over the 32-token sequences (see :func:`matmul_flops`), and compares them with the best
float32 ``jnp.matmul`` throughput measured on this machine.

trl runs from the same virtualenv (``pip install trl==1.12.0`` was checked with ``--dry-run`` not to
change jax/flax/transformers/torch; it only adds trl and accelerate), but in a *fresh subprocess*
(``--trl-only``): after JAX has run in a process, torch's CPU kernels in that same process were 5–10×
slower on this 2-core machine (174k: 0.9 s → 6.2 s per update), which would flatter us. Its
PPOTrainer needs a tokenizer and a dataset: both are built here, offline (a word-level
``tokenizers`` vocabulary of 1024 tokens).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
import warnings

SIZES = {  # name: (hidden, layers, heads); vocab 1024, 128 positions
    "174k": (64, 2, 4),
    "3.5M": (256, 4, 4),
    "26M": (512, 8, 8),
}
VOCAB, POSITIONS = 1024, 128
BATCH, PROMPT_LEN, RESPONSE_LEN = 16, 16, 16
PAD, EOS = 0, 1


# ----------------------------------------------------------------------------- FLOP accounting


def matmul_params(hidden: int, layers: int, vocab: int, *, lm_head: bool) -> int:
    """Weights that multiply activations, per token: 12·L·D² in the blocks (+ V·D for an LM head)."""
    return 12 * layers * hidden * hidden + (vocab * hidden if lm_head else 0)


def matmul_flops(hidden: int, layers: int) -> dict[str, float]:
    """Analytic matmul FLOPs of one update (attention's T² terms, ~1% here, are left out).

    rollout: actor forward on the prompt (prefill) and on each generated token: 2·p_lm·B·(P + N);
    reward model and reference: 2·p·B·(P + N) each; critic forward for the old values:
    2·p_trunk·B·(P + N) (π_old comes from the sampler, as in trl); training: 6·(p_lm + p_trunk)·B·(P + N).
    """
    tokens = BATCH * (PROMPT_LEN + RESPONSE_LEN)
    p_lm = matmul_params(hidden, layers, VOCAB, lm_head=True)
    p_trunk = matmul_params(hidden, layers, VOCAB, lm_head=False)
    return {
        "rollout": 2 * p_lm * tokens,
        "reward": 2 * p_trunk * tokens,
        "reference": 2 * p_lm * tokens,
        "value forward": 2 * p_trunk * tokens,
        "train step": 6 * (p_lm + p_trunk) * tokens,
    }


def measure_matmul_peak(n: int = 1024, repeats: int = 10) -> float:
    """Best float32 FLOP/s of a jitted n×n @ n×n matmul on the default JAX device."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


# ----------------------------------------------------------------------------- jaxrlhf


def bench_jaxrlhf(name: str, updates: int, *, scan_layers: bool = True, lora_rank: int = 0) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    from jaxrlhf.models import CausalLM, ModelConfig, RewardModel, num_params
    from jaxrlhf.train import PPOConfig, PPOTrainer

    hidden, layers, heads = SIZES[name]
    model_config = ModelConfig(
        family="gpt2",
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        max_position_embeddings=POSITIONS,
    )
    sft = CausalLM(model_config, rngs=nnx.Rngs(0))
    reward_model = RewardModel(model_config, rngs=nnx.Rngs(2))
    config = PPOConfig(
        num_iterations=updates + 1,
        batch_size=BATCH,
        num_minibatches=1,
        ppo_epochs=1,
        max_new_tokens=RESPONSE_LEN,
        temperature=1.0,
        learning_rate=3e-6,
        lr_schedule="linear",
        kl_coef=0.05,
        separate_critic=True,
        critic_init="reward_model",  # like trl: the value model starts as the reward model
        missing_eos_penalty=None,  # trl's default
        recompute_logprobs=False,  # like trl: π_old from the sampler, no extra actor forward
        scan_layers=scan_layers,
        lora_rank=lora_rank,  # LoRA: adapters on the actor and the critic, the reference for free
    )
    rng = np.random.default_rng(0)
    prompts = rng.integers(2, VOCAB, size=(BATCH * (updates + 1), PROMPT_LEN)).astype(np.int32)
    trainer = PPOTrainer.from_sft(
        config,
        sft,
        prompts,
        np.ones_like(prompts),
        reward_model=reward_model,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    start = time.perf_counter()
    trainer.step()
    jax.block_until_ready(trainer.state)
    first = time.perf_counter() - start
    times = []
    for _ in range(updates):
        start = time.perf_counter()
        trainer.step()
        jax.block_until_ready(trainer.state)
        times.append(time.perf_counter() - start)
    return {
        "params": num_params(sft),
        "first_s": first,
        "lora_rank": lora_rank,
        "update_s": float(np.mean(times)),
        "update_min_s": float(np.min(times)),
        "updates": times,
        "phases_s": phase_times(trainer, updates),
    }


PHASES = {  # phase of one update: (the function it runs, the FLOP keys it does)
    "rollout": ("sampler", ("rollout",)),  # the trainer's sampler (rollout.sample)
    "scoring": ("score_rollout", ("reference", "value forward")),
    "train step": ("run_steps", ("train step",)),
}


def phase_times(trainer, updates: int) -> dict[str, float]:
    """Mean seconds of each phase of an update (rollout, scoring: reward model + reference + values
    + GAE, train step), measured by wrapping the functions ``PPOTrainer.iteration`` calls so that
    each waits for its own results. Waiting serialises work that otherwise overlaps a little, so the
    parts add up to slightly more than an unwrapped update."""
    import jax
    import numpy as np

    from jaxrlhf.train import ppo

    spent = {name: [] for name in (*PHASES, "reward model")}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            out = jax.block_until_ready(fn(*args, **kwargs))
            spent[name].append(time.perf_counter() - start)
            return out

        return wrapper

    in_module = {attr: getattr(ppo, attr) for attr, _ in PHASES.values() if attr != "sampler"}
    reward_fn, sampler = trainer.reward_fn, trainer.sampler
    try:
        for name, (attr, _) in PHASES.items():
            if attr in in_module:
                setattr(ppo, attr, timed(name, in_module[attr]))
        trainer.reward_fn = timed("reward model", reward_fn)
        trainer.sampler = timed("rollout", sampler)
        for _ in range(updates):
            trainer.step()
    finally:
        for attr, fn in in_module.items():
            setattr(ppo, attr, fn)
        trainer.reward_fn, trainer.sampler = reward_fn, sampler
    means = {name: float(np.mean(times)) for name, times in spent.items()}
    means["scoring"] += means.pop("reward model")
    return means


# ----------------------------------------------------------------------------- trl


def offline_tokenizer(directory: str):
    """A word-level fast tokenizer over tokens t0 … t1023 (t0 = pad, t1 = eos), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t2"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="t0", eos_token="t1", unk_token="t2", padding_side="left"
    )
    fast.save_pretrained(directory)
    return fast


def trl_models(name: str) -> dict:
    """trl's four GPT-2 models of one size, keyed by PPOTrainer's argument names: the policy, a
    frozen copy of it as reference, a reward model and a value model."""
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    torch.manual_seed(0)
    hidden, layers, heads = SIZES[name]
    hf_config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=POSITIONS,
        n_embd=hidden,
        n_layer=layers,
        n_head=heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=EOS,
        num_labels=1,
    )
    policy = GPT2LMHeadModel(hf_config)
    return {
        "model": policy,
        "ref_model": copy.deepcopy(policy),  # the frozen SFT model, as on our side
        "reward_model": GPT2ForSequenceClassification(hf_config),
        "value_model": GPT2ForSequenceClassification(hf_config),
    }


def trl_dataset(updates: int):
    """BATCH · (updates + 1) random prompts of PROMPT_LEN token ids (never pad or eos)."""
    import numpy as np
    from datasets import Dataset

    rng = np.random.default_rng(0)
    prompts = rng.integers(2, VOCAB, size=(BATCH * (updates + 1), PROMPT_LEN)).tolist()
    return Dataset.from_dict({"input_ids": prompts})


def trl_ppo_config(output_dir: str, updates: int):
    """trl's PPOConfig for the same work as ours: updates + 1 iterations, 1 epoch of 1 minibatch."""
    from trl.experimental.ppo import PPOConfig

    return PPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1,
        num_mini_batches=1,
        num_ppo_epochs=1,
        local_rollout_forward_batch_size=BATCH,
        response_length=RESPONSE_LEN,
        total_episodes=BATCH * (updates + 1),
        temperature=1.0,
        learning_rate=3e-6,
        kl_coef=0.05,
        stop_token="eos",
        num_sample_generations=0,
        report_to="none",
        save_strategy="no",
        logging_steps=10**6,
        disable_tqdm=True,
        use_cpu=True,
        bf16=False,
        fp16=False,
        seed=0,
    )


def trl_clock(cuda: bool = False):
    """A TrainerCallback that records perf_counter() at train begin and at the end of every update
    (after the GPU's queued work has finished, with ``cuda``)."""
    import torch
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.marks = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.marks.append(time.perf_counter())

    return Clock()


def bench_trl(name: str, updates: int) -> dict:
    """Seconds per update of trl's PPOTrainer: updates + 1 updates, the first reported apart."""
    import numpy as np
    import torch

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.ppo import PPOTrainer

    models = trl_models(name)
    dataset = trl_dataset(updates)
    clock = trl_clock()
    with tempfile.TemporaryDirectory() as out:
        tokenizer = offline_tokenizer(os.path.join(out, "tokenizer"))
        trainer = PPOTrainer(
            args=trl_ppo_config(out, updates),
            processing_class=tokenizer,
            **models,
            train_dataset=dataset,
            eval_dataset=dataset,
            callbacks=[clock],
        )
        trainer.train()
    marks = np.diff(clock.marks)
    return {
        "params": sum(p.numel() for p in models["model"].parameters()),
        "first_s": float(marks[0]),
        "update_s": float(np.mean(marks[1:])),
        "update_min_s": float(np.min(marks[1:])),
        "updates": marks[1:].tolist(),
        "torch_threads": torch.get_num_threads(),
    }


def run_trl_subprocess(name: str, updates: int) -> dict:
    """bench_trl in a fresh interpreter (no JAX in the process), returning its result dict."""
    import subprocess

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "trl.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--trl-only", name]
        cmd += ["--updates", str(updates), "--json", out]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        with open(out) as f:
            return json.load(f)


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default=",".join(SIZES), help="comma-separated: 174k,3.5M,26M")
    parser.add_argument("--updates", type=int, default=5, help="timed updates after the first")
    parser.add_argument("--skip-trl", action="store_true", help="time jaxrlhf only")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument(
        "--no-scan-layers", dest="scan_layers", action="store_false",
        help="jaxrlhf with its blocks in a Python loop (scan_layers off) instead of a scan",
    )  # fmt: skip
    parser.add_argument(
        "--lora-rank", type=int, default=0,
        help="also time jaxrlhf with LoRA adapters of this rank, in the same run (0: not)",
    )  # fmt: skip
    parser.add_argument("--trl-only", default=None, help=argparse.SUPPRESS)  # the subprocess
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.trl_only:
        result = bench_trl(args.trl_only, args.updates)
        with open(args.json, "w") as f:
            json.dump(result, f)
        return 0

    import jax

    peak = measure_matmul_peak()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; {os.cpu_count()} CPU cores")
    print(f"measured float32 matmul peak (1024³ jnp.matmul): {peak / 1e9:.1f} GFLOP/s", flush=True)
    results = {"peak_flops": peak, "scan_layers": args.scan_layers, "sizes": {}}
    for name in args.sizes.split(","):
        hidden, layers, _ = SIZES[name]
        flops = sum(matmul_flops(hidden, layers).values())
        ours = bench_jaxrlhf(name, args.updates, scan_layers=args.scan_layers)
        row = {"jaxrlhf": ours, "flops_per_update": flops}
        row["jaxrlhf"]["flops_per_s"] = flops / ours["update_s"]
        print(
            f"[{name}] jaxrlhf: {ours['update_s']:.4f} s/update "
            f"(first, with compile: {ours['first_s']:.1f} s)",
            flush=True,
        )
        if not args.skip_trl:
            theirs = run_trl_subprocess(name, args.updates)
            row["trl"] = theirs
            row["speedup"] = theirs["update_s"] / ours["update_s"]
            print(
                f"[{name}] trl:     {theirs['update_s']:.4f} s/update "
                f"(first: {theirs['first_s']:.1f} s)  → {row['speedup']:.1f}× faster",
                flush=True,
            )
        if args.lora_rank:
            lora = bench_jaxrlhf(name, args.updates, scan_layers=args.scan_layers,
                                 lora_rank=args.lora_rank)  # fmt: skip
            row["jaxrlhf_lora"] = lora
            row["lora_speedup"] = ours["update_s"] / lora["update_s"]
            print(f"[{name}] jaxrlhf LoRA r={args.lora_rank}: {lora['update_s']:.4f} s/update "
                  f"→ {row['lora_speedup']:.2f}× the full update's speed", flush=True)  # fmt: skip
        results["sizes"][name] = row

    print()
    print(
        "| model (params) | jaxrlhf s/update | trl s/update | trl / jaxrlhf "
        "| jaxrlhf first update (compile) | jaxrlhf GFLOP/s | % of matmul peak |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, row in results["sizes"].items():
        ours = row["jaxrlhf"]
        trl = row.get("trl")
        if trl is None:
            theirs = "| – | – "
        else:
            theirs = f"| {trl['update_s']:.4f} | {row['speedup']:.1f}× "
        print(
            f"| {name} ({ours['params'] / 1e6:.2f}M) | {ours['update_s']:.4f} {theirs}"
            f"| {ours['first_s']:.1f} s | {ours['flops_per_s'] / 1e9:.1f} "
            f"| {100 * ours['flops_per_s'] / peak:.0f}% |"
        )
    print()
    print("One jaxrlhf update, phase by phase (each phase waited for; matmul FLOPs as above):")
    print("| model | phase | s | share | GFLOP/s | % of matmul peak |")
    print("|---|---|---:|---:|---:|---:|")
    for name, row in results["sizes"].items():
        hidden, layers, _ = SIZES[name]
        flops = matmul_flops(hidden, layers)
        phases = row["jaxrlhf"]["phases_s"]
        total = sum(phases.values())
        for phase, seconds in phases.items():
            work = sum(flops[k] for k in PHASES[phase][1]) + (
                flops["reward"] if phase == "scoring" else 0
            )
            rate = work / seconds
            print(f"| {name} | {phase} | {seconds:.4f} | {100 * seconds / total:.0f}% "
                  f"| {rate / 1e9:.1f} | {100 * rate / peak:.0f}% |")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
