"""The ``jaxrlhf sft`` and ``jaxrlhf train-rm`` commands: data in any supported format → the trainer
core → metrics, report and a Hugging Face directory."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

from jaxrlhf.cli.common import (
    DATA_HELP,
    MODEL_HELP,
    TB_HELP,
    add_common,
    add_config,
    add_distributed,
    check_fresh_run,
    check_positions,
    get_config,
    longest,
    model_dir,
    note,
    print_summary,
    save_policy,
    trim_metrics,
    wrote,
)

# ---------------------------------------------------------------------------------------- sft


def cmd_sft(args) -> int:
    from jaxrlhf.data.preference import DataConfig
    from jaxrlhf.data.sft import load_sft_dataset
    from jaxrlhf.logging import MetricsLogger
    from jaxrlhf.models.hf import from_pretrained
    from jaxrlhf.models.tokenizer import load_tokenizer
    from jaxrlhf.train.checkpoint import latest_step
    from jaxrlhf.train.sft import SFTConfig, train_sft

    config, data_config = get_config(args, SFTConfig), get_config(args, DataConfig)
    checkpoints = config.checkpoint_dir or os.path.join(args.out, "checkpoints")
    config = dataclasses.replace(config, checkpoint_dir=checkpoints)
    check_fresh_run(args.resume, checkpoints, flag="--sft-checkpoint-dir")
    directory = model_dir(args.model)
    tokenizer = load_tokenizer(directory)
    data = load_sft_dataset(args.data, data_config, report=note, tokenizer=tokenizer)
    train, held_out = _sft_batches(args, config, data_config, data, tokenizer, directory)
    base = from_pretrained(directory)  # every input is checked before the output is created
    os.makedirs(args.out, exist_ok=True)
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    done = latest_step(checkpoints)
    if done is not None:
        note(f"resuming from {checkpoints} at step {done}")
    trim_metrics(metrics_path, done)

    def record(step: int, metrics: dict) -> dict:
        keys = {"loss": "train/loss", "grad_norm": "train/grad_norm", "eval/loss": "eval/loss",
                "nonfinite_skipped": "train/nonfinite_skipped"}  # fmt: skip
        return {name: metrics[k] for k, name in keys.items() if k in metrics}

    with MetricsLogger(metrics_path, tensorboard_dir=os.path.join(args.out, "tb")) as log:
        model, sft_metrics = train_sft(
            base,
            train.input_ids,
            train.attention_mask,
            config,
            loss_mask=train.loss_mask,
            eval_data=None if held_out is None else tuple(held_out[:3]),
            progress=not args.quiet,
            callback=lambda step, metrics: log.log(step, record(step, metrics)),
        )
    written = save_policy(model, args.out, tokenizer=tokenizer, base=directory)
    _sft_report(args, data, train, sft_metrics, metrics_path)
    wrote(args.out, **written, report=os.path.join(args.out, "report.md"),
          metrics=metrics_path)  # fmt: skip
    return 0


def _sft_batches(args, config, data_config, data, tokenizer, directory):
    """The tokenised training and held-out SFT batches, checked to fit the model's positions."""
    from jaxrlhf.data.sft import tokenize_sft

    def tokenize(rows, source):
        return tokenize_sft(rows, tokenizer, data_config, source=source,
                            completion_only_loss=config.completion_only_loss)  # fmt: skip

    train = tokenize(data.train, args.data)
    held_out = None if data.eval is None else tokenize(data.eval, f"{args.data} [eval]")
    for batch in filter(None, (train, held_out)):
        check_positions(
            directory,
            batch.input_ids.shape[1],
            what=f"SFT sequences padded to {batch.input_ids.shape[1]} tokens (the longest has "
            f"{longest(batch.attention_mask)})",
            fixes="lower --data-max-prompt-length + --data-max-response-length (a sequence's cap) "
            "and pass --data-truncate, or use a model with more positions",
        )
    return train, held_out


def _sft_report(args, data, train, sft_metrics, metrics_path) -> None:
    from jaxrlhf.logging import read_metrics
    from jaxrlhf.report import plot_curves, write_report
    from jaxrlhf.train.distributed import is_main

    if not is_main():
        return
    records = read_metrics(metrics_path)
    evals = [r["eval/loss"] for r in records if "eval/loss" in r]
    summary = {
        "format": data.format,
        "steps": records[-1]["step"] if records else 0,
        "final_loss": records[-1]["train/loss"] if records else None,
        "eval_loss": evals[-1] if evals else None,
        "num_train": sft_metrics["num_train"],
        "num_eval": sft_metrics.get("num_eval", 0),
        "num_truncated": train.num_truncated,
    }
    plots = plot_curves({"sft": records}, os.path.join(args.out, "plots"),
                        curves={"loss": ("train/loss", "eval/loss")})  # fmt: skip
    write_report(
        os.path.join(args.out, "report.md"),
        title="jaxrlhf sft",
        sections=[
            ("Data", data.description),
            ("Result", "```json\n" + json.dumps(summary, indent=2) + "\n```"),
        ],
        plots=plots,
    )
    print_summary(summary)


# ----------------------------------------------------------------------------------- train-rm


def cmd_train_rm(args) -> int:
    from jaxrlhf.data.formats import load_preference_dataset
    from jaxrlhf.data.preference import DataConfig
    from jaxrlhf.logging import MetricsLogger
    from jaxrlhf.models.hf import from_pretrained, save_pretrained
    from jaxrlhf.models.tokenizer import load_tokenizer
    from jaxrlhf.report import write_report
    from jaxrlhf.train.reward import RewardConfig, reward_model_from_policy, train_reward_model

    config, data_config = get_config(args, RewardConfig), get_config(args, DataConfig)
    directory = model_dir(args.model)
    tokenizer = load_tokenizer(directory)
    data = load_preference_dataset(args.data, data_config, report=note, tokenizer=tokenizer)
    pairs, eval_pairs, margins = _rm_pairs(args, config, data_config, data, tokenizer, directory)
    policy = from_pretrained(directory)
    reward_model, metrics = train_reward_model(
        reward_model_from_policy(policy, seed=config.seed),
        pairs,
        config,
        margins=margins,
        eval_pairs=eval_pairs,
        progress=not args.quiet,
    )
    os.makedirs(args.out, exist_ok=True)
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    with MetricsLogger(metrics_path, tensorboard_dir=os.path.join(args.out, "tb")) as log:
        columns = zip(metrics["loss"], metrics["accuracy"], metrics["nonfinite_skipped"])
        for step, (loss, acc, skipped) in enumerate(columns):
            log.log(step, {"train/loss": loss, "train/accuracy": acc,
                           "train/nonfinite_skipped": skipped})  # fmt: skip
    summary = {
        "eval_accuracy": metrics["eval_accuracy"][-1] if metrics["eval_accuracy"] else None,
        "num_train_pairs": metrics["num_train_pairs"],
        "num_eval_pairs": metrics["num_eval_pairs"],
    }
    if args.normalize:
        reward_model, stats = _normalize(policy, reward_model, data, pairs, tokenizer, args, config,
                                         data_config)  # fmt: skip
        summary.update(stats)
    out = os.path.join(args.out, "reward_model")
    save_pretrained(reward_model, out, tokenizer=tokenizer)
    result = "```json\n" + json.dumps(summary, indent=2) + "\n```"
    report = write_report(os.path.join(args.out, "report.md"), title="jaxrlhf train-rm",
                          sections=[("Data", data.description), ("Result", result)])  # fmt: skip
    print_summary(summary)
    wrote(args.out, **{"reward model": out}, report=report, metrics=metrics_path)
    return 0


def _rm_pairs(args, config, data_config, data, tokenizer, directory):
    """(training pairs, held-out pairs or None, margins or None), checked to fit the model."""
    import numpy as np

    from jaxrlhf.data.preference import tokenize_pairs

    margins = None
    if config.margin_from_scores:
        if not data.format.scored:
            raise SystemExit(
                "error: --rm-margin-from-scores needs scored data (score_chosen and score_rejected "
                f"columns); {args.data} has none"
            )
        margins = np.array([r["score_chosen"] - r["score_rejected"] for r in data.train])
    pairs = tokenize_pairs(data.train, tokenizer, data_config, source=args.data)
    eval_pairs = None
    if data.eval is not None:
        eval_source = f"{args.data} [{data_config.eval_split}]"
        eval_pairs = tokenize_pairs(data.eval, tokenizer, data_config, source=eval_source)
    for batch in filter(None, (pairs, eval_pairs)):
        check_positions(
            directory,
            batch.chosen_ids.shape[1],
            what=f"prompt + response padded to {batch.chosen_ids.shape[1]} tokens (the longest "
            f"pair has {max(longest(batch.chosen_mask), longest(batch.rejected_mask))})",
            fixes="lower --data-max-prompt-length / --data-max-response-length and pass "
            "--data-truncate, or use a model with more positions",
        )
    return pairs, eval_pairs, margins


def _normalize(policy, reward_model, data, pairs, tokenizer, args, config, data_config):
    """Mean 0, std 1 over the policy's own samples on the dataset's prompts, as long as the
    longest responses of the data (so they fit where the pairs fit)."""
    import jax

    from jaxrlhf.data.preference import tokenize_prompts
    from jaxrlhf.rollout import SamplingConfig, sample, sequences
    from jaxrlhf.train.reward import normalize_reward_model

    prompts = tokenize_prompts(data.train, tokenizer, data_config, source=args.data)
    rollout = sample(
        policy,
        prompts.input_ids,
        prompts.attention_mask,
        SamplingConfig(max_new_tokens=pairs.chosen_ids.shape[1] - prompts.input_ids.shape[1]),
        jax.random.PRNGKey(config.seed),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    seq_ids, seq_mask = sequences(prompts.input_ids, prompts.attention_mask, rollout)
    return normalize_reward_model(reward_model, seq_ids, seq_mask)


# ---------------------------------------------------------------------------------- parsers


def add_training_parsers(sub) -> None:
    """The ``sft`` and ``train-rm`` subcommands."""
    from jaxrlhf.data.preference import DataConfig
    from jaxrlhf.train.reward import RewardConfig
    from jaxrlhf.train.sft import SFT_DEFAULTS, SFTConfig

    sft = sub.add_parser("sft", help="supervised fine-tuning on text, prompt/completion or chats",
                         description=f"Supervised fine-tuning; {TB_HELP}.")  # fmt: skip
    sft.add_argument(
        "--data", required=True, help=DATA_HELP + " (text, prompt/completion or messages)"
    )
    sft.add_argument("--model", required=True, help=MODEL_HELP + " of the base LM")
    sft.add_argument("--out", required=True, help="output directory (metrics, checkpoints, policy)")
    add_common(sft, resume=True)
    add_config(sft, SFTConfig, SFT_DEFAULTS)

    rm = sub.add_parser("train-rm", help="train a reward model on preference pairs",
                        description=f"Reward model (Bradley-Terry); {TB_HELP}.")  # fmt: skip
    rm.add_argument("--data", required=True, help=DATA_HELP + " (preference pairs)")
    rm.add_argument("--model", required=True, help=MODEL_HELP + " of the base LM")
    rm.add_argument("--out", required=True, help="output directory (metrics, reward_model)")
    rm.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=True,
                    help="normalise scores to mean 0, std 1 over the base LM's samples")  # fmt: skip
    add_common(rm)
    add_config(rm, RewardConfig)
    for parser, run in ((sft, cmd_sft), (rm, cmd_train_rm)):
        add_config(parser, DataConfig)
        add_distributed(parser)
        parser.set_defaults(run=run)
