"""Memory you can read before you rent: per-device bytes of one PPO train step and of rollout for
real model sizes on device meshes, from XLA's own accounting — nothing is allocated.

For each (model, mesh, precision) the PPO train step (actor + value head, AdamW, one minibatch) and
the rollout (prefill + KV-cache decode) are jitted with their real shardings, lowered on
``jax.ShapeDtypeStruct`` inputs and compiled for forced CPU devices; ``memory_analysis()`` gives the
bytes each device needs for arguments, outputs and temporaries. The frozen reference and reward
model (sharded like the actor, in ``--frozen-dtype``) are added to the step's total.

With ``--lora-rank R`` the step is LoRA's: the base frozen in bfloat16 (an argument of the step,
not trained), adapters of rank R on every projection and the value head trained in float32 with
their Adam moments; the reference is the policy with its adapters off (nothing to add), so only the
reward model is added.

    python benchmarks/bench_memory.py      # all models, meshes of 8 and 32 devices, every precision
    python benchmarks/bench_memory.py --models qwen2.5-0.5b --devices 8 --precisions bf16,bf16+remat
    python benchmarks/bench_memory.py --models llama-3.1-8b --devices 8 --precisions bf16+remat --lora-rank 16

Computed by XLA's analysis of the CPU-compiled programs, not measured on TPU: TPU layouts and
fusion differ, so treat the figures as estimates (±20%).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# the published config.json values that set the sizes
MODELS = {
    "qwen2.5-0.5b": {
        "hidden_size": 896,
        "num_layers": 24,
        "num_heads": 14,
        "num_kv_heads": 2,
        "intermediate_size": 4864,
        "vocab_size": 151936,
        "attention_bias": True,
        "rope_theta": 1e6,
        "tie_word_embeddings": True,
    },
    "qwen2.5-1.5b": {
        "hidden_size": 1536,
        "num_layers": 28,
        "num_heads": 12,
        "num_kv_heads": 2,
        "intermediate_size": 8960,
        "vocab_size": 151936,
        "attention_bias": True,
        "rope_theta": 1e6,
        "tie_word_embeddings": True,
    },
    "llama-3.2-1b": {
        "hidden_size": 2048,
        "num_layers": 16,
        "num_heads": 32,
        "num_kv_heads": 8,
        "intermediate_size": 8192,
        "vocab_size": 128256,
        "rope_theta": 5e5,
        "tie_word_embeddings": True,
    },
    "llama-3.1-8b": {
        "hidden_size": 4096,
        "num_layers": 32,
        "num_heads": 32,
        "num_kv_heads": 8,
        "intermediate_size": 14336,
        "vocab_size": 128256,
        "rope_theta": 5e5,
        "tie_word_embeddings": False,
    },
}
MESHES = {8: "fsdp=8", 32: "fsdp=16,tensor=2"}
PRECISIONS = {  # name → (compute dtype, remat)
    "fp32": ("float32", False),
    "bf16": ("bfloat16", False),
    "bf16+remat": ("bfloat16", True),
}
GIB = 2**30


def model_config(name: str, compute_dtype: str, remat: bool, num_layers: int | None = None,
                 lora_rank: int = 0):  # fmt: skip
    """The ModelConfig of ``name``, with ``num_layers`` blocks instead of its own when given; with
    ``lora_rank``, adapters of that rank on a bfloat16 base."""
    from jaxrlhf.models import ModelConfig

    sizes = dict(MODELS[name], **({} if num_layers is None else {"num_layers": num_layers}))
    lora = {"lora_rank": lora_rank, "dtype": "bfloat16"} if lora_rank else {}
    return ModelConfig(family="llama", max_position_embeddings=4096, compute_dtype=compute_dtype,
                       remat=remat, **sizes, **lora)  # fmt: skip


def abstract(tree, shardings):
    import jax

    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def step_bytes(config, mesh, *, per_device_batch: int, prompt: int, response: int):
    """(XLA's per-device memory of one PPO train step (one minibatch) on ``mesh``, seconds to lower
    and compile that step)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxrlhf.models import ActorCritic
    from jaxrlhf.models.lora import split_trainable
    from jaxrlhf.models.sharding import batch_divisor, batch_sharding
    from jaxrlhf.train import PPOConfig
    from jaxrlhf.train.experience import Experience
    from jaxrlhf.train.ppo import ppo_loss
    from jaxrlhf.train.state import _mesh_step, init_train_state, mesh_layout

    model = nnx.eval_shape(lambda: ActorCritic(config, rngs=nnx.Rngs(0)))
    graphdef, params, frozen = split_trainable(model)  # frozen: LoRA's base (else nothing)
    optimizer = PPOConfig().optimizer
    layout = mesh_layout(params, optimizer, mesh, frozen)
    state_shapes = jax.eval_shape(lambda p, f: init_train_state(p, optimizer, f), params, frozen)
    state = abstract(state_shapes, jax.tree.unflatten(*layout))
    b = per_device_batch * batch_divisor(mesh)
    data = batch_sharding(mesh)

    def arr(shape, dtype=jnp.float32):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=data)

    exp = Experience(
        prompt_ids=arr((b, prompt), jnp.int32), prompt_mask=arr((b, prompt), jnp.int32),
        response_ids=arr((b, response), jnp.int32), response_mask=arr((b, response)),
        logprobs=arr((b, response)), ref_logprobs=arr((b, response)), values=arr((b, response)),
        scores=arr((b,)), rewards=arr((b, response)), advantages=arr((b, response)),
        returns=arr((b, response)),
    )  # fmt: skip
    loss = ppo_loss(PPOConfig(), graphdef)  # the loss PPOTrainer builds, defaults as the CLI's
    start = time.perf_counter()
    compiled = _mesh_step.lower(state, exp, loss, optimizer, layout).compile()  # its mesh step
    compile_s = time.perf_counter() - start
    stats = compiled.memory_analysis()
    count = sum(x.size for x in jax.tree.leaves((params, frozen)))
    return {
        "params_count": count,
        "trained_count": sum(x.size for x in jax.tree.leaves(params)),
        "arguments": stats.argument_size_in_bytes,
        "outputs": stats.output_size_in_bytes,
        "aliased": stats.alias_size_in_bytes,
        "temporaries": stats.temp_size_in_bytes,
        "params_total": 4 * count,  # the model's bytes in float32
    }, compile_s


def rollout_bytes(config, mesh, *, per_device_batch: int, prompt: int, response: int) -> dict:
    """XLA's per-device memory of sampling ``response`` tokens for ``per_device_batch`` prompts."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxrlhf.models import CausalLM
    from jaxrlhf.models.sharding import batch_divisor, batch_sharding, param_shardings
    from jaxrlhf.rollout import _generate, decode_layout

    graphdef, params = nnx.split(nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0))))
    state = abstract(params, param_shardings(params, mesh))
    b = per_device_batch * batch_divisor(mesh)
    ids = jax.ShapeDtypeStruct((b, prompt), jnp.int32, sharding=batch_sharding(mesh))
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    compiled = _generate.lower(
        state, ids, ids, jax.ShapeDtypeStruct((2,), jnp.uint32), scalar, scalar,
        jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32),
        graphdef=graphdef, max_new_tokens=response, top_k=None, use_top_p=False, greedy=False,
        **decode_layout(b, prompt, config.vocab_size, response),  # the layout sample() uses
    ).compile()  # fmt: skip
    stats = compiled.memory_analysis()
    return {
        "arguments": stats.argument_size_in_bytes,
        "outputs": stats.output_size_in_bytes,
        "temporaries": stats.temp_size_in_bytes,
    }


def measure(name, devices, precision, args) -> dict:
    import jax

    from jaxrlhf.models.sharding import make_mesh

    compute, remat = PRECISIONS[precision]
    config = model_config(name, compute, remat, args.num_layers, args.lora_rank)
    mesh = make_mesh(MESHES[devices], devices=jax.devices()[:devices])
    sizes = {"per_device_batch": args.per_device_batch, "prompt": args.prompt}
    sizes["response"] = args.response
    step, step_compile_s = step_bytes(config, mesh, **sizes)
    rollout = rollout_bytes(config, mesh, **sizes)
    shards = mesh.shape["fsdp"] * mesh.shape["tensor"]
    copies = 1 if args.lora_rank else 2  # LoRA: the reference is the policy with adapters off
    per_param = 2 if args.frozen_dtype == "bfloat16" else 4
    frozen = copies * step["params_count"] * per_param / shards
    step_total = step["arguments"] + step["outputs"] - step["aliased"] + step["temporaries"]
    return {
        "model": name, "devices": devices, "mesh": MESHES[devices], "precision": precision,
        "lora_rank": args.lora_rank, "params_b": step["params_count"] / 1e9,
        "trained_m": step["trained_count"] / 1e6,
        "step_gib": step_total / GIB, "frozen_gib": frozen / GIB,
        "rollout_gib": (rollout["arguments"] + rollout["outputs"] + rollout["temporaries"]) / GIB,
        "step": step, "rollout": rollout, "step_compile_s": step_compile_s,
    }  # fmt: skip


def fits(row) -> str:
    need = row["step_gib"] + row["frozen_gib"]
    chips = [chip for chip, gib in (("v5e", 16), ("v5p", 95)) if need <= 0.9 * gib]
    return ", ".join(chips) if chips else "neither"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--devices", default="8,32", help="mesh sizes (forced CPU devices)")
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--per-device-batch", type=int, default=2, help="sequences per device")
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens")
    parser.add_argument("--response", type=int, default=256, help="response tokens")
    parser.add_argument("--frozen-dtype", default="bfloat16", help="reference / reward model")
    parser.add_argument("--num-layers", type=int, default=None, help="override every model's depth")
    parser.add_argument(
        "--lora-rank",
        type=int,
        default=0,
        help="LoRA's step: adapters of this rank, the base frozen in bf16 (0: full)",
    )
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    devices = [int(d) for d in args.devices.split(",")]
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={max(devices)}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    rows = []
    print("| model | params | devices (mesh) | precision | PPO step GiB/device | + frozen ref & RM "
          "| rollout GiB/device | fits 90% of (per chip) |")  # fmt: skip
    print("|---|---:|---|---|---:|---:|---:|---|")
    for name in args.models.split(","):
        for n in devices:
            for precision in args.precisions.split(","):
                start = time.perf_counter()
                row = measure(name, n, precision, args)
                row["measure_s"] = time.perf_counter() - start  # both programs, built and analysed
                rows.append(row)
                label = precision + (f" + LoRA r={args.lora_rank}" if args.lora_rank else "")
                print(f"| {name} | {row['params_b']:.2f} B | {n} ({row['mesh']}) | {label} | "
                      f"{row['step_gib']:.2f} | {row['frozen_gib']:.2f} | {row['rollout_gib']:.2f} "
                      f"| {fits(row)} |", flush=True)  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    print(f"(per-device batch {args.per_device_batch}, prompt {args.prompt} + response "
          f"{args.response} tokens; XLA memory analysis of CPU-compiled programs)", file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
