"""The ``jaxrlhf grpo`` and ``jaxrlhf dpo`` commands (the critic-free and the offline algorithms).

Same shape as ``ppo`` and ``train-rm``: flags from the config dataclasses (``--grpo-*``,
``--dpo-*``, ``--data-*``), the data formats of ``train-rm``, checkpoints with resume, metrics,
a report, and the trained policy exported as a Hugging Face directory.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os

from jaxrlhf.cli.common import (
    DATA_HELP,
    MODEL_HELP,
    TB_HELP,
    SampleLog,
    add_common,
    add_config,
    add_distributed,
    add_reward_flags,
    add_sample_flags,
    add_tool_flags,
    check_fresh_run,
    check_prompts_fit,
    check_reward_flags,
    get_config,
    load_prompts,
    model_dir,
    note,
    print_summary,
    resume,
    sampler_for,
    save_policy,
    toolbox_from_args,
    wrote,
)


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
    from jaxrlhf.data.preference import DataConfig
    from jaxrlhf.logging import MetricsLogger
    from jaxrlhf.models.hf import from_pretrained
    from jaxrlhf.train.experience import reward_model_fn
    from jaxrlhf.train.grpo import GRPOTrainer, text_reward_fn
    from jaxrlhf.train.grpo_config import GRPOConfig

    config, data_config = get_config(args, GRPOConfig), get_config(args, DataConfig)
    check_reward_flags(args, required=True)
    checkpoints = config.checkpoint_dir or os.path.join(args.out, "checkpoints")
    config = dataclasses.replace(config, checkpoint_dir=checkpoints)
    check_fresh_run(args.resume, checkpoints, flag="--grpo-checkpoint-dir")
    functions, weights = load_reward_functions(args.reward_fn)  # flag errors before any loading
    toolbox = toolbox_from_args(args)
    policy, tokenizer, prompts = _prompts_and_policy(args, config, data_config, toolbox)
    if args.reward_model:
        reward_model = from_pretrained(model_dir(args.reward_model, "reward model"), head="reward")
        reward_fn = reward_model_fn(reward_model)
    else:
        reward_fn = text_reward_fn(functions, tokenizer, weights=weights)
    trainer = GRPOTrainer.from_sft(
        config, from_pretrained(policy), prompts.input_ids, prompts.attention_mask,
        reward_fn=reward_fn, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, sampler=sampler_for(toolbox, tokenizer),
    )  # fmt: skip
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    resume(trainer, checkpoints, metrics_path)
    samples = SampleLog(trainer, tokenizer, every=args.log_samples_every,
                        num_prompts=args.log_samples, total=config.num_iterations)  # fmt: skip

    def callback(iteration: int, metrics: dict) -> None:
        log.log(iteration, metrics)
        samples(iteration)

    with MetricsLogger(metrics_path, tensorboard_dir=os.path.join(args.out, "tb")) as log:
        history = trainer.train(callback=callback, progress=not args.quiet)
    written = save_policy(trainer.actor(), args.out, tokenizer=tokenizer, base=policy)
    last = history[-1] if history else {}
    keys = ("reward", "reward_std", "frac_reward_zero_std", "kl", "completions/mean_length",
            "tools/calls_per_episode")  # fmt: skip
    summary = {k: last[k] for k in keys if k in last}  # kl: only with β > 0
    report = _grpo_report(args.out, summary, samples)
    print_summary(summary)
    wrote(args.out, **written, report=report, metrics=metrics_path)
    return 0


def _grpo_report(out: str, summary: dict, samples: SampleLog) -> str:
    from jaxrlhf.report import write_report

    sections = [("Last iteration", "```json\n" + json.dumps(summary, indent=2) + "\n```")]
    if samples.markdown():
        sections.append(("Samples", samples.markdown()))
    return write_report(os.path.join(out, "report.md"), title="jaxrlhf grpo", sections=sections)


def _prompts_and_policy(args, config, data_config, toolbox=None):
    from jaxrlhf.models.tokenizer import load_tokenizer

    policy = model_dir(args.policy, "policy")
    tokenizer = load_tokenizer(policy)
    prompts = load_prompts(args.prompts, tokenizer, data_config, toolbox)
    check_prompts_fit((policy,), prompts, config.max_new_tokens, "--grpo-max-new-tokens")
    return policy, tokenizer, prompts


def cmd_dpo(args) -> int:
    from jaxrlhf.data.formats import load_preference_dataset
    from jaxrlhf.data.preference import DataConfig, tokenize_pairs
    from jaxrlhf.logging import MetricsLogger
    from jaxrlhf.models.hf import from_pretrained
    from jaxrlhf.models.tokenizer import load_tokenizer
    from jaxrlhf.report import write_report
    from jaxrlhf.train.dpo import DPOConfig, train_dpo

    config, data_config = get_config(args, DPOConfig), get_config(args, DataConfig)
    directory = model_dir(args.model)
    tokenizer = load_tokenizer(directory)
    data = load_preference_dataset(args.data, data_config, report=note, tokenizer=tokenizer)
    pairs = tokenize_pairs(data.train, tokenizer, data_config, source=args.data)
    eval_pairs = None
    if data.eval is not None:
        eval_pairs = tokenize_pairs(data.eval, tokenizer, data_config, source=f"{args.data} [eval]")
    policy = from_pretrained(directory)  # every input is checked before the output is created
    os.makedirs(args.out, exist_ok=True)
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    with MetricsLogger(metrics_path, tensorboard_dir=os.path.join(args.out, "tb")) as log:
        model, metrics = train_dpo(
            policy, pairs, config, eval_pairs=eval_pairs,
            progress=not args.quiet, callback=log.log,
        )  # fmt: skip
    written = save_policy(model, args.out, tokenizer=tokenizer, base=directory)
    summary = {
        "eval_implicit_reward_accuracy": metrics["eval_accuracy"][-1]
        if metrics["eval_accuracy"]
        else None,
        "num_train_pairs": metrics["num_train_pairs"],
        "num_eval_pairs": metrics["num_eval_pairs"],
        "final_loss": metrics["loss"][-1],
    }
    result = "```json\n" + json.dumps(summary, indent=2) + "\n```"
    report = write_report(os.path.join(args.out, "report.md"), title="jaxrlhf dpo",
                          sections=[("Result", result)])  # fmt: skip
    print_summary(summary)
    wrote(args.out, **written, report=report, metrics=metrics_path)
    return 0


def add_algorithm_parsers(sub) -> None:
    """The ``grpo`` and ``dpo`` subcommands."""
    from jaxrlhf.data.preference import DataConfig
    from jaxrlhf.train.dpo import DPOConfig
    from jaxrlhf.train.grpo_config import GRPOConfig

    grpo = sub.add_parser("grpo", help="GRPO / Dr. GRPO / DAPO / GSPO / RLOO / REINFORCE++",
                          description=f"The critic-free family; {TB_HELP}.")  # fmt: skip
    grpo.add_argument("--prompts", required=True, help=DATA_HELP + " (a prompt column)")
    grpo.add_argument("--policy", required=True, help=MODEL_HELP + " of the SFT policy")
    add_reward_flags(grpo)
    grpo.add_argument(
        "--out", required=True, help="output directory (metrics, checkpoints, policy)"
    )
    add_common(grpo, resume=True)
    add_sample_flags(grpo)
    add_config(grpo, GRPOConfig)
    add_tool_flags(grpo)

    dpo = sub.add_parser("dpo", help="direct preference optimisation on preference pairs",
                         description=f"DPO (Rafailov et al. 2023); {TB_HELP}.")  # fmt: skip
    dpo.add_argument("--data", required=True, help=DATA_HELP + " (preference pairs)")
    dpo.add_argument("--model", required=True, help=MODEL_HELP + " of the SFT policy")
    dpo.add_argument("--out", required=True, help="output directory (metrics, policy)")
    add_common(dpo)
    add_config(dpo, DPOConfig)
    for parser, run in ((grpo, cmd_grpo), (dpo, cmd_dpo)):
        add_config(parser, DataConfig)
        add_distributed(parser)
        parser.set_defaults(run=run)
