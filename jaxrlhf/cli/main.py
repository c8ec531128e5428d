"""The ``jaxrlhf`` command: the parser, the dispatch, and the ``demo``, ``ppo`` and ``generate``
commands (``sft`` and ``train-rm``: :mod:`jaxrlhf.cli.train`; ``grpo`` and ``dpo``:
:mod:`jaxrlhf.cli.algorithms`; ``collect``: :mod:`jaxrlhf.cli.collect`).

Every hyperparameter flag comes from a config dataclass (``--sft-*``, ``--rm-*``, ``--ppo-*``,
``--grpo-*``, ``--dpo-*``, ``--data-*``, ``--collect-*``; the demo's own are unprefixed), so its help
text and default live in one place (:mod:`jaxrlhf.cli.flags`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys

from jaxrlhf.cli.algorithms import add_algorithm_parsers
from jaxrlhf.cli.collect import add_collect_parser
from jaxrlhf.cli.common import (
    DATA_HELP,
    MODEL_HELP,
    PREFIXES,
    TB_HELP,
    SampleLog,
    add_common,
    add_config,
    add_distributed,
    add_reward_flags,
    add_sample_flags,
    add_tool_flags,
    check_fresh_run,
    check_out_path,
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
from jaxrlhf.cli.flags import flag_name
from jaxrlhf.cli.train import add_training_parsers

DESCRIPTION = """RLHF with PPO in JAX: the offline demo, the trainers of the RLHF pipeline (SFT, reward
model, PPO; GRPO and its family; DPO), sampling, and labelling preference pairs.

The pipeline, each step's output the next one's input:
  jaxrlhf sft      --data FILE --model BASE --out sft       → sft/policy
  jaxrlhf train-rm --data PREFS --model sft/policy --out rm → rm/reward_model
  jaxrlhf ppo      --prompts FILE --policy sft/policy --reward-model rm/reward_model --out ppo
  jaxrlhf generate --model ppo/policy --prompt "..." [--best-of N --reward-model rm/reward_model]

Data: a json/jsonl/parquet/csv file, a dataset directory or a Hub dataset name. Models: a Hugging
Face checkpoint directory or a Hub model id. Each command writes metrics (OUT/metrics.jsonl,
mirrored to TensorBoard in OUT/tb), a report (OUT/report.md) and its models under OUT, prints a JSON
summary on stdout and, last, one line on stderr naming what it wrote.
"""


# ------------------------------------------------------------------------------------- demo


def cmd_demo(args) -> int:
    from jaxrlhf.demo import DemoConfig, run_demo
    from jaxrlhf.train.dpo import DPOConfig
    from jaxrlhf.train.grpo_config import GRPOConfig
    from jaxrlhf.train.ppo import PPOConfig
    from jaxrlhf.train.reward import RewardConfig
    from jaxrlhf.train.sft import SFTConfig

    demo = get_config(args, DemoConfig)
    configs = [get_config(args, cls) for cls in (SFTConfig, RewardConfig, PPOConfig)]
    grpo, dpo = get_config(args, GRPOConfig), get_config(args, DPOConfig)
    summary = run_demo(demo, *configs, grpo=grpo, dpo=dpo, progress=not args.quiet, echo=note)
    print_summary(summary)
    outputs = {"report": os.path.join(demo.out_dir, "report.md")}
    if demo.save_models and demo.algo == "ppo":
        outputs["policy"] = os.path.join(demo.out_dir, "policy")
        outputs["reward model"] = os.path.join(demo.out_dir, "reward_model")
    wrote(demo.out_dir, **outputs, metrics=os.path.join(demo.out_dir, "metrics_*.jsonl"))
    return 0


# --------------------------------------------------------------------------------------- ppo


def cmd_ppo(args) -> int:
    from jaxrlhf.data.preference import DataConfig
    from jaxrlhf.logging import MetricsLogger
    from jaxrlhf.models.hf import from_pretrained
    from jaxrlhf.train.distributed import is_main
    from jaxrlhf.train.ppo import PPOConfig, PPOTrainer

    config, data_config = get_config(args, PPOConfig), get_config(args, DataConfig)
    checkpoints = config.checkpoint_dir or os.path.join(args.out, "checkpoints")
    config = dataclasses.replace(config, checkpoint_dir=checkpoints)
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    check_fresh_run(args.resume, checkpoints, flag="--ppo-checkpoint-dir")
    toolbox = toolbox_from_args(args)
    policy, reward_model, tokenizer, prompts = _ppo_inputs(args, config, data_config, toolbox)
    reward_model = from_pretrained(reward_model, head="reward")  # refuses an LM without a head
    trainer = PPOTrainer.from_sft(
        config, from_pretrained(policy), prompts.input_ids, prompts.attention_mask,
        reward_model=reward_model, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, sampler=sampler_for(toolbox, tokenizer),
    )  # fmt: skip
    resume(trainer, checkpoints, metrics_path)
    samples = SampleLog(trainer, tokenizer, every=args.log_samples_every,
                        num_prompts=args.log_samples, total=config.num_iterations)  # fmt: skip

    def callback(iteration: int, metrics: dict) -> None:
        log.log(iteration, metrics)
        samples(iteration)

    # Every process runs all of this; metrics, report and policy are written by process 0 only.
    with MetricsLogger(metrics_path, tensorboard_dir=os.path.join(args.out, "tb")) as log:
        trainer.train(callback=callback, progress=not args.quiet and is_main())
    written = save_policy(trainer.actor(), args.out, tokenizer=tokenizer, base=policy)
    if is_main():
        _ppo_report(args.out, metrics_path, samples)
    wrote(args.out, **written, report=os.path.join(args.out, "report.md"),
          metrics=metrics_path)  # fmt: skip
    return 0


def _ppo_inputs(args, config, data_config, toolbox=None):
    """(policy directory, reward-model directory, tokenizer, prompts): Hub ids resolved, the
    prompts loaded in any supported format and tokenised, and prompt + response checked to fit
    both models."""
    from jaxrlhf.models.tokenizer import load_tokenizer

    policy = model_dir(args.policy, "policy")
    reward_model = model_dir(args.reward_model, "reward model")
    tokenizer = load_tokenizer(policy)
    prompts = load_prompts(args.prompts, tokenizer, data_config, toolbox)
    check_prompts_fit(
        (policy, reward_model), prompts, config.max_new_tokens, "--ppo-max-new-tokens"
    )
    return policy, reward_model, tokenizer, prompts


def _ppo_report(out: str, metrics_path: str, samples: SampleLog) -> None:
    from jaxrlhf.logging import read_metrics
    from jaxrlhf.report import plot_curves, write_report

    records = read_metrics(metrics_path)
    plots = plot_curves({"ppo": records}, os.path.join(out, "plots"))
    last = records[-1]
    keys = ("objective/scores", "objective/kl", "objective/entropy", "loss/value_avg")
    sections = [("Last iteration", "\n".join(f"- `{k}`: {last.get(k)}" for k in keys))]
    if samples.markdown():
        sections.append(("Samples", samples.markdown()))
    write_report(os.path.join(out, "report.md"), title="jaxrlhf ppo", sections=sections,
                 plots=plots)  # fmt: skip
    print_summary({k: last.get(k) for k in ("step", *keys)})


# ---------------------------------------------------------------------------------- generate


def cmd_generate(args) -> int:
    import jax

    from jaxrlhf.data.preference import DataConfig, tokenize_prompts
    from jaxrlhf.models.hf import from_pretrained
    from jaxrlhf.models.tokenizer import load_tokenizer
    from jaxrlhf.rollout import SamplingConfig

    sampling = get_config(args, SamplingConfig)
    out = _check_generate_flags(args)
    directory = model_dir(args.model)
    tokenizer = load_tokenizer(directory)
    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += _read_prompts_file(args.prompts_file)
    if not prompts:
        raise SystemExit("error: give at least one --prompt or a --prompts-file")
    batch = tokenize_prompts({"prompt": prompts}, tokenizer, get_config(args, DataConfig))
    reward_fn, scorer = _generate_reward(args, tokenizer)
    check_prompts_fit([directory, *scorer], batch, sampling.max_new_tokens, "--max-new-tokens")
    result = _best_of(
        from_pretrained(directory), batch, reward_fn, args.best_of, sampling,
        jax.random.PRNGKey(args.seed), tokenizer,
    )  # fmt: skip
    rows = [{"prompt": prompt, **row} for prompt, row in zip(prompts, result)]
    if out is None:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False), flush=True)  # one per line
        return 0
    from jaxrlhf.collect.store import rewrite_jsonl

    rewrite_jsonl(out, rows)  # atomically: a temp file, then one rename
    wrote(out, rows=f"{len(rows)} JSON lines")
    return 0


def _check_generate_flags(args) -> str | None:
    """--best-of and the reward flags agree, and --out names a file whose directory exists."""
    if args.best_of < 1:
        raise SystemExit(f"error: --best-of {args.best_of}: must be ≥ 1")
    check_reward_flags(args, required=False)
    if args.best_of > 1 and not (args.reward_model or args.reward_fn):
        raise SystemExit(
            f"error: --best-of {args.best_of} keeps the best-scored candidate: give "
            "--reward-model DIR or --reward-fn module:function"
        )
    out = args.out_file
    if out is not None:
        if os.path.isdir(out):
            raise SystemExit(f"error: --out {out}: is a directory (give a file name)")
        parent = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(parent):
            raise SystemExit(f"error: --out {out}: the directory {parent} does not exist")
    return out


def _generate_reward(args, tokenizer):
    """(reward_fn or None, the reward model's directory as a list for the fit check)."""
    from jaxrlhf.cli.algorithms import load_reward_functions
    from jaxrlhf.models.hf import from_pretrained
    from jaxrlhf.train.experience import reward_model_fn
    from jaxrlhf.train.grpo import text_reward_fn

    if args.reward_fn:
        functions, weights = load_reward_functions(args.reward_fn)
        return text_reward_fn(functions, tokenizer, weights=weights), []
    if not args.reward_model:
        return None, []
    directory = model_dir(args.reward_model, "reward model")
    return reward_model_fn(from_pretrained(directory, head="reward")), [directory]


def _best_of(model, batch, reward_fn, n, sampling, rng, tokenizer) -> list[dict]:
    """One row per prompt: its completion, and with a reward its score and all n candidates."""
    from jaxrlhf.best_of import best_of_n
    from jaxrlhf.data.task import decode_rows
    from jaxrlhf.rollout import sample

    ids = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    if reward_fn is None:
        rollout = sample(model, batch.input_ids, batch.attention_mask, sampling, rng, **ids)
        texts = decode_rows(tokenizer, rollout.tokens, rollout.attention_mask)
        return [{"completion": text} for text in texts]
    result = best_of_n(model, batch.input_ids, batch.attention_mask, reward_fn, n=n,
                       config=sampling, rng=rng, **ids)  # fmt: skip
    texts = decode_rows(tokenizer, result.candidates.tokens, result.candidates.attention_mask)
    scores = result.scores.tolist()
    rows = []
    for i, best in enumerate(result.best.tolist()):
        candidates = [{"completion": texts[i * n + j], "score": scores[i][j]} for j in range(n)]
        rows.append({**candidates[best], "candidates": candidates})
    return rows


def _read_prompts_file(path: str) -> list[str]:
    """The non-blank lines of a UTF-8 text file (errors name the file and the line)."""
    from jaxrlhf.data.sources import check_utf8

    if not os.path.isfile(path):
        raise ValueError(f"--prompts-file {path}: no such file")
    check_utf8(path)
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


# ---------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    """The ``jaxrlhf`` parser: one subcommand per job, each with the flags of its configs."""
    parser = argparse.ArgumentParser(
        prog="jaxrlhf", description=DESCRIPTION, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _demo_parser(sub)
    add_training_parsers(sub)
    _ppo_parser(sub)
    add_algorithm_parsers(sub)
    _generate_parser(sub)
    add_collect_parser(sub)
    for command in sub.choices.values():  # every command, whichever module defined it
        command.add_argument(
            "--compile-cache",
            action=argparse.BooleanOptionalAction,
            default=True,
            help="keep compiled XLA programs in $JAXRLHF_CACHE/xla (default ~/.cache/jaxrlhf/xla) "
            "so that the next run compiles nothing (JAXRLHF_COMPILE_CACHE=0 also turns it off)",
        )
        command.set_defaults(flags=frozenset(command._option_string_actions))
    return parser


def _demo_parser(sub) -> None:
    from jaxrlhf.demo import DEMO_DPO, DEMO_GRPO, DEMO_PPO, DEMO_REWARD, DEMO_SFT, DemoConfig
    from jaxrlhf.train.dpo import DPOConfig
    from jaxrlhf.train.grpo_config import GRPOConfig
    from jaxrlhf.train.ppo import PPOConfig
    from jaxrlhf.train.reward import RewardConfig
    from jaxrlhf.train.sft import SFTConfig

    demo = sub.add_parser(
        "demo",
        help="the offline demo: SFT → reward model → PPO on a built-in task, with a report",
        description="The offline demo: SFT → reward model → PPO (with and without the KL penalty) "
        "on a built-in review task, or --algo dpo, or --task arithmetic --algo grpo|dr_grpo|rloo. "
        "Its SFT, reward-model and PPO flags start from the demo's own presets (tiny models: "
        "larger learning rates than the trainers' defaults).",
    )
    add_common(demo)
    for cls, preset in ((DemoConfig, None), (SFTConfig, DEMO_SFT), (RewardConfig, DEMO_REWARD),
                        (PPOConfig, DEMO_PPO), (GRPOConfig, DEMO_GRPO), (DPOConfig, DEMO_DPO)):  # fmt: skip
        add_config(demo, cls, preset)
    add_distributed(demo)
    demo.set_defaults(run=cmd_demo)


def _ppo_parser(sub) -> None:
    from jaxrlhf.data.preference import DataConfig
    from jaxrlhf.train.ppo import PPOConfig

    ppo = sub.add_parser(
        "ppo", help="PPO of a policy against a reward model", description=f"PPO; {TB_HELP}."
    )
    ppo.add_argument("--prompts", required=True,
                     help=DATA_HELP + " (a prompt column, or preference pairs with implicit prompts)")  # fmt: skip
    ppo.add_argument("--policy", required=True, help=MODEL_HELP + " of the SFT policy")
    ppo.add_argument(
        "--reward-model", required=True, help="directory written by train-rm (or a Hub model id)"
    )
    ppo.add_argument("--out", required=True, help="output directory (metrics, checkpoints, policy)")
    add_common(ppo, resume=True)
    add_sample_flags(ppo)
    add_config(ppo, PPOConfig)
    add_tool_flags(ppo)
    add_config(ppo, DataConfig)
    add_distributed(ppo)
    ppo.set_defaults(run=cmd_ppo)


def _generate_parser(sub) -> None:
    from jaxrlhf.data.preference import DataConfig
    from jaxrlhf.rollout import SamplingConfig

    gen = sub.add_parser(
        "generate",
        help="sample completions from a model (JSON lines); --best-of N keeps the best-scored",
        description="Sample a completion of each prompt. With --best-of N and a reward "
        "(--reward-model or --reward-fn), N candidates per prompt are drawn in one batched "
        "rollout, scored in one pass, and the best kept: each line is {prompt, completion, score, "
        "candidates: [{completion, score}, …]}. The best-of-N policy's KL to the model is at most "
        "log N − (N−1)/N.",
    )
    gen.add_argument("--model", required=True, help=MODEL_HELP)
    gen.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    gen.add_argument("--prompts-file", help="a text file, one prompt per line")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    gen.add_argument("--best-of", type=int, default=1, metavar="N",
                     help="candidates per prompt; the best-scored is kept (default: 1)")  # fmt: skip
    add_reward_flags(gen)  # what scores the candidates
    gen.add_argument("--out", dest="out_file", metavar="FILE",
                     help="write the JSON lines to FILE, atomically (default: stdout)")  # fmt: skip
    add_config(gen, SamplingConfig)
    add_config(gen, DataConfig)
    gen.set_defaults(run=cmd_generate)


# ------------------------------------------------------------------------------------ main

_CONFIG_FIELD = re.compile(r"\b([A-Z]\w*Config)\.(\w+)( = )?")


def with_flags(message: str, flags: frozenset[str]) -> str:
    """``message`` with each ``<Config>.<field> = `` the command has a flag for written as that
    flag ("SFTConfig.batch_size = 64: …" → "--sft-batch-size 64: …")."""

    def flag(match: re.Match) -> str:
        cls, field, equals = match.groups()
        name = flag_name(field, PREFIXES.get(cls, ""))
        if name not in flags:
            return match.group(0)
        return name + (" " if equals else "")

    return _CONFIG_FIELD.sub(flag, message)


def main(argv: list[str] | None = None) -> int:
    # transformers' "PyTorch was not found" advice: torch is a test extra, never needed to run.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    args = build_parser().parse_args(argv)
    if args.compile_cache:  # before the first jitted call
        from jaxrlhf.compile_cache import enable_compile_cache

        enable_compile_cache()
    if getattr(args, "quiet", False):
        import datasets

        datasets.disable_progress_bars()
    try:
        check_out_path(args)
        if hasattr(args, "process_id"):  # before anything touches a device
            from jaxrlhf.train.distributed import initialize

            initialize(
                args.coordinator_address, args.num_processes, args.process_id, auto=args.distributed
            )
        return args.run(args)
    # Config validation, data and checkpoint errors (ValueError: ConfigError, DataError,
    # CheckpointError, HubError) name the flag / row / file; a missing file is named by its
    # FileNotFoundError.
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {with_flags(str(err), args.flags)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
