"""The ``jaxrlhf grpo`` and ``jaxrlhf dpo`` commands (the critic-free and the offline algorithms).

Same shape as ``ppo`` and ``train-rm``: flags from the config dataclasses (``--grpo-*``,
``--dpo-*``, ``--data-*``), the data formats of ``train-rm``, checkpoints with resume, metrics,
a report, and the trained policy exported as a Hugging Face directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os


def load_reward_functions(specs: list[str]):
    """``module:function`` or ``module:function:weight`` → (functions, weights)."""
    functions, weights = [], []
    for spec in specs:
        parts = spec.split(":")
        if len(parts) not in (2, 3) or not all(parts[:2]):
            raise SystemExit(f"error: --reward-fn {spec!r}: expected module:function[:weight]")
        try:
            fn = getattr(importlib.import_module(parts[0]), parts[1])
        except (ImportError, AttributeError) as err:
            raise SystemExit(f"error: --reward-fn {spec!r}: {err}") from None
        try:
            weight = float(parts[2]) if len(parts) == 3 else 1.0
        except ValueError:
            raise SystemExit(f"error: --reward-fn {spec!r}: the weight is not a number") from None
        functions.append(fn)
        weights.append(weight)
    return functions, weights


def cmd_grpo(args) -> int:
    from jaxrlhf.cli import _check_fresh_run, _get, _model_dir, _resume
    from jaxrlhf.data.preference import DataConfig
    from jaxrlhf.logging import MetricsLogger
    from jaxrlhf.models.hf import from_pretrained, save_pretrained
    from jaxrlhf.train.experience import reward_model_fn
    from jaxrlhf.train.grpo import GRPOTrainer, text_reward_fn
    from jaxrlhf.train.grpo_config import GRPOConfig

    config, data_config = _get(args, GRPOConfig), _get(args, DataConfig)
    if bool(args.reward_model) == bool(args.reward_fn):
        raise SystemExit("error: give --reward-model or --reward-fn (one or more), not both")
    checkpoints = config.checkpoint_dir or os.path.join(args.out, "checkpoints")
    config = dataclasses.replace(config, checkpoint_dir=checkpoints)
    _check_fresh_run(args.resume, checkpoints, flag="--grpo-checkpoint-dir")
    functions, weights = load_reward_functions(args.reward_fn)  # flag errors before any loading
    policy, tokenizer, prompts = _prompts_and_policy(args, config, data_config)
    if args.reward_model:
        reward_model = from_pretrained(_model_dir(args.reward_model, "reward model"), head="reward")
        reward_fn = reward_model_fn(reward_model)
    else:
        reward_fn = text_reward_fn(functions, tokenizer, weights=weights)
    trainer = GRPOTrainer.from_sft(
        config, from_pretrained(policy), prompts.input_ids, prompts.attention_mask,
        reward_fn=reward_fn, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    _resume(trainer, checkpoints, metrics_path)
    with MetricsLogger(metrics_path, tensorboard_dir=os.path.join(args.out, "tb")) as log:
        history = trainer.train(callback=log.log, progress=not args.quiet)
    save_pretrained(trainer.actor(), os.path.join(args.out, "policy"), tokenizer=tokenizer)
    last = history[-1] if history else {}
    keys = ("reward", "reward_std", "frac_reward_zero_std", "kl", "completions/mean_length")
    print(json.dumps({k: last[k] for k in keys if k in last}, indent=2))  # kl: only with β > 0
    return 0


def _prompts_and_policy(args, config, data_config):
    from jaxrlhf.cli import _check_positions, _load_tokenizer, _longest, _model_dir, _note
    from jaxrlhf.data.formats import load_prompt_dataset
    from jaxrlhf.data.preference import tokenize_prompts

    policy = _model_dir(args.policy, "policy")
    tokenizer = _load_tokenizer(policy)
    rows = load_prompt_dataset(args.prompts, data_config, report=_note)
    prompts = tokenize_prompts(rows, tokenizer, data_config, source=args.prompts)
    width = prompts.input_ids.shape[1]
    _check_positions(
        policy,
        width + config.max_new_tokens,
        what=f"prompts padded to {width} tokens (the longest has {_longest(prompts.attention_mask)})"
        f" + --grpo-max-new-tokens {config.max_new_tokens}",
        fixes="lower --grpo-max-new-tokens, or --data-max-prompt-length (with --data-truncate)",
    )
    return policy, tokenizer, prompts


def cmd_dpo(args) -> int:
    from jaxrlhf.cli import _get, _load_tokenizer, _model_dir, _note
    from jaxrlhf.data.formats import load_preference_dataset
    from jaxrlhf.data.preference import DataConfig, tokenize_pairs
    from jaxrlhf.logging import MetricsLogger
    from jaxrlhf.models.hf import from_pretrained, save_pretrained
    from jaxrlhf.report import write_report
    from jaxrlhf.train.dpo import DPOConfig, train_dpo

    config, data_config = _get(args, DPOConfig), _get(args, DataConfig)
    model_dir = _model_dir(args.model)
    tokenizer = _load_tokenizer(model_dir)
    data = load_preference_dataset(args.data, data_config, report=_note)
    pairs = tokenize_pairs(data.train, tokenizer, data_config, source=args.data)
    eval_pairs = None
    if data.eval is not None:
        eval_pairs = tokenize_pairs(data.eval, tokenizer, data_config, source=f"{args.data} [eval]")
    policy = from_pretrained(model_dir)  # every input is checked before the output is created
    os.makedirs(args.out, exist_ok=True)
    with MetricsLogger(os.path.join(args.out, "metrics.jsonl")) as log:
        model, metrics = train_dpo(
            policy, pairs, config, eval_pairs=eval_pairs,
            progress=not args.quiet, callback=log.log,
        )  # fmt: skip
    save_pretrained(model, os.path.join(args.out, "policy"), tokenizer=tokenizer)
    summary = {
        "eval_implicit_reward_accuracy": metrics["eval_accuracy"][-1]
        if metrics["eval_accuracy"]
        else None,
        "num_train_pairs": metrics["num_train_pairs"],
        "num_eval_pairs": metrics["num_eval_pairs"],
        "final_loss": metrics["loss"][-1],
    }
    write_report(
        os.path.join(args.out, "report.md"),
        title="jaxrlhf dpo",
        sections=[("Result", "```json\n" + json.dumps(summary, indent=2) + "\n```")],
    )
    print(json.dumps(summary, indent=2))
    return 0


def add_commands(sub, add, add_distributed, data_help: str, model_help: str) -> None:
    """The ``grpo`` and ``dpo`` subcommands (``add(parser, Config)`` adds a config's flags)."""
    from jaxrlhf.data.preference import DataConfig
    from jaxrlhf.train.dpo import DPOConfig
    from jaxrlhf.train.grpo_config import GRPOConfig

    grpo = sub.add_parser("grpo", help="GRPO / Dr. GRPO / DAPO / GSPO / RLOO / REINFORCE++")
    grpo.add_argument("--prompts", required=True, help=data_help + " (a prompt column)")
    grpo.add_argument("--policy", required=True, help=model_help + " of the SFT policy")
    grpo.add_argument("--reward-model", help="directory written by train-rm")
    grpo.add_argument(
        "--reward-fn",
        action="append",
        default=[],
        help="module:function[:weight] with fn(prompts, completions) -> list[float] (repeatable; "
        "the rewards are summed with their weights), e.g. "
        "jaxrlhf.tasks.arithmetic:correctness_reward",
    )
    grpo.add_argument("--out", required=True, help="output directory")
    grpo.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                      help="continue from the latest checkpoint in OUT/checkpoints")  # fmt: skip
    grpo.add_argument("--quiet", action="store_true", help="no progress bars")
    add(grpo, GRPOConfig)
    add(grpo, DataConfig)
    add_distributed(grpo)
    grpo.set_defaults(run=cmd_grpo)

    dpo = sub.add_parser("dpo", help="direct preference optimisation on preference pairs")
    dpo.add_argument("--data", required=True, help=data_help + " (preference pairs)")
    dpo.add_argument("--model", required=True, help=model_help + " of the SFT policy")
    dpo.add_argument("--out", required=True, help="output directory")
    dpo.add_argument("--quiet", action="store_true", help="no progress bars")
    add(dpo, DPOConfig)
    add(dpo, DataConfig)
    add_distributed(dpo)
    dpo.set_defaults(run=cmd_dpo)
