"""The bad-input set: every ``jaxrlhf`` command fed malformed data, models, flags and output paths.

Each case must end with a non-zero exit, no traceback, one message naming the file / row / column /
field at fault, and nothing written in its (fresh) output directory. The CLI runs in-process, so an
uncaught exception fails the test (that is the "no traceback" check); three cases also run through a
real subprocess and assert that stderr holds no "Traceback".
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from jaxrlhf.cli import main
from jaxrlhf.models import CausalLM, RewardModel
from jaxrlhf.models.hf import CheckpointError, from_pretrained, save_pretrained
from jaxrlhf.train.sft import tiny_model_config

PROMPTS = ["the food was", "the staff was", "the room was", "the view was"]


def _jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Good inputs (a tiny LM, a tiny reward model, data in each shape) and broken variants."""
    from data_utils import tokenizer

    root = tmp_path_factory.mktemp("bad_inputs")
    tok = tokenizer()
    config = tiny_model_config(len(tok), hidden_size=16, num_layers=1, num_heads=2)
    save_pretrained(CausalLM(config, rngs=nnx.Rngs(0)), root / "base", tokenizer=tok)
    save_pretrained(RewardModel(config, rngs=nnx.Rngs(1)), root / "rm", tokenizer=tok)
    base = root / "base"
    tensors = load_file(str(base / "model.safetensors"))

    no_config = _copy(base, root / "no_config")
    os.remove(no_config / "config.json")
    bert = _copy(base, root / "bert")
    hf_config = json.loads((base / "config.json").read_text())
    (bert / "config.json").write_text(json.dumps({**hf_config, "model_type": "bert"}))
    bad_json = _copy(base, root / "bad_json")
    (bad_json / "config.json").write_text('{"model_type": "gpt2", ')
    truncated = _copy(base, root / "truncated")
    data = (base / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    pickle_only = _copy(base, root / "pickle_only")
    os.remove(pickle_only / "model.safetensors")
    torch.save(
        {k: torch.from_numpy(v) for k, v in tensors.items()}, pickle_only / "pytorch_model.bin"
    )
    missing = _copy(base, root / "missing_tensor")
    save_file({k: v for k, v in tensors.items() if k != "transformer.h.0.attn.c_attn.weight"},
              str(missing / "model.safetensors"), metadata={"format": "pt"})  # fmt: skip
    shaped = _copy(base, root / "misshaped")
    bad = dict(tensors, **{"transformer.wpe.weight": np.zeros((5, 16), np.float32)})
    save_file(bad, str(shaped / "model.safetensors"), metadata={"format": "pt"})
    no_tokenizer = root / "no_tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(base / name, no_tokenizer / name)

    pairs = [{"prompt": p, "chosen": " great .", "rejected": " bad ."} for p in PROMPTS]
    d = root / "data"
    d.mkdir()
    _jsonl(d / "prefs.jsonl", pairs)
    _jsonl(d / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    _jsonl(d / "sft.jsonl", [{"prompt": p, "completion": " good ."} for p in PROMPTS])
    (d / "empty.jsonl").write_text("")
    (d / "not_json.jsonl").write_text("this is { not json\n")
    (d / "latin1.jsonl").write_bytes('{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    (d / "latin1.txt").write_bytes("caf\xe9 was\n".encode("latin-1"))
    (d / "corrupt.parquet").write_bytes(b"PAR1" + bytes(range(256)) * 4)
    (d / "wrong_header.csv").write_text("question,good,bad\nthe food was, great ., bad .\n")
    (d / "notes.txt").write_text("the food was great .\n")
    _jsonl(d / "no_rejected.jsonl", [{"prompt": p, "chosen": " great ."} for p in PROMPTS])
    _jsonl(d / "number_chosen.jsonl", [{**r, "chosen": 3} for r in pairs])
    _jsonl(d / "null_text.jsonl", [{"text": "the food was good ."}, {"text": None}])
    _jsonl(d / "null_prompt.jsonl", [{"prompt": "the food was"}, {"prompt": None}])
    (d / "nan_prompt.csv").write_text("prompt,chosen,rejected\nthe food was, great ., bad .\n"
                                      ",  lovely ., dirty .\n")  # fmt: skip
    _jsonl(d / "empty_prompt.jsonl", [{"prompt": "the food was"}, {"prompt": ""}])
    chat = [{"role": "user", "content": "how was it ?"}, {"role": "assistant", "content": "good"}]
    _jsonl(d / "no_content.jsonl", [{"messages": chat}, {"messages": [{"role": "user"}]}])
    _jsonl(d / "str_messages.jsonl", [{"messages": chat}, {"messages": "hello"}])
    _jsonl(d / "bad_chat_pair.jsonl", [{"prompt": [{"role": "user", "content": "hi"}],
                                       "chosen": ["not a message"],
                                       "rejected": [{"role": "assistant", "content": "no"}]}])  # fmt: skip
    _jsonl(d / "no_prompt_column.jsonl", [{"question": p} for p in PROMPTS])
    (d / "empty_dir").mkdir()
    (root / "a_file").write_text("not a directory\n")
    return root


def _data(ws, name):
    return str(ws / "data" / name)


def _sft(ws, out, data="sft.jsonl", model="base"):
    return ["sft", "--data", _data(ws, data), "--model", str(ws / model), "--out", out]


def _rm(ws, out, data="prefs.jsonl", model="base"):
    return ["train-rm", "--data", _data(ws, data), "--model", str(ws / model), "--out", out]


def _dpo(ws, out, data="prefs.jsonl", model="base"):
    return ["dpo", "--data", _data(ws, data), "--model", str(ws / model), "--out", out,
            "--dpo-batch-size", "2"]  # fmt: skip


def _ppo(ws, out, prompts="prompts.jsonl", policy="base", reward_model="rm"):
    return ["ppo", "--prompts", _data(ws, prompts), "--policy", str(ws / policy),
            "--reward-model", str(ws / reward_model), "--out", out]  # fmt: skip


def _grpo(ws, out, prompts="prompts.jsonl", policy="base", reward_model=None):
    argv = ["grpo", "--prompts", _data(ws, prompts), "--policy", str(ws / policy), "--out", out]
    if reward_model is None:
        return [*argv, "--reward-fn", "jaxrlhf.tasks.arithmetic:correctness_reward"]
    return [*argv, "--reward-model", str(ws / reward_model)]


def _gen(ws, out, model="base", *flags):
    return ["generate", "--model", str(ws / model), "--prompt", "the food was", *flags]


def _demo(ws, out, *flags):
    return ["demo", "--out-dir", out, "--quiet", *flags]


# (case, argv builder (workspace, fresh output path) → argv, substrings expected on stderr)
CASES = [
    # ---------------------------------------------------------------- data files
    ("missing data file", lambda w, o: _sft(w, o, "nope.jsonl"), ["nope.jsonl", "no such file"]),
    ("empty data file", lambda w, o: _rm(w, o, "empty.jsonl"), ["empty.jsonl", "empty"]),
    ("non-JSON data file", lambda w, o: _dpo(w, o, "not_json.jsonl"),
     ["not_json.jsonl", "JSON parse error"]),
    ("non-UTF-8 data file", lambda w, o: _ppo(w, o, "latin1.jsonl"),
     ["latin1.jsonl: line 1, byte 16", "UTF-8"]),
    ("unsupported data extension", lambda w, o: _sft(w, o, "notes.txt"),
     ["notes.txt", "unsupported file type"]),
    ("directory of no data", lambda w, o: _rm(w, o, "empty_dir"),
     ["empty_dir", "not a dataset directory"]),
    ("corrupt parquet", lambda w, o: _dpo(w, o, "corrupt.parquet"), ["corrupt.parquet", "parquet"]),
    ("csv with the wrong header", lambda w, o: _rm(w, o, "wrong_header.csv"),
     ["wrong_header.csv", "question", "--data-prompt-column"]),
    ("missing column", lambda w, o: _dpo(w, o, "no_rejected.jsonl"),
     ["no_rejected.jsonl", "'rejected'"]),
    ("mistyped column", lambda w, o: _rm(w, o, "number_chosen.jsonl"),
     ["number_chosen.jsonl", "row 0", "'chosen'"]),
    ("prompt column missing", lambda w, o: _grpo(w, o, "no_prompt_column.jsonl"),
     ["no_prompt_column.jsonl", "'prompt'", "--data-prompt-column"]),
    ("null text", lambda w, o: _sft(w, o, "null_text.jsonl"),
     ["null_text.jsonl", "row 1", "'text'"]),
    ("null prompt", lambda w, o: _ppo(w, o, "null_prompt.jsonl"),
     ["null_prompt.jsonl", "row 1", "'prompt'"]),
    ("NaN (empty csv cell) prompt", lambda w, o: _dpo(w, o, "nan_prompt.csv"),
     ["nan_prompt.csv", "row 1", "'prompt'"]),
    ("empty prompt", lambda w, o: _grpo(w, o, "empty_prompt.jsonl"),
     ["empty_prompt.jsonl", "row 1", "'prompt'", "empty text"]),
    ("chat message without content", lambda w, o: _sft(w, o, "no_content.jsonl"),
     ["no_content.jsonl", "row 1", "'messages'", "content"]),
    ("messages that are a string", lambda w, o: _sft(w, o, "str_messages.jsonl"),
     ["str_messages.jsonl", "row 1", "'messages'"]),
    ("chat pair with a non-dict message", lambda w, o: _dpo(w, o, "bad_chat_pair.jsonl"),
     ["bad_chat_pair.jsonl", "row 0", "'chosen'", "message 0"]),
    ("missing prompts file", lambda w, o: _gen(w, o, "base", "--prompts-file", _data(w, "no.txt")),
     ["no.txt"]),
    ("non-UTF-8 prompts file",
     lambda w, o: _gen(w, o, "base", "--prompts-file", _data(w, "latin1.txt")),
     ["latin1.txt: line 1, byte 4", "UTF-8"]),
    # ---------------------------------------------------------------- models
    ("missing model directory", lambda w, o: _sft(w, o, model="nowhere"),
     ["nowhere", "no such directory"]),
    ("model path is a file", lambda w, o: _gen(w, o, "a_file"), ["a_file", "not a checkpoint"]),
    ("no config.json", lambda w, o: _ppo(w, o, policy="no_config"),
     ["no_config", "config.json"]),
    ("config.json not JSON", lambda w, o: _sft(w, o, model="bad_json"),
     ["bad_json", "config.json"]),
    ("unsupported architecture", lambda w, o: _dpo(w, o, model="bert"),
     ["bert", "config.json", "model_type='bert'"]),
    ("truncated safetensors", lambda w, o: _rm(w, o, model="truncated"),
     ["truncated", "model.safetensors"]),
    ("pickle-only weights", lambda w, o: _sft(w, o, model="pickle_only"),
     ["pytorch_model.bin", "safetensors", "Convert"]),
    ("missing tensor", lambda w, o: _gen(w, o, "missing_tensor"),
     ["missing_tensor", "transformer.h.0.attn.c_attn.weight", "missing"]),
    ("mis-shaped tensor", lambda w, o: _grpo(w, o, policy="misshaped"),
     ["misshaped", "transformer.wpe.weight", "(5, 16)", "(64, 16)"]),
    ("no tokenizer", lambda w, o: _dpo(w, o, model="no_tokenizer"), ["no_tokenizer", "tokenizer"]),
    ("LM directory as the PPO reward model", lambda w, o: _ppo(w, o, reward_model="base"),
     ["base", "score.weight", "train-rm"]),
    ("LM directory as the GRPO reward model", lambda w, o: _grpo(w, o, reward_model="base"),
     ["base", "score.weight", "train-rm"]),
    ("missing reward model", lambda w, o: _ppo(w, o, reward_model="nowhere"),
     ["reward model", "nowhere", "no such directory"]),
    ("truncated reward model", lambda w, o: _grpo(w, o, reward_model="truncated"),
     ["truncated", "model.safetensors"]),
    # ---------------------------------------------------------------- flags out of range
    ("SFTConfig.learning_rate < 0",
     lambda w, o: [*_sft(w, o), "--sft-learning-rate", "-1"], ["--sft-learning-rate -1.0: must be"]),
    ("RewardConfig.batch_size = 0", lambda w, o: [*_rm(w, o), "--rm-batch-size", "0"],
     ["--rm-batch-size 0: must be"]),
    ("PPOConfig.gamma > 1", lambda w, o: [*_ppo(w, o), "--ppo-gamma", "1.5"], ["--ppo-gamma 1.5: must be"]),
    ("GRPOConfig.group_size = 1", lambda w, o: [*_grpo(w, o), "--grpo-group-size", "1"],
     ["--grpo-group-size 1: must be"]),
    ("DPOConfig.beta = 0", lambda w, o: [*_dpo(w, o), "--dpo-beta", "0"], ["--dpo-beta 0.0: must be"]),
    ("DataConfig.max_prompt_length = 0",
     lambda w, o: [*_sft(w, o), "--data-max-prompt-length", "0"], ["--data-max-prompt-length 0: must be"]),
    ("SamplingConfig.temperature < 0", lambda w, o: _gen(w, o, "base", "--temperature", "-1"),
     ["--temperature -1.0: must be"]),
    ("DemoConfig.hidden_size = 0", lambda w, o: _demo(w, o, "--hidden-size", "0"),
     ["--hidden-size 0: must be"]),
    ("not a number", lambda w, o: [*_dpo(w, o), "--dpo-beta", "abc"], ["--dpo-beta", "'abc'"]),
    # ---------------------------------------------------------------- output paths
    ("sft --out is a file", lambda w, o: _sft(w, str(w / "a_file")), ["a_file", "--out"]),
    ("ppo --out is a file", lambda w, o: _ppo(w, str(w / "a_file")), ["a_file", "--out"]),
    ("demo --out-dir is a file", lambda w, o: _demo(w, str(w / "a_file")),
     ["a_file", "--out-dir"]),
]  # fmt: skip


def run_cli(argv, capsys) -> tuple[int, str]:
    """(exit status, stderr) of ``jaxrlhf argv`` run in-process, as the console script exits."""
    try:
        status = main(argv)
    except SystemExit as exit_:
        code = exit_.code
        err = capsys.readouterr().err
        if isinstance(code, str):  # sys.exit("message"): printed to stderr, exit status 1
            return 1, err + code
        return (0 if code is None else code), err
    return status, capsys.readouterr().err


def test_there_are_at_least_thirty_distinct_cases():
    assert len({name for name, _, _ in CASES}) == len(CASES) >= 30


@pytest.mark.parametrize("name, argv, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_error_and_writes_nothing(
    ws, tmp_path, capsys, name, argv, expected
):
    out = tmp_path / "out"
    status, err = run_cli(argv(ws, str(out)), capsys)
    assert status != 0, err
    assert "Traceback" not in err
    assert "error" in err.lower(), err
    for text in expected:
        assert text in err, (text, err)
    assert not out.exists() or os.listdir(out) == []


def test_a_file_as_output_is_left_alone(ws, capsys):
    before = (ws / "a_file").read_text()
    status, err = run_cli(_dpo(ws, str(ws / "a_file")), capsys)
    assert status != 0 and "a_file" in err
    assert (ws / "a_file").read_text() == before


CONSOLE_CASES = {
    "LM as reward model": (lambda w, o: _ppo(w, o, reward_model="base"), "score.weight"),
    "truncated safetensors": (lambda w, o: _gen(w, o, "truncated"), "model.safetensors"),
}


def test_the_console_script_prints_no_traceback(ws, tmp_path):
    """``python -m jaxrlhf`` as a user runs it: one ``error:`` line, exit status 2, no traceback
    (the commands run side by side: their cost is the start of the interpreter)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    runs = {}
    for name, (argv, _) in CONSOLE_CASES.items():
        out = tmp_path / name.replace(" ", "_")
        command = [sys.executable, "-m", "jaxrlhf", *argv(ws, str(out))]
        runs[name] = out, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                           text=True, env=env)  # fmt: skip
    for name, (out, process) in runs.items():
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 2, (name, stderr)
        assert "Traceback" not in stderr, stderr
        last = stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and CONSOLE_CASES[name][1] in last, (name, stderr)
        assert not out.exists()


# ------------------------------------------------------------------- the Python API


def test_a_reward_model_without_a_score_head_is_an_explicit_opt_in(ws):
    with pytest.raises(CheckpointError, match=r"base.*'score\.weight'.*allow_new_head=True"):
        from_pretrained(ws / "base", head="reward")
    fresh = from_pretrained(ws / "base", head="reward", allow_new_head=True)
    # A fresh head N(0, 1/(D+1)) with zero bias: D = 16, std 1/√17 ≈ 0.24.
    np.testing.assert_array_equal(np.asarray(fresh.score.bias[...]), [0.0])
    assert 0.1 < float(np.std(np.asarray(fresh.score.kernel[...]))) < 0.4
    trained = from_pretrained(ws / "rm", head="reward")  # a trained head needs no opt-in
    saved = load_file(str(ws / "rm" / "model.safetensors"))["score.weight"]  # HF [1, D]
    np.testing.assert_array_equal(np.asarray(trained.score.kernel[...]).T, saved)


# ------------------------------------------------------------------- every numeric config field


def _numeric_fields():
    """(config class, field name, type) of every int / float flag of every command."""
    import dataclasses
    import typing

    from jaxrlhf.cli.flags import _unwrap_optional
    from jaxrlhf.data.preference import DataConfig
    from jaxrlhf.demo import DemoConfig
    from jaxrlhf.rollout import SamplingConfig
    from jaxrlhf.train.dpo import DPOConfig
    from jaxrlhf.train.grpo_config import GRPOConfig
    from jaxrlhf.train.ppo import PPOConfig
    from jaxrlhf.train.reward import RewardConfig
    from jaxrlhf.train.sft import SFTConfig

    configs = (DemoConfig, SFTConfig, RewardConfig, PPOConfig, GRPOConfig, DPOConfig, DataConfig,
               SamplingConfig)  # fmt: skip
    fields = []
    for cls in configs:
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            tp, _ = _unwrap_optional(hints[field.name])
            if field.init and tp in (int, float):
                fields.append((cls, field.name, tp))
    return fields


NUMERIC_FIELDS = _numeric_fields()


@pytest.mark.parametrize(
    "cls, name, tp", NUMERIC_FIELDS, ids=[f"{c.__name__}.{n}" for c, n, _ in NUMERIC_FIELDS]
)
def test_every_numeric_field_refuses_nan_and_negatives_naming_itself(cls, name, tp):
    """NaN (floats) and −1 are out of range for every count, length, rate and coefficient: the
    error is a ValueError "<Config>.<field> = <value>: ..." (a seed may be any integer)."""
    bad = [float("nan"), -1.0] if tp is float else [-1]
    if name == "seed":
        bad = []
        cls(**{name: -1})  # any integer seeds the generator
    for value in bad:
        with pytest.raises(ValueError, match=rf"^{cls.__name__}\.{name} = "):
            cls(**{name: value})
