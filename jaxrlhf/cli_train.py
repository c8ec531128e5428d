"""The ``jaxrlhf sft`` and ``jaxrlhf train-rm`` commands: data in any supported format → the trainer
core → metrics, report and a Hugging Face directory. (Shared helpers live in :mod:`jaxrlhf.cli`.)"""

from __future__ import annotations

import dataclasses
import json
import os

# ---------------------------------------------------------------------------------------- sft


def cmd_sft(args) -> int:
    from jaxrlhf.cli import (
        _check_fresh_run,
        _get,
        _load_tokenizer,
        _model_dir,
        _note,
        _trim_metrics,
    )
    from jaxrlhf.data.preference import DataConfig
    from jaxrlhf.data.sft import load_sft_dataset
    from jaxrlhf.logging import MetricsLogger
    from jaxrlhf.models.hf import from_pretrained, save_pretrained
    from jaxrlhf.train.checkpoint import latest_step
    from jaxrlhf.train.sft import SFTConfig, train_sft

    config, data_config = _get(args, SFTConfig), _get(args, DataConfig)
    checkpoints = config.checkpoint_dir or os.path.join(args.out, "checkpoints")
    config = dataclasses.replace(config, checkpoint_dir=checkpoints)
    _check_fresh_run(args.resume, checkpoints, flag="--sft-checkpoint-dir")
    model_dir = _model_dir(args.model)
    tokenizer = _load_tokenizer(model_dir)
    data = load_sft_dataset(args.data, data_config, report=_note)
    train, held_out = _sft_batches(args, config, data_config, data, tokenizer, model_dir)
    base = from_pretrained(model_dir)  # every input is checked before the output is created
    os.makedirs(args.out, exist_ok=True)
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    done = latest_step(checkpoints)
    if done is not None:
        _note(f"resuming from {checkpoints} at step {done}")
    _trim_metrics(metrics_path, done)

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
    save_pretrained(model, os.path.join(args.out, "policy"), tokenizer=tokenizer)
    return _sft_report(args, data, train, sft_metrics, metrics_path)


def _sft_batches(args, config, data_config, data, tokenizer, model_dir):
    """The tokenised training and held-out SFT batches, checked to fit the model's positions."""
    from jaxrlhf.cli import _check_positions, _longest
    from jaxrlhf.data.sft import tokenize_sft

    def tokenize(rows, source):
        return tokenize_sft(rows, tokenizer, data_config, source=source,
                            completion_only_loss=config.completion_only_loss)  # fmt: skip

    train = tokenize(data.train, args.data)
    held_out = None if data.eval is None else tokenize(data.eval, f"{args.data} [eval]")
    for batch in filter(None, (train, held_out)):
        _check_positions(
            model_dir,
            batch.input_ids.shape[1],
            what=f"SFT sequences padded to {batch.input_ids.shape[1]} tokens (the longest has "
            f"{_longest(batch.attention_mask)})",
            fixes="lower --data-max-prompt-length + --data-max-response-length (a sequence's cap) "
            "and pass --data-truncate, or use a model with more positions",
        )
    return train, held_out


def _sft_report(args, data, train, sft_metrics, metrics_path) -> int:
    from jaxrlhf.logging import read_metrics
    from jaxrlhf.report import plot_curves, write_report
    from jaxrlhf.train.distributed import is_main

    if not is_main():
        return 0
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
    print(json.dumps(summary, indent=2))
    return 0


# ----------------------------------------------------------------------------------- train-rm


def cmd_train_rm(args) -> int:
    from jaxrlhf.cli import _get, _load_tokenizer, _model_dir, _note
    from jaxrlhf.data.formats import load_preference_dataset
    from jaxrlhf.data.preference import DataConfig
    from jaxrlhf.logging import MetricsLogger
    from jaxrlhf.models.hf import from_pretrained, save_pretrained
    from jaxrlhf.report import write_report
    from jaxrlhf.train.reward import RewardConfig, reward_model_from_policy, train_reward_model

    config, data_config = _get(args, RewardConfig), _get(args, DataConfig)
    model_dir = _model_dir(args.model)
    tokenizer = _load_tokenizer(model_dir)
    data = load_preference_dataset(args.data, data_config, report=_note)
    pairs, eval_pairs, margins = _rm_pairs(args, config, data_config, data, tokenizer, model_dir)
    policy = from_pretrained(model_dir)
    reward_model, metrics = train_reward_model(
        reward_model_from_policy(policy, seed=config.seed),
        pairs,
        config,
        margins=margins,
        eval_pairs=eval_pairs,
        progress=not args.quiet,
    )
    os.makedirs(args.out, exist_ok=True)
    with MetricsLogger(os.path.join(args.out, "metrics.jsonl")) as log:
        for step, (loss, acc, skipped) in enumerate(
            zip(metrics["loss"], metrics["accuracy"], metrics["nonfinite_skipped"])
        ):
            log.log(
                step,
                {"train/loss": loss, "train/accuracy": acc, "train/nonfinite_skipped": skipped},
            )
    summary = {
        "eval_accuracy": metrics["eval_accuracy"][-1] if metrics["eval_accuracy"] else None,
        "num_train_pairs": metrics["num_train_pairs"],
        "num_eval_pairs": metrics["num_eval_pairs"],
    }
    if args.normalize:
        reward_model, stats = _normalize(policy, reward_model, data, pairs, tokenizer, args, config,
                                         data_config)  # fmt: skip
        summary.update(stats)
    save_pretrained(reward_model, os.path.join(args.out, "reward_model"), tokenizer=tokenizer)
    write_report(
        os.path.join(args.out, "report.md"),
        title="jaxrlhf train-rm",
        sections=[
            ("Data", data.description),
            ("Result", "```json\n" + json.dumps(summary, indent=2) + "\n```"),
        ],
    )
    print(json.dumps(summary, indent=2))
    return 0


def _rm_pairs(args, config, data_config, data, tokenizer, model_dir):
    """(training pairs, held-out pairs or None, margins or None), checked to fit the model."""
    import numpy as np

    from jaxrlhf.cli import _check_positions, _longest
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
        _check_positions(
            model_dir,
            batch.chosen_ids.shape[1],
            what=f"prompt + response padded to {batch.chosen_ids.shape[1]} tokens (the longest "
            f"pair has {max(_longest(batch.chosen_mask), _longest(batch.rejected_mask))})",
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
