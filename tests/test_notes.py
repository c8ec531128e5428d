"""What the library says to the user on the way: progress lines in a log, the k1 note, the chat
template the data will be rendered with, and datasets' own logging kept out of our errors."""

from __future__ import annotations

import copy
import io
import types

import pytest
from data_utils import CHAT_ROWS, TEXT_ROWS, tokenizer, write

from jaxrlhf.data import DataError, load_preference_dataset, load_prompt_dataset
from jaxrlhf.data.sft import load_sft_dataset
from jaxrlhf.logging import ProgressLines, progress
from jaxrlhf.train.loop import note_negative_k1


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run_lines(total, *, initial=0, seconds_per_step=1.0, interval_s=30.0):
    out, clock = io.StringIO(), FakeClock()
    bar = ProgressLines(
        range(initial, total), total=total, initial=initial, desc="PPO", what="iterations",
        file=out, clock=clock, interval_s=interval_s,
    )  # fmt: skip
    for i in bar:
        clock.now += seconds_per_step
        bar.set_postfix(score=f"{i / 10:.1f}")
    return out.getvalue().splitlines()


def test_plain_lines_every_tenth_of_the_run_and_at_the_end():
    lines = run_lines(100)
    assert len(lines) == 10
    assert lines[0] == "PPO: 10/100 iterations (10%), 10.0 s, score=0.9"
    assert lines[-1] == "PPO: 100/100 iterations (100%), 100.0 s, score=9.9"
    assert "\r" not in "".join(lines)


def test_plain_lines_every_interval_when_steps_are_slow_and_a_resumed_run_counts_on():
    lines = run_lines(10, seconds_per_step=40.0)  # every step is past the 30 s interval
    assert len(lines) == 10
    lines = run_lines(25, initial=20)  # 5 steps left: a line per step, counting from 20
    assert lines[0].startswith("PPO: 21/25 iterations (84%)")
    assert lines[-1].startswith("PPO: 25/25 iterations (100%)")


def test_odd_totals_end_with_exactly_one_last_line():
    lines = run_lines(7)
    assert lines[-1].startswith("PPO: 7/7 iterations (100%)")
    assert sum(line.startswith("PPO: 7/7") for line in lines) == 1


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_a_bar_only_on_a_terminal():
    from tqdm.auto import tqdm

    terminal = Terminal()
    bar = progress(range(3), total=3, desc="SFT", file=terminal)
    assert isinstance(bar, tqdm)
    assert list(bar) == [0, 1, 2]
    assert "\r" in terminal.getvalue()  # tqdm redraws in place
    log = io.StringIO()
    bar = progress(range(3), total=3, desc="SFT", file=log)
    assert isinstance(bar, ProgressLines) and list(bar) == [0, 1, 2]
    assert log.getvalue().count("\n") == 3 and "\r" not in log.getvalue()
    quiet = progress(range(3), total=3, desc="SFT", disable=True, file=log)
    quiet.set_postfix(loss="1")
    assert list(quiet) == [0, 1, 2]


def test_the_k1_note_comes_once_at_the_first_negative_kl_and_only_for_k1(capsys):
    k1, k3 = types.SimpleNamespace(kl_estimator="k1"), types.SimpleNamespace(kl_estimator="k3")
    assert not note_negative_k1(k1, 1, {"objective/kl": 0.2})
    assert not note_negative_k1(k3, 2, {"objective/kl": -0.1})
    assert not note_negative_k1(types.SimpleNamespace(), 2, {"objective/kl": -0.1})  # GRPO
    assert capsys.readouterr().err == ""
    assert note_negative_k1(k1, 3, {"objective/kl": -0.0123})
    err = capsys.readouterr().err
    assert "objective/kl = -0.0123 < 0 at iteration 3" in err and "--ppo-kl-estimator k3" in err


def test_a_trainer_run_says_it_once(capsys):
    """run_iterations on a stand-in trainer whose KL goes negative twice: one note."""
    from jaxrlhf.train.loop import run_iterations

    kls = iter([0.1, -0.2, -0.3, 0.0])

    class Trainer:
        config = types.SimpleNamespace(
            kl_estimator="k1", num_iterations=4, checkpoint_dir=None, max_nonfinite_skips=3
        )
        state = types.SimpleNamespace(iteration=0)

        def step(self):
            return {"objective/kl": next(kls)}

    history = run_iterations(Trainer(), None, desc="PPO", postfix=lambda m: {}, progress=False)
    assert [m["objective/kl"] for m in history] == [0.1, -0.2, -0.3, 0.0]
    assert capsys.readouterr().err.count("objective/kl = ") == 1


def test_the_format_line_says_when_chats_use_the_built_in_template(tmp_path):
    plain = tokenizer()  # no chat_template
    templated = copy.deepcopy(plain)
    templated.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    chats, texts = write(CHAT_ROWS, str(tmp_path), "jsonl"), write(TEXT_ROWS, str(tmp_path), "json")
    said = "the tokenizer has no chat template: chats rendered with the built-in 'role: content'"

    def line(load, path, tok):
        lines = []
        load(path, report=lines.append, tokenizer=tok)
        return lines[0]

    for load in (load_preference_dataset, load_prompt_dataset):
        assert said in line(load, chats, plain)
        assert said not in line(load, chats, templated)
        assert said not in line(load, chats, None)  # no tokenizer given: nothing to say
        assert said not in line(load, texts, plain)  # text data needs no template
    assert line(load_preference_dataset, chats, plain).endswith(f"{said} template; 2 pairs")
    (tmp_path / "sft").mkdir()
    messages = [{"messages": [*row["prompt"], *row["chosen"]]} for row in CHAT_ROWS]
    sft_chats = write(messages, str(tmp_path / "sft"), "jsonl")
    assert said in line(load_sft_dataset, sft_chats, plain)
    assert said not in line(load_sft_dataset, sft_chats, templated)


def test_a_broken_json_line_is_named_and_datasets_logs_nothing(tmp_path, capfd):
    import datasets

    path = tmp_path / "prefs.jsonl"
    good = '{"prompt": "a", "chosen": " b", "rejected": " c"}'
    path.write_text(f"{good}\n\n{good}\n{good[:30]}\n")
    verbosity = datasets.logging.get_verbosity()
    with pytest.raises(DataError, match=r"could not be read as json \(line 4, column"):
        load_preference_dataset(path)
    captured = capfd.readouterr()
    assert captured.err + captured.out == ""  # no "Failed to load JSON …", no progress bar
    assert datasets.logging.get_verbosity() == verbosity  # restored
