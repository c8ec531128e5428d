"""The persistent compilation cache: a second run of the same command compiles nothing."""

import json
import os
import subprocess
import sys

from data_utils import tiny_lm, tokenizer

from jaxrlhf.cli import build_parser, main
from jaxrlhf.compile_cache import default_cache_dir, enable_compile_cache
from jaxrlhf.models.hf import save_pretrained

# Runs `jaxrlhf generate` in a fresh process and reports, from jax's own monitoring events, how many
# programs asked the persistent cache and how many it answered.
_COUNTING_RUN = """
import json, sys
import jax.monitoring
counts = {"requests": 0, "hits": 0}
names = {"/jax/compilation_cache/compile_requests_use_cache": "requests",
         "/jax/compilation_cache/cache_hits": "hits"}
def listen(event, **kwargs):
    if event in names:
        counts[names[event]] += 1
jax.monitoring.register_event_listener(listen)
from jaxrlhf.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, **counts}), file=sys.stderr)
"""


def _run_generate(model_dir, cache_root) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "JAXRLHF_COMPILE_CACHE"}
    env["JAXRLHF_CACHE"] = str(cache_root)
    argv = ["generate", "--model", str(model_dir), "--prompt", "the food was"]
    argv += ["--max-new-tokens", "3", "--seed", "1"]
    done = subprocess.run(
        [sys.executable, "-c", _COUNTING_RUN, *argv],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stderr.strip().splitlines()[-1])
    report["stdout"] = done.stdout
    return report


def test_second_run_compiles_nothing(tmp_path, monkeypatch, capsys):
    model_dir, cache_root = tmp_path / "model", tmp_path / "cache"
    save_pretrained(tiny_lm(len(tokenizer())), model_dir, tokenizer=tokenizer())

    # --no-compile-cache (in this process, whatever the environment says): nothing is written.
    monkeypatch.setenv("JAXRLHF_CACHE", str(cache_root))
    monkeypatch.delenv("JAXRLHF_COMPILE_CACHE", raising=False)
    argv = ["generate", "--model", str(model_dir), "--prompt", "the food was"]
    assert main([*argv, "--max-new-tokens", "3", "--seed", "1", "--no-compile-cache"]) == 0
    off = capsys.readouterr().out
    assert not os.path.exists(cache_root)

    cold = _run_generate(model_dir, cache_root)
    entries = os.listdir(cache_root / "xla")
    assert cold["code"] == 0 and cold["requests"] > cold["hits"]  # (a program built twice hits)
    assert len(entries) == cold["requests"] - cold["hits"]  # every miss written, however quick

    warm = _run_generate(model_dir, cache_root)
    assert warm["requests"] == cold["requests"] and warm["hits"] == warm["requests"]
    assert sorted(os.listdir(cache_root / "xla")) == sorted(entries)  # nothing new compiled
    assert warm["stdout"] == cold["stdout"] == off  # same seed, same completion


def test_cache_dir_and_switches(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXRLHF_CACHE", str(tmp_path / "root"))
    assert default_cache_dir() == str(tmp_path / "root" / "xla")
    monkeypatch.delenv("JAXRLHF_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == str(tmp_path / "xdg" / "jaxrlhf" / "xla")
    # The suite's own setting (conftest): the environment turns the cache off, nothing is written.
    monkeypatch.setenv("JAXRLHF_COMPILE_CACHE", "0")
    assert enable_compile_cache(tmp_path / "never") is None
    assert not os.path.exists(tmp_path / "never")
    # Every command takes --compile-cache (the default) / --no-compile-cache.
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert set(commands) >= {"demo", "generate", "grpo", "dpo", "ppo", "sft", "train-rm"}
    for sub in commands.values():
        (flag,) = [a for a in sub._actions if "--no-compile-cache" in a.option_strings]
        assert flag.default is True and flag.dest == "compile_cache"
