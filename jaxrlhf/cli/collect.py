"""The ``jaxrlhf collect`` command: InstructGPT's labelling step (Ouyang et al. 2022), by a person in
a local web page or by a labeler without one (a Python rule, a reward model).

    jaxrlhf collect --policy DIR --prompts FILE --out prefs.jsonl            # a person labels
    jaxrlhf collect ... --labeler rule:jaxrlhf.collect.labelers:demo_annotator
    jaxrlhf collect ... --labeler reward-model:rm/reward_model               # AI feedback

The first run samples ``--collect-num-samples`` responses per prompt at ``--collect-temperature``
and writes the candidate pairs to ``OUT.candidates.jsonl``; every run (the same flags) then continues
with the pairs not labelled yet, on the same page address (the port is fixed by OUT, so an open tab
keeps working across restarts). ``OUT`` is what ``train-rm --data`` reads; ties and skips go to
``OUT.skipped.jsonl`` (see :mod:`jaxrlhf.collect.store`).
"""

from __future__ import annotations

import argparse
import os
import sys
import zlib

from jaxrlhf.cli.common import (
    DATA_HELP,
    MODEL_HELP,
    add_config,
    check_prompts_fit,
    get_config,
    model_dir,
    note,
    print_summary,
    wrote,
)

PORTS = (20000, 30000)  # the default page port is in this range, fixed by the OUT file


def default_port(out_file: str) -> int:
    """The page's port for ``out_file``: the same on every run of the same command (an open tab
    survives a restart), different for another OUT (two collections side by side)."""
    low, high = PORTS
    return low + zlib.crc32(os.path.abspath(out_file).encode()) % (high - low)


def _sampling_record(args, config) -> dict:
    """How the candidates are sampled (stored with them; a restart must match)."""

    def where(name: str) -> str:
        return os.path.abspath(name) if os.path.exists(name) else name

    return {
        "policy": where(args.policy),
        "prompts": where(args.prompts),
        "num_samples": config.num_samples,
        "temperature": config.temperature,
        "max_new_tokens": config.max_new_tokens,
        "seed": config.seed,
    }


def _sample(args, config, data_config, sampling: dict) -> None:
    """Sample the candidate pairs of a new OUT and write OUT.candidates.jsonl."""
    from jaxrlhf.collect.candidates import sample_candidates
    from jaxrlhf.collect.store import candidates_path, write_candidates
    from jaxrlhf.data.formats import load_prompt_dataset
    from jaxrlhf.data.preference import tokenize_prompts
    from jaxrlhf.models.hf import from_pretrained
    from jaxrlhf.models.tokenizer import load_tokenizer

    policy = model_dir(args.policy, "policy")
    tokenizer = load_tokenizer(policy)
    rows = load_prompt_dataset(args.prompts, data_config, report=note, tokenizer=tokenizer)
    prompts = [row["prompt"] for row in rows][: config.max_prompts]
    batch = tokenize_prompts([{"prompt": p} for p in prompts], tokenizer, data_config,
                             source=args.prompts)  # fmt: skip
    check_prompts_fit((policy,), batch, config.max_new_tokens, "--collect-max-new-tokens")
    note(f"sampling {config.num_samples} responses to each of {len(prompts)} prompts "
          f"(temperature {config.temperature}) …")  # fmt: skip
    pairs, dropped = sample_candidates(
        from_pretrained(policy), tokenizer, prompts, config, data_config, source=args.prompts
    )
    if not pairs:
        raise SystemExit(
            f"error: no usable pairs: all {len(prompts) * config.num_samples} samples were empty, "
            f"cut off before EOS (--collect-max-new-tokens {config.max_new_tokens}) or duplicates"
        )
    write_candidates(args.out_file, pairs, sampling)
    note(f"{candidates_path(args.out_file)}: {len(pairs)} candidate pairs ({dropped} of "
          f"{len(prompts) * config.num_samples} samples dropped: empty, cut off or duplicates)")  # fmt: skip


def _serve(args, store) -> None:
    """The labelling page until every pair is labelled or Ctrl-C (SIGTERM: the same)."""
    import signal

    from jaxrlhf.collect.server import LabelServer

    port = default_port(args.out_file) if args.port is None else args.port
    try:
        server = LabelServer(store, port=port, quiet=not args.verbose)
    except OSError as err:
        raise ValueError(
            f"--port {port}: cannot listen on 127.0.0.1 ({err}); give another --port (0: any free "
            "one)"
        ) from None
    counts = store.counts()
    print(f"Label {counts['total'] - counts['labeled']} pairs at {server.url}  (127.0.0.1 only; "
          "keys 1 left, 2 right, 0 tie, s skip, u undo; Ctrl-C stops)", file=sys.stderr,
          flush=True)  # fmt: skip

    def stop(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    if args.open:
        import webbrowser

        webbrowser.open(server.url)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        print("stopped; run the same command again to continue", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.server_close()


def cmd_collect(args) -> int:
    from jaxrlhf.collect.candidates import CollectConfig
    from jaxrlhf.collect.store import (
        LabelStore,
        OutputLock,
        candidates_path,
        check_sampling,
        read_jsonl,
        skipped_path,
    )
    from jaxrlhf.data.preference import DataConfig

    config, data_config = get_config(args, CollectConfig), get_config(args, DataConfig)
    if os.path.isdir(args.out_file):
        raise ValueError(
            f"--out {args.out_file}: is a directory; give the preference file to write, e.g. "
            f"{os.path.join(args.out_file, 'prefs.jsonl')}"
        )
    labeler = None
    if args.labeler:
        from jaxrlhf.collect.labelers import load_labeler

        labeler = load_labeler(args.labeler, data_config)  # flag errors before any sampling
    sampling = _sampling_record(args, config)
    os.makedirs(os.path.dirname(os.path.abspath(args.out_file)), exist_ok=True)
    with OutputLock(args.out_file):
        if os.path.exists(candidates_path(args.out_file)):
            check_sampling(args.out_file, read_jsonl(candidates_path(args.out_file)), sampling)
        else:
            labelled = [p for p in (args.out_file, skipped_path(args.out_file)) if read_jsonl(p)]
            if labelled:  # new candidates would be numbered like the old, labelled ones
                raise ValueError(
                    f"{', '.join(labelled)} holds labels but {candidates_path(args.out_file)}, "
                    "the pairs they refer to, is missing; give another --out"
                )
            _sample(args, config, data_config, sampling)
        store = LabelStore(args.out_file)
        counts = store.counts()
        if counts["labeled"]:
            note(f"{args.out_file}: continuing, {counts['labeled']} of {counts['total']} pairs "
                  "labelled already")  # fmt: skip
        if labeler is not None:
            pending = store.pending()
            for start in range(0, len(pending), 64):  # saved as it goes: a restart continues
                chunk = pending[start : start + 64]
                for pair, choice in zip(chunk, labeler.choose(chunk), strict=True):
                    store.label(pair["pair_id"], choice, labeler=labeler.name)
        elif store.next_pair() is not None:
            _serve(args, store)
        counts = store.counts()
    summary = {
        **counts,
        "pending": counts["total"] - counts["labeled"],
        "out": args.out_file,
        "skipped_file": skipped_path(args.out_file),
    }
    print_summary(summary)
    wrote(os.path.dirname(os.path.abspath(args.out_file)), preferences=args.out_file,
          skipped=skipped_path(args.out_file))  # fmt: skip
    return 0


def add_collect_parser(sub) -> None:
    """The ``collect`` subcommand."""
    from jaxrlhf.collect.candidates import CollectConfig
    from jaxrlhf.data.preference import DataConfig

    collect = sub.add_parser(
        "collect",
        help="label pairs of policy samples (a local web page, or --labeler) for train-rm",
        description="Label pairs of policy samples for train-rm: a person in a local web page, or "
        "--labeler (a Python rule, a reward model). Run the same command again to continue.",
    )
    collect.add_argument("--policy", required=True, help=MODEL_HELP + " of the policy to sample")
    collect.add_argument(
        "--prompts",
        required=True,
        help=DATA_HELP + " (a prompt column, or preference pairs with implicit prompts)",
    )
    collect.add_argument(
        "--out",
        dest="out_file",  # a file, unlike the output directories of the other commands
        metavar="OUT",
        required=True,
        help="the preference file (jsonl) to append to; OUT.candidates.jsonl and "
        "OUT.skipped.jsonl are written beside it",
    )
    collect.add_argument(
        "--labeler",
        help="label without a person: rule:module:function with fn(prompt, a, b) -> 0 (a), 1 (b) "
        "or None (tie), e.g. rule:jaxrlhf.collect.labelers:demo_annotator; or reward-model:DIR "
        "(a train-rm reward model; the higher score wins)",
    )
    collect.add_argument(
        "--port",
        type=int,
        default=None,
        help=f"port of the page on 127.0.0.1 (default: one in {PORTS[0]}–{PORTS[1] - 1} fixed by "
        "OUT, the same on every run; 0: any free one)",
    )
    collect.add_argument("--open", action=argparse.BooleanOptionalAction, default=False,
                         help="open the page in the default web browser (default: print the URL)")  # fmt: skip
    collect.add_argument("--verbose", action="store_true", help="log every HTTP request")
    add_config(collect, CollectConfig)
    add_config(collect, DataConfig)
    collect.set_defaults(run=cmd_collect)
