"""The ``jaxrlhf`` command: ``demo``, ``train-rm``, ``ppo`` and ``generate``.

Every hyperparameter flag comes from a config dataclass (``--rm-*``: RewardConfig, ``--ppo-*``:
PPOConfig, ``--sft-*``: SFTConfig, ``--data-*``: DataConfig, the demo's own: DemoConfig), so its help
text and default live in exactly one place. ``jaxrlhf <command> --help`` lists them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

# Groups of flags: (config class, prefix).
_PREFIXES = {"SFTConfig": "sft-", "RewardConfig": "rm-", "PPOConfig": "ppo-", "DataConfig": "data-"}


def _add(parser, cls, defaults=None):
    from jaxrlhf.cli_args import add_config_arguments

    add_config_arguments(parser, cls, prefix=_PREFIXES.get(cls.__name__, ""), defaults=defaults)


def _get(args, cls):
    from jaxrlhf.cli_args import config_from_args

    return config_from_args(cls, args, prefix=_PREFIXES.get(cls.__name__, ""))


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: no tokenizer in {path!r} (save one with the model): {err}")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ------------------------------------------------------------------------------------- demo


def cmd_demo(args) -> int:
    from jaxrlhf.demo import DemoConfig, run_demo
    from jaxrlhf.train.ppo import PPOConfig
    from jaxrlhf.train.reward import RewardConfig
    from jaxrlhf.train.sft import SFTConfig

    summary = run_demo(
        _get(args, DemoConfig),
        _get(args, SFTConfig),
        _get(args, RewardConfig),
        _get(args, PPOConfig),
        progress=not args.quiet,
    )
    print(json.dumps(summary, indent=2))
    return 0


# ---------------------------------------------------------------------------------- train-rm


def cmd_train_rm(args) -> int:
    import jax

    from jaxrlhf.data.preference import (
        DataConfig,
        load_preference_dataset,
        tokenize_pairs,
        tokenize_prompts,
    )
    from jaxrlhf.logging import MetricsLogger
    from jaxrlhf.models.hf import from_pretrained, save_pretrained
    from jaxrlhf.report import write_report
    from jaxrlhf.rollout import SamplingConfig, sample, sequences
    from jaxrlhf.train.reward import (
        RewardConfig,
        normalize_reward_model,
        reward_model_from_policy,
        train_reward_model,
    )

    config, data_config = _get(args, RewardConfig), _get(args, DataConfig)
    tokenizer = _load_tokenizer(args.model)
    data = load_preference_dataset(args.data)
    pairs = tokenize_pairs(data, tokenizer, data_config, source=args.data)
    policy = from_pretrained(args.model)
    reward_model = reward_model_from_policy(policy, seed=config.seed)
    reward_model, metrics = train_reward_model(reward_model, pairs, config, progress=not args.quiet)
    os.makedirs(args.out, exist_ok=True)
    with MetricsLogger(os.path.join(args.out, "metrics.jsonl")) as log:
        for step, (loss, acc) in enumerate(zip(metrics["loss"], metrics["accuracy"])):
            log.log(step, {"train/loss": loss, "train/accuracy": acc})
    summary = {
        "eval_accuracy": metrics["eval_accuracy"][-1] if metrics["eval_accuracy"] else None,
        "num_train_pairs": metrics["num_train_pairs"],
        "num_eval_pairs": metrics["num_eval_pairs"],
    }
    if args.normalize:
        # Mean 0, std 1 over the policy's own samples on the dataset's prompts.
        prompts = tokenize_prompts(data, tokenizer, data_config, source=args.data)
        rollout = sample(
            policy,
            prompts.input_ids,
            prompts.attention_mask,
            SamplingConfig(max_new_tokens=data_config.max_response_length),
            jax.random.PRNGKey(config.seed),
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        seq_ids, seq_mask = sequences(prompts.input_ids, prompts.attention_mask, rollout)
        reward_model, stats = normalize_reward_model(reward_model, seq_ids, seq_mask)
        summary.update(stats)
    save_pretrained(reward_model, os.path.join(args.out, "reward_model"), tokenizer=tokenizer)
    write_report(
        os.path.join(args.out, "report.md"),
        title="jaxrlhf train-rm",
        sections=[("Result", "```json\n" + json.dumps(summary, indent=2) + "\n```")],
    )
    print(json.dumps(summary, indent=2))
    return 0


# --------------------------------------------------------------------------------------- ppo


def cmd_ppo(args) -> int:
    from jaxrlhf.data.preference import DataConfig, load_prompt_dataset, tokenize_prompts
    from jaxrlhf.logging import MetricsLogger
    from jaxrlhf.models.hf import from_pretrained, save_pretrained
    from jaxrlhf.train.ppo import PPOConfig, PPOTrainer

    config, data_config = _get(args, PPOConfig), _get(args, DataConfig)
    checkpoints = config.checkpoint_dir or os.path.join(args.out, "checkpoints")
    config = dataclasses.replace(config, checkpoint_dir=checkpoints)
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    _check_fresh_run(args.resume, checkpoints)
    tokenizer = _load_tokenizer(args.policy)
    prompts = tokenize_prompts(
        load_prompt_dataset(args.prompts), tokenizer, data_config, source=args.prompts
    )
    trainer = PPOTrainer.from_sft(
        config,
        from_pretrained(args.policy),
        prompts.input_ids,
        prompts.attention_mask,
        reward_model=from_pretrained(args.reward_model, head="reward"),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    _resume(trainer, checkpoints, metrics_path)
    with MetricsLogger(metrics_path, tensorboard_dir=os.path.join(args.out, "tb")) as log:
        trainer.train(callback=log.log, progress=not args.quiet)
    save_pretrained(trainer.actor(), os.path.join(args.out, "policy"), tokenizer=tokenizer)
    return _ppo_report(args.out, metrics_path)


def _check_fresh_run(resume: bool, checkpoints: str) -> None:
    """With --no-resume, refuse to start over a directory that holds another run's checkpoints."""
    from jaxrlhf.train.checkpoint import all_steps

    steps = all_steps(checkpoints)
    if not resume and steps:
        raise SystemExit(
            f"error: --no-resume, but {checkpoints} holds the checkpoints of an earlier run "
            f"(iterations {', '.join(map(str, steps))}); resume it (drop --no-resume), or choose "
            "another --out or --ppo-checkpoint-dir (nothing was deleted)"
        )


def _resume(trainer, checkpoints: str, metrics_path: str) -> None:
    """Continue from the latest checkpoint (keeping the metric records up to it), or start clean."""
    from jaxrlhf.logging import read_metrics
    from jaxrlhf.train.checkpoint import latest_step

    if latest_step(checkpoints) is None:
        if os.path.exists(metrics_path):
            os.remove(metrics_path)  # records of a run that never checkpointed
        return
    done = trainer.restore(checkpoints)
    print(f"resumed from {checkpoints} at iteration {done}", file=sys.stderr)
    if os.path.exists(metrics_path):  # keep the records of the iterations already done
        kept = [r for r in read_metrics(metrics_path) if r["step"] <= done]
        with open(metrics_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)


def _ppo_report(out: str, metrics_path: str) -> int:
    from jaxrlhf.logging import read_metrics
    from jaxrlhf.report import plot_curves, write_report

    records = read_metrics(metrics_path)
    plots = plot_curves({"ppo": records}, os.path.join(out, "plots"))
    last = records[-1]
    keys = ("objective/scores", "objective/kl", "objective/entropy", "loss/value_avg")
    write_report(
        os.path.join(out, "report.md"),
        title="jaxrlhf ppo",
        sections=[("Last iteration", "\n".join(f"- `{k}`: {last.get(k)}" for k in keys))],
        plots=plots,
    )
    print(json.dumps({k: last.get(k) for k in ("step", *keys)}, indent=2))
    return 0


# ---------------------------------------------------------------------------------- generate


def cmd_generate(args) -> int:
    import jax

    from jaxrlhf.data.preference import DataConfig, tokenize_prompts
    from jaxrlhf.models.hf import from_pretrained
    from jaxrlhf.rollout import SamplingConfig, sample

    sampling = _get(args, SamplingConfig)
    tokenizer = _load_tokenizer(args.model)
    model = from_pretrained(args.model)
    prompts = list(args.prompt)
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise SystemExit("error: give at least one --prompt or a --prompts-file")
    batch = tokenize_prompts({"prompt": prompts}, tokenizer, _get(args, DataConfig))
    rollout = sample(
        model,
        batch.input_ids,
        batch.attention_mask,
        sampling,
        jax.random.PRNGKey(args.seed),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    for prompt, tokens, mask in zip(prompts, rollout.tokens.tolist(), rollout.mask.tolist()):
        text = tokenizer.decode([t for t, m in zip(tokens, mask) if m], skip_special_tokens=True)
        print(json.dumps({"prompt": prompt, "completion": text}))
    return 0


# ---------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from jaxrlhf.data.preference import DataConfig
    from jaxrlhf.demo import DEMO_PPO, DEMO_REWARD, DEMO_SFT, DemoConfig
    from jaxrlhf.rollout import SamplingConfig
    from jaxrlhf.train.ppo import PPOConfig
    from jaxrlhf.train.reward import RewardConfig
    from jaxrlhf.train.sft import SFTConfig

    parser = argparse.ArgumentParser(prog="jaxrlhf", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="the offline demo: SFT → reward model → PPO, with a report")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    _add(demo, DemoConfig)
    _add(demo, SFTConfig, DEMO_SFT)
    _add(demo, RewardConfig, DEMO_REWARD)
    _add(demo, PPOConfig, DEMO_PPO)
    demo.set_defaults(run=cmd_demo)

    rm = sub.add_parser("train-rm", help="train a reward model on preference pairs")
    rm.add_argument(
        "--data", required=True, help="prompt/chosen/rejected json, jsonl, parquet or dataset dir"
    )
    rm.add_argument("--model", required=True, help="local Hugging Face directory of the base LM")
    rm.add_argument("--out", required=True, help="output directory")
    rm.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="normalise scores to mean 0, std 1 over the base LM's samples",
    )
    rm.add_argument("--quiet", action="store_true", help="no progress bars")
    _add(rm, RewardConfig)
    _add(rm, DataConfig)
    rm.set_defaults(run=cmd_train_rm)

    ppo = sub.add_parser("ppo", help="PPO of a policy against a reward model")
    ppo.add_argument(
        "--prompts", required=True, help="prompt-only json, jsonl, parquet or dataset dir"
    )
    ppo.add_argument(
        "--policy", required=True, help="local Hugging Face directory of the SFT policy"
    )
    ppo.add_argument("--reward-model", required=True, help="directory written by train-rm")
    ppo.add_argument("--out", required=True, help="output directory (metrics, checkpoints, policy)")
    ppo.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="continue from the latest checkpoint in OUT/checkpoints (--no-resume refuses to "
        "start over an earlier run's checkpoints)",
    )
    ppo.add_argument("--quiet", action="store_true", help="no progress bars")
    _add(ppo, PPOConfig)
    _add(ppo, DataConfig)
    ppo.set_defaults(run=cmd_ppo)

    gen = sub.add_parser("generate", help="sample completions from a model")
    gen.add_argument("--model", required=True, help="local Hugging Face directory")
    gen.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    gen.add_argument("--prompts-file", help="a text file, one prompt per line")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    _add(gen, SamplingConfig)
    _add(gen, DataConfig)
    gen.set_defaults(run=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except ValueError as err:  # config validation and data errors name the field / row / file
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
