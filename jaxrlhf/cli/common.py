"""What every ``jaxrlhf`` command shares: config flags in and out, the common flags, the checks made
before any training (positions, a fresh run), resuming, and the lines said to the user.

Lines for the user go to stderr (:func:`note`), so that stdout holds the command's JSON summary alone;
every command's last stderr line names what it wrote (:func:`wrote`).
"""

from __future__ import annotations

import argparse
import json
import os

from jaxrlhf.cli.flags import add_config_arguments, config_from_args
from jaxrlhf.logging import note

# Groups of flags: config class name → prefix of its flags.
PREFIXES = {
    "SFTConfig": "sft-",
    "RewardConfig": "rm-",
    "PPOConfig": "ppo-",
    "DataConfig": "data-",
    "GRPOConfig": "grpo-",
    "DPOConfig": "dpo-",
    "CollectConfig": "collect-",
    "ToolConfig": "tool-",
}

DATA_HELP = "a json/jsonl/parquet/csv file, a dataset directory or a Hub dataset name"
MODEL_HELP = "a Hugging Face checkpoint directory or a Hub model id"
TB_HELP = "metrics go to OUT/metrics.jsonl and are mirrored to TensorBoard in OUT/tb"


def add_config(parser, cls, defaults=None) -> None:
    """One flag per field of config class ``cls`` (prefixed, see ``PREFIXES``)."""
    add_config_arguments(parser, cls, prefix=PREFIXES.get(cls.__name__, ""), defaults=defaults)


def get_config(args, cls):
    """The config ``cls`` built from the parsed flags; invalid values are one ``ValueError`` that
    names every offending flag."""
    return config_from_args(cls, args, prefix=PREFIXES.get(cls.__name__, ""))


def save_policy(model, out: str, *, tokenizer, base: str | None = None) -> dict[str, str]:
    """Write the trained policy: ``OUT/policy`` (a Hugging Face model; a LoRA model merged,
    W + (α / r) · B A) and, with adapters, ``OUT/policy_adapter`` (PEFT's directory, for
    ``peft.PeftModel.from_pretrained(base, …)``, ``base`` recorded as its base model). Returns
    {"policy": dir[, "policy_adapter": dir]} for :func:`wrote`."""
    from jaxrlhf.models.hf import save_pretrained
    from jaxrlhf.models.lora import has_lora
    from jaxrlhf.models.peft_adapter import save_adapter

    written = {"policy": os.path.join(out, "policy")}
    save_pretrained(model, written["policy"], tokenizer=tokenizer)
    if has_lora(model):
        written["policy_adapter"] = os.path.join(out, "policy_adapter")
        save_adapter(model, written["policy_adapter"], base_model=base)
    return written


def add_common(parser, *, resume: bool = False) -> None:
    """``--quiet`` (and ``--resume`` for the commands that checkpoint)."""
    if resume:
        parser.add_argument(
            "--resume",
            action=argparse.BooleanOptionalAction,
            default=True,
            help="continue from the latest checkpoint in OUT/checkpoints (--no-resume refuses to "
            "start over an earlier run's checkpoints)",
        )
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def add_distributed(parser) -> None:
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


def wrote(out: str, **paths: str) -> None:
    """The command's last line: where its results are (``name=path`` pairs under ``out``)."""
    listed = ", ".join(f"{name} {path}" for name, path in paths.items())
    note(f"wrote {out}: {listed}")


def print_summary(summary: dict) -> None:
    """The command's JSON summary on stdout."""
    print(json.dumps(summary, indent=2), flush=True)


def model_dir(name: str, what: str = "model") -> str:
    """The local checkpoint directory of a directory or a Hub model id."""
    from jaxrlhf.hub import resolve_model

    return resolve_model(name, what=what)


def longest(mask) -> int:
    """The longest row of a [B, T] mask."""
    return int(mask.sum(axis=1).max())


def check_positions(model_dir: str, length: int, *, what: str, fixes: str) -> None:
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


def check_prompts_fit(model_dirs, prompts, max_new_tokens: int, flag: str) -> None:
    """Prompts (padded) + ``max_new_tokens`` (set by ``flag``) fit every model of ``model_dirs``."""
    width = prompts.input_ids.shape[1]
    for directory in model_dirs:
        check_positions(
            directory,
            width + max_new_tokens,
            what=f"prompts padded to {width} tokens (the longest has "
            f"{longest(prompts.attention_mask)}) + {flag} {max_new_tokens}",
            fixes=f"lower {flag}, or --data-max-prompt-length (with --data-truncate for longer "
            "prompts)",
        )


def add_reward_flags(parser) -> None:
    """--reward-model DIR or --reward-fn module:function[:weight] (repeatable): what scores responses."""
    parser.add_argument("--reward-model", help="directory written by train-rm")
    parser.add_argument(
        "--reward-fn",
        action="append",
        default=[],
        help="module:function[:weight] with fn(prompts, completions) -> list[float] (repeatable; "
        "the rewards are summed with their weights), e.g. "
        "jaxrlhf.tasks.arithmetic:correctness_reward",
    )


def check_reward_flags(args, *, required: bool) -> None:
    """Not both --reward-model and --reward-fn; with ``required``, one of them."""
    if (args.reward_model and args.reward_fn) or (
        required and not (args.reward_model or args.reward_fn)
    ):
        raise SystemExit("error: give --reward-model or --reward-fn (one or more), not both")


def add_tool_flags(parser) -> None:
    """--tool module:function (repeatable) and ToolConfig's --tool-* / --max-turns."""
    from jaxrlhf.tools import ToolConfig

    parser.add_argument(
        "--tool",
        action="append",
        default=[],
        help="module:function with fn(call_text) -> str, a tool the policy may call mid-episode "
        "(repeatable), e.g. jaxrlhf.tools:calculator; see --tool-* and --max-turns",
    )
    add_config(parser, ToolConfig)


def toolbox_from_args(args):
    """The --tool functions with the --tool-* settings (None without --tool)."""
    from jaxrlhf.tools import Toolbox, ToolConfig, load_tool

    if not args.tool:
        return None
    try:
        return Toolbox([load_tool(spec) for spec in args.tool], get_config(args, ToolConfig))
    except (TypeError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None


def sampler_for(toolbox, tokenizer):
    """``rollout.sample``, or episodes in turns with the tools (``tools.sample_turns``)."""
    import functools

    from jaxrlhf.rollout import sample
    from jaxrlhf.tools import sample_turns

    if toolbox is None:
        return sample
    return functools.partial(sample_turns, toolbox=toolbox, tokenizer=tokenizer)


def load_prompts(source: str, tokenizer, data_config, toolbox=None):
    """The prompts of ``source`` (any supported format), tokenised; with a toolbox, a chat template
    that lists tools is shown theirs."""
    from jaxrlhf.data.formats import load_prompt_dataset
    from jaxrlhf.data.preference import tokenize_prompts

    rows = load_prompt_dataset(source, data_config, report=note, tokenizer=tokenizer)
    tools = None
    if toolbox is not None:  # a chat template that lists tools shows them to the model
        from jaxrlhf.tools import tool_schema

        tools = [tool_schema(fn) for fn in toolbox.tools.values()]
    return tokenize_prompts(rows, tokenizer, data_config, source=source, tools=tools)


def check_out_path(args) -> None:
    """An output directory that exists as a file is refused before anything is read or written."""
    for dest in ("out", "out_dir"):
        out = getattr(args, dest, None)
        if out is not None and os.path.exists(out) and not os.path.isdir(out):
            flag = "--" + dest.replace("_", "-")
            raise ValueError(f"{flag} {out}: exists and is not a directory (give a directory)")


def check_fresh_run(resume: bool, checkpoints: str, flag: str) -> None:
    """With --no-resume, refuse to start over a directory that holds another run's checkpoints."""
    from jaxrlhf.train.checkpoint import all_steps

    steps = all_steps(checkpoints)
    if not resume and steps:
        raise SystemExit(
            f"error: --no-resume, but {checkpoints} holds the checkpoints of an earlier run "
            f"(iterations {', '.join(map(str, steps))}); resume it (drop --no-resume), or choose "
            f"another --out or {flag} (nothing was deleted)"
        )


def resume(trainer, checkpoints: str, metrics_path: str) -> None:
    """Continue from the latest checkpoint (keeping the metric records up to it), or start clean."""
    from jaxrlhf.train.checkpoint import latest_step

    done = None if latest_step(checkpoints) is None else trainer.restore(checkpoints)
    if done is not None:
        note(f"resumed from {checkpoints} at iteration {done}")
    trim_metrics(metrics_path, done)  # keep the records of the iterations already done


def trim_metrics(metrics_path: str, done: int | None) -> None:
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


def add_sample_flags(parser) -> None:
    """``--log-samples-every`` of the RL commands (ppo, grpo)."""
    parser.add_argument(
        "--log-samples-every",
        type=int,
        default=10,
        metavar="N",
        help="every N iterations (and after the last) print a table of completions of the first "
        "--log-samples prompts by the current policy with their rewards; also in report.md "
        "(0: never; default: 10)",
    )
    parser.add_argument(
        "--log-samples", type=int, default=4, help="prompts in that table (default: 4)"
    )


class SampleLog:
    """Completions of the same few prompts by the current policy, with their rewards, every
    ``every`` iterations: a table in the log (stderr) and in the report (:meth:`markdown`).

    Called as ``log(iteration)`` after an iteration of ``trainer`` (a PPOTrainer or GRPOTrainer:
    its ``actor()``, ``reward_fn``, ``config.sampling`` and token ids). Every process samples
    (the policy may be sharded over all of them); process 0 prints.
    """

    def __init__(self, trainer, tokenizer, *, every: int, num_prompts: int, total: int):
        if every < 0 or num_prompts < 1:
            raise ValueError(
                f"--log-samples-every {every} / --log-samples {num_prompts}: must be ≥ 0 / ≥ 1"
            )
        self.trainer, self.tokenizer, self.every, self.total = trainer, tokenizer, every, total
        n = min(num_prompts, len(trainer.prompt_ids))
        self.prompt_ids, self.prompt_mask = trainer.prompt_ids[:n], trainer.prompt_mask[:n]
        self.tables: list[tuple[int, list[dict]]] = []

    def __call__(self, iteration: int) -> None:
        if not self.every or (iteration % self.every and iteration != self.total):
            return
        rows = self.rows(iteration)
        self.tables.append((iteration, rows))
        note(f"samples at iteration {iteration}:\n" + self._table(rows))

    def rows(self, iteration: int) -> list[dict]:
        """One completion per prompt (the training sampler, a fixed key per iteration), scored."""
        import jax
        import numpy as np

        from jaxrlhf.rollout import sample

        t = self.trainer
        rollout = getattr(t, "sampler", sample)(
            t.actor(), self.prompt_ids, self.prompt_mask, t.config.sampling,
            jax.random.PRNGKey(iteration), eos_token_id=t.eos_token_id,
            pad_token_id=t.pad_token_id,
        )  # fmt: skip
        scores = np.asarray(t.reward_fn(self.prompt_ids, self.prompt_mask, rollout))  # [n]
        decode = self._decode
        return [
            {"prompt": decode(p, pm), "completion": decode(r, rm), "reward": float(s)}
            for p, pm, r, rm, s in zip(
                np.asarray(self.prompt_ids),
                np.asarray(self.prompt_mask),
                np.asarray(rollout.tokens),
                np.asarray(rollout.attention_mask),  # a tool's answers are shown too
                scores,
            )
        ]

    def _decode(self, ids, mask) -> str:
        kept = [int(t) for t, m in zip(ids, mask) if m]
        return self.tokenizer.decode(kept, skip_special_tokens=True)

    @staticmethod
    def _table(rows: list[dict]) -> str:
        from jaxrlhf.report import markdown_table

        return markdown_table(rows, ["prompt", "completion", "reward"])

    def markdown(self) -> str:
        """Every table so far, for report.md ("" when none was made)."""
        parts = [f"**iteration {it}**\n\n{self._table(rows)}" for it, rows in self.tables]
        return "\n\n".join(parts)
