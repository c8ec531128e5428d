"""The ``jaxrlhf`` command: ``demo``, ``sft``, ``train-rm``, ``ppo``, ``grpo``, ``dpo``, ``generate``
and ``collect`` (label preference pairs: a local web page, or ``--labeler``).

Every hyperparameter flag comes from a config dataclass (``--rm-*``: RewardConfig, ``--ppo-*``:
PPOConfig, ``--sft-*``: SFTConfig, ``--data-*``: DataConfig, the demo's own: DemoConfig), so its help
text and default live in exactly one place. ``jaxrlhf <command> --help`` lists them.

``--data`` / ``--prompts`` take a file, a dataset directory or a Hub dataset name; ``--model`` /
``--policy`` / ``--reward-model`` a checkpoint directory or a Hub model id. The data format is
reported in one line on stderr, and lengths are checked against the model before any training.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

# Groups of flags: (config class, prefix).
_PREFIXES = {
    "SFTConfig": "sft-",
    "RewardConfig": "rm-",
    "PPOConfig": "ppo-",
    "DataConfig": "data-",
    "GRPOConfig": "grpo-",
    "DPOConfig": "dpo-",
}


def _add(parser, cls, defaults=None):
    from jaxrlhf.cli_args import add_config_arguments

    add_config_arguments(parser, cls, prefix=_PREFIXES.get(cls.__name__, ""), defaults=defaults)


def _get(args, cls):
    from jaxrlhf.cli_args import config_from_args

    return config_from_args(cls, args, prefix=_PREFIXES.get(cls.__name__, ""))


# The files a tokenizer is read from (any one of them).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    if not any(os.path.exists(os.path.join(path, name)) for name in TOKENIZER_FILES):
        # transformers would build an empty tokenizer from config.json alone
        raise SystemExit(
            f"error: no tokenizer in {path!r} (none of {', '.join(TOKENIZER_FILES)}): save one "
            "with the model (tokenizer.save_pretrained)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: no tokenizer in {path!r} (save one with the model): {err}")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _note(line: str) -> None:
    """One line of information for the user (stderr, so that stdout stays JSON)."""
    print(line, file=sys.stderr)


def _model_dir(name: str, what: str = "model") -> str:
    """The local checkpoint directory of a directory or a Hub model id."""
    from jaxrlhf.hub import resolve_model

    return resolve_model(name, what=what)


def _check_positions(model_dir: str, length: int, *, what: str, fixes: str) -> None:
    """Exit before any training when ``length`` positions do not fit a GPT-2-family model's
    learned position table (the rollout would refuse them, and training would read past it)."""
    from jaxrlhf.models.config import ModelConfig

    config = ModelConfig.from_hf(model_dir)
    limit = config.max_position_embeddings
    if config.family == "gpt2" and length > limit:
        raise SystemExit(
            f"error: {what}: {length} positions, more than the max_position_embeddings={limit} "
            f"of {model_dir}: {fixes}"
        )


def _longest(mask) -> int:
    return int(mask.sum(axis=1).max())


# ------------------------------------------------------------------------------------- demo


def cmd_demo(args) -> int:
    from jaxrlhf.demo import DemoConfig, run_demo
    from jaxrlhf.train.dpo import DPOConfig
    from jaxrlhf.train.grpo_config import GRPOConfig
    from jaxrlhf.train.ppo import PPOConfig
    from jaxrlhf.train.reward import RewardConfig
    from jaxrlhf.train.sft import SFTConfig

    summary = run_demo(
        _get(args, DemoConfig),
        _get(args, SFTConfig),
        _get(args, RewardConfig),
        _get(args, PPOConfig),
        grpo=_get(args, GRPOConfig),
        dpo=_get(args, DPOConfig),
        progress=not args.quiet,
    )
    print(json.dumps(summary, indent=2))
    return 0


# --------------------------------------------------------------------------------------- sft


def _trim_metrics(metrics_path: str, done: int | None) -> None:
    """Keep the metric records of the steps a checkpoint holds (``done``; None: none).

    Safe after a ``kill -9``: a torn last line (the process died while appending it) is dropped,
    and the kept records replace the file atomically (a temporary file, then ``os.replace``), so a
    kill during the trim leaves either the old file or the new one.
    """
    from jaxrlhf.train.distributed import is_main

    if not is_main() or not os.path.exists(metrics_path):
        return
    if done is None:
        os.remove(metrics_path)  # records of a run that never checkpointed
        return
    with open(metrics_path, encoding="utf-8") as f:
        lines = [line for line in f.read().split("\n") if line.strip()]
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break  # the record being written when the run was killed
            raise ValueError(f"{metrics_path}, line {number}: not a JSON record: {line[:80]!r}")
        if record["step"] <= done:
            kept.append(record)
    tmp = f"{metrics_path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, metrics_path)


# ---------------------------------------------------------------------------------- train-rm


# --------------------------------------------------------------------------------------- ppo


def cmd_ppo(args) -> int:
    from jaxrlhf.data.preference import DataConfig
    from jaxrlhf.logging import MetricsLogger
    from jaxrlhf.models.hf import from_pretrained, save_pretrained
    from jaxrlhf.train.distributed import is_main
    from jaxrlhf.train.ppo import PPOConfig, PPOTrainer

    config, data_config = _get(args, PPOConfig), _get(args, DataConfig)
    checkpoints = config.checkpoint_dir or os.path.join(args.out, "checkpoints")
    config = dataclasses.replace(config, checkpoint_dir=checkpoints)
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    _check_fresh_run(args.resume, checkpoints)
    policy, reward_model, tokenizer, prompts = _ppo_inputs(args, config, data_config)
    reward_model = from_pretrained(reward_model, head="reward")  # refuses an LM without a head
    trainer = PPOTrainer.from_sft(
        config,
        from_pretrained(policy),
        prompts.input_ids,
        prompts.attention_mask,
        reward_model=reward_model,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    _resume(trainer, checkpoints, metrics_path)
    # Every process runs all of this; metrics, report and policy are written by process 0 only.
    with MetricsLogger(metrics_path, tensorboard_dir=os.path.join(args.out, "tb")) as log:
        trainer.train(callback=log.log, progress=not args.quiet and is_main())
    save_pretrained(trainer.actor(), os.path.join(args.out, "policy"), tokenizer=tokenizer)
    return _ppo_report(args.out, metrics_path) if is_main() else 0


def _ppo_inputs(args, config, data_config):
    """(policy directory, reward-model directory, tokenizer, prompts): Hub ids resolved, the
    prompts loaded in any supported format and tokenised, and prompt + response checked to fit
    both models."""
    from jaxrlhf.data.formats import load_prompt_dataset
    from jaxrlhf.data.preference import tokenize_prompts

    policy = _model_dir(args.policy, "policy")
    reward_model = _model_dir(args.reward_model, "reward model")
    tokenizer = _load_tokenizer(policy)
    rows = load_prompt_dataset(args.prompts, data_config, report=_note)
    prompts = tokenize_prompts(rows, tokenizer, data_config, source=args.prompts)
    width = prompts.input_ids.shape[1]
    for model_dir in (policy, reward_model):
        _check_positions(
            model_dir,
            width + config.max_new_tokens,
            what=f"prompts padded to {width} tokens (the longest has "
            f"{_longest(prompts.attention_mask)}) + --ppo-max-new-tokens {config.max_new_tokens}",
            fixes="lower --ppo-max-new-tokens, or --data-max-prompt-length (with --data-truncate "
            "for longer prompts)",
        )
    return policy, reward_model, tokenizer, prompts


def _check_fresh_run(resume: bool, checkpoints: str, flag: str = "--ppo-checkpoint-dir") -> None:
    """With --no-resume, refuse to start over a directory that holds another run's checkpoints."""
    from jaxrlhf.train.checkpoint import all_steps

    steps = all_steps(checkpoints)
    if not resume and steps:
        raise SystemExit(
            f"error: --no-resume, but {checkpoints} holds the checkpoints of an earlier run "
            f"(iterations {', '.join(map(str, steps))}); resume it (drop --no-resume), or choose "
            f"another --out or {flag} (nothing was deleted)"
        )


def _resume(trainer, checkpoints: str, metrics_path: str) -> None:
    """Continue from the latest checkpoint (keeping the metric records up to it), or start clean."""
    from jaxrlhf.train.checkpoint import latest_step

    done = None if latest_step(checkpoints) is None else trainer.restore(checkpoints)
    if done is not None:
        print(f"resumed from {checkpoints} at iteration {done}", file=sys.stderr)
    _trim_metrics(metrics_path, done)  # keep the records of the iterations already done


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
    model_dir = _model_dir(args.model)
    tokenizer = _load_tokenizer(model_dir)
    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += _read_prompts_file(args.prompts_file)
    if not prompts:
        raise SystemExit("error: give at least one --prompt or a --prompts-file")
    batch = tokenize_prompts({"prompt": prompts}, tokenizer, _get(args, DataConfig))
    width = batch.input_ids.shape[1]
    _check_positions(
        model_dir,
        width + sampling.max_new_tokens,
        what=f"prompts padded to {width} tokens (the longest has {_longest(batch.attention_mask)})"
        f" + --max-new-tokens {sampling.max_new_tokens}",
        fixes="lower --max-new-tokens, or --data-max-prompt-length (with --data-truncate)",
    )
    model = from_pretrained(model_dir)
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


def _read_prompts_file(path: str) -> list[str]:
    """The non-blank lines of a UTF-8 text file (errors name the file and the line)."""
    from jaxrlhf.data.sources import check_utf8

    if not os.path.isfile(path):
        raise ValueError(f"--prompts-file {path}: no such file")
    check_utf8(path)
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def _check_out_path(args) -> None:
    """An output directory that exists as a file is refused before anything is read or written."""
    for dest in ("out", "out_dir"):
        out = getattr(args, dest, None)
        if out is not None and os.path.exists(out) and not os.path.isdir(out):
            flag = "--" + dest.replace("_", "-")
            raise ValueError(f"{flag} {out}: exists and is not a directory (give a directory)")


# ---------------------------------------------------------------------------------- parser

DATA_HELP = "a json/jsonl/parquet/csv file, a dataset directory or a Hub dataset name"
MODEL_HELP = "a Hugging Face checkpoint directory or a Hub model id"


def build_parser() -> argparse.ArgumentParser:
    """The ``jaxrlhf`` parser: one subcommand per job, each with the flags of its configs."""
    from jaxrlhf.cli_algorithms import add_commands
    from jaxrlhf.cli_collect import add_collect_parser

    parser = argparse.ArgumentParser(prog="jaxrlhf", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _demo_parser(sub)
    _training_parsers(sub)
    _generate_parser(sub)
    add_commands(sub, _add, _add_distributed, DATA_HELP, MODEL_HELP)
    add_collect_parser(sub, _add, DATA_HELP, MODEL_HELP)
    for command in sub.choices.values():  # every command, whichever module defined it
        command.add_argument(
            "--compile-cache",
            action=argparse.BooleanOptionalAction,
            default=True,
            help="keep compiled XLA programs in $JAXRLHF_CACHE/xla (default ~/.cache/jaxrlhf/xla) "
            "so that the next run compiles nothing (JAXRLHF_COMPILE_CACHE=0 also turns it off)",
        )
    return parser


def _common(parser, *, resume: bool = False) -> None:
    if resume:
        parser.add_argument(
            "--resume",
            action=argparse.BooleanOptionalAction,
            default=True,
            help="continue from the latest checkpoint in OUT/checkpoints (--no-resume refuses to "
            "start over an earlier run's checkpoints)",
        )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _demo_parser(sub) -> None:
    from jaxrlhf.demo import DEMO_PPO, DEMO_REWARD, DEMO_SFT, DemoConfig
    from jaxrlhf.demo_algorithms import DEMO_DPO, DEMO_GRPO
    from jaxrlhf.train.dpo import DPOConfig
    from jaxrlhf.train.grpo_config import GRPOConfig
    from jaxrlhf.train.ppo import PPOConfig
    from jaxrlhf.train.reward import RewardConfig
    from jaxrlhf.train.sft import SFTConfig

    demo = sub.add_parser("demo", help="the offline demo: SFT → reward model → PPO, with a report")
    _common(demo)
    for cls, preset in ((DemoConfig, None), (SFTConfig, DEMO_SFT), (RewardConfig, DEMO_REWARD),
                        (PPOConfig, DEMO_PPO), (GRPOConfig, DEMO_GRPO), (DPOConfig, DEMO_DPO)):  # fmt: skip
        _add(demo, cls, preset)
    _add_distributed(demo)
    demo.set_defaults(run=cmd_demo)


def _training_parsers(sub) -> None:
    from jaxrlhf.cli_train import cmd_sft, cmd_train_rm
    from jaxrlhf.data.preference import DataConfig
    from jaxrlhf.train.ppo import PPOConfig
    from jaxrlhf.train.reward import RewardConfig
    from jaxrlhf.train.sft import SFT_DEFAULTS, SFTConfig

    sft = sub.add_parser("sft", help="supervised fine-tuning on text, prompt/completion or chats")
    sft.add_argument(
        "--data", required=True, help=DATA_HELP + " (text, prompt/completion or messages)"
    )
    sft.add_argument("--model", required=True, help=MODEL_HELP + " of the base LM")
    sft.add_argument("--out", required=True, help="output directory (metrics, checkpoints, policy)")
    _common(sft, resume=True)
    _add(sft, SFTConfig, SFT_DEFAULTS)

    rm = sub.add_parser("train-rm", help="train a reward model on preference pairs")
    rm.add_argument("--data", required=True, help=DATA_HELP + " (preference pairs)")
    rm.add_argument("--model", required=True, help=MODEL_HELP + " of the base LM")
    rm.add_argument("--out", required=True, help="output directory")
    rm.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=True,
                    help="normalise scores to mean 0, std 1 over the base LM's samples")  # fmt: skip
    _common(rm)
    _add(rm, RewardConfig)

    ppo = sub.add_parser("ppo", help="PPO of a policy against a reward model")
    ppo.add_argument("--prompts", required=True,
                     help=DATA_HELP + " (a prompt column, or preference pairs with implicit prompts)")  # fmt: skip
    ppo.add_argument("--policy", required=True, help=MODEL_HELP + " of the SFT policy")
    ppo.add_argument(
        "--reward-model", required=True, help="directory written by train-rm (or a Hub model id)"
    )
    ppo.add_argument("--out", required=True, help="output directory (metrics, checkpoints, policy)")
    _common(ppo, resume=True)
    _add(ppo, PPOConfig)
    for parser, run in ((sft, cmd_sft), (rm, cmd_train_rm), (ppo, cmd_ppo)):
        _add(parser, DataConfig)
        _add_distributed(parser)
        parser.set_defaults(run=run)


def _generate_parser(sub) -> None:
    from jaxrlhf.data.preference import DataConfig
    from jaxrlhf.rollout import SamplingConfig

    gen = sub.add_parser("generate", help="sample completions from a model")
    gen.add_argument("--model", required=True, help=MODEL_HELP)
    gen.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    gen.add_argument("--prompts-file", help="a text file, one prompt per line")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    _add(gen, SamplingConfig)
    _add(gen, DataConfig)
    gen.set_defaults(run=cmd_generate)


def _add_distributed(parser) -> None:
    """The multi-process flags of every training command (``train.distributed.initialize``)."""
    group = parser.add_argument_group(
        "multi-process (jax.distributed; run the same command in every process)"
    )
    group.add_argument("--coordinator-address", help="HOST:PORT of process 0 (with the next two)")
    group.add_argument("--num-processes", type=int, help="how many processes take part")
    group.add_argument("--process-id", type=int, help="this process's index, 0 … N−1")
    group.add_argument(
        "--distributed",
        action="store_true",
        help="start jax.distributed and let JAX detect the rest (Cloud TPU VMs, SLURM)",
    )


def main(argv: list[str] | None = None) -> int:
    # transformers' "PyTorch was not found" advice: torch is a test extra, never needed to run.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.compile_cache:  # before the first jitted call
        from jaxrlhf.compile_cache import enable_compile_cache

        enable_compile_cache()
    if getattr(args, "quiet", False):
        import datasets

        datasets.disable_progress_bars()
    try:
        _check_out_path(args)
        if hasattr(args, "process_id"):  # before anything touches a device
            from jaxrlhf.train.distributed import initialize

            initialize(
                args.coordinator_address, args.num_processes, args.process_id, auto=args.distributed
            )
        return args.run(args)
    # Config validation, data and checkpoint errors (ValueError: DataError, CheckpointError,
    # HubError) name the field / row / file; a missing file is named by its FileNotFoundError.
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
