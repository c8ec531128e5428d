"""How the critic's initialisation changes its first iterations: explained variance on the demo.

Trains the demo's base policy and reward model once (the demo's own stages and presets), then runs
the first PPO iterations (β = 0.1, the demo's settings) three ways and prints, per iteration, the
critic's explained variance 1 − Var[R − V] / Var[R] (``val/explained_variance``):

* shared trunk, zero value head          (``PPOConfig()`` default)
* shared trunk, random value head N(0, 1/(D+1))   (the default before the zero head)
* separate critic from the SFT trunk, zero value head     (``separate_critic=True``)
* separate critic from the reward model (trunk and head)  (``critic_init="reward_model"``, as trl)

    python benchmarks/critic_init.py --iterations 10
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile

SETTINGS = {
    "shared trunk, zero head": {},
    "shared trunk, random head": {},  # the head re-drawn after from_sft (see randomize_head)
    "separate, SFT trunk, zero head": {"separate_critic": True},
    "separate, from the reward model": {"separate_critic": True, "critic_init": "reward_model"},
}


def randomize_head(trainer, *, seed: int) -> None:
    """Replace the (zero) value head in the trainer's state by a N(0, 1/(D+1)) draw."""
    import jax
    import numpy as np

    head = trainer.state.train.params["value_head"]
    kernel = head["kernel"][...]
    std = 1.0 / np.sqrt(kernel.shape[0] + 1)
    head["kernel"][...] = std * jax.random.normal(jax.random.PRNGKey(seed), kernel.shape)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=10, help="PPO iterations per setting")
    parser.add_argument("--sft-steps", type=int, default=None, help="SFT steps (the demo's: 500)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    from flax import nnx

    from jaxrlhf.demo.common import (
        DEMO_PPO,
        DEMO_REWARD,
        DEMO_SFT,
        DemoConfig,
        build_task,
        train_demo_reward_model,
    )
    from jaxrlhf.models import CausalLM
    from jaxrlhf.train import PPOTrainer, train_sft

    scratch = tempfile.TemporaryDirectory()  # the reward model's metrics: not a result here
    demo = DemoConfig(out_dir=scratch.name)
    task, model_config = build_task(demo, DEMO_PPO)
    base = CausalLM(model_config, rngs=nnx.Rngs(demo.seed))
    sft = (
        DEMO_SFT if args.sft_steps is None else dataclasses.replace(DEMO_SFT, steps=args.sft_steps)
    )
    base, _ = train_sft(base, *task.corpus_batch(), sft, progress=False)
    reward_model, _ = train_demo_reward_model(
        task, base, demo, DEMO_REWARD, DEMO_PPO, progress=False
    )
    prompts = task.prompt_batch()
    results = {}
    for label, changes in SETTINGS.items():
        config = dataclasses.replace(DEMO_PPO, num_iterations=args.iterations, **changes)
        trainer = PPOTrainer.from_sft(
            config, base, prompts.input_ids, prompts.attention_mask, reward_model=reward_model,
            eos_token_id=task.eos_token_id, pad_token_id=task.pad_token_id,
        )  # fmt: skip
        if label == "shared trunk, random head":
            randomize_head(trainer, seed=demo.seed + 1)
        history = trainer.train(progress=False)
        results[label] = [round(m["val/explained_variance"], 3) for m in history]
        print(f"{label:<34}", " ".join(f"{v:6.2f}" for v in results[label]), flush=True)
    scratch.cleanup()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
