"""Metrics JSONL round trip and the markdown/PNG report."""

import math
import os

import numpy as np

from jaxrlhf.logging import MetricsLogger, read_metrics
from jaxrlhf.report import markdown_table, plot_against_sqrt_kl, plot_curves, write_report


def test_metrics_jsonl_round_trip(tmp_path):
    path = tmp_path / "m.jsonl"
    with MetricsLogger(path) as log:
        log.log(0, {"objective/kl": np.float32(0.5), "loss/value_avg": 2})
        log.log(1, {"objective/kl": math.nan})
    records = read_metrics(path)
    assert records == [
        {"step": 0, "objective/kl": 0.5, "loss/value_avg": 2},
        {"step": 1, "objective/kl": None},
    ]


def test_report_writes_markdown_and_plots(tmp_path):
    runs = {
        "kl": [
            {"step": i, "objective/kl": 0.1 * i, "objective/scores": float(i)} for i in range(4)
        ],
        "no kl": [{"step": i, "objective/kl": 0.3 * i} for i in range(4)],
    }
    plots = plot_curves(runs, str(tmp_path / "plots"))
    assert set(plots) == {"reward", "kl"}  # no entropy / value-loss data given
    for png in plots.values():
        with open(png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    table = markdown_table([{"run": "a|b", "gold": 1.23456}], ["run", "gold"])
    assert table.splitlines()[2] == "| a\\|b | 1.235 |"
    path = write_report(
        str(tmp_path / "report.md"), title="T", sections=[("Numbers", table)], plots=plots
    )
    text = open(path, encoding="utf-8").read()  # noqa: SIM115
    assert text.startswith("# T\n") and "## Numbers" in text
    assert "](plots/kl.png)" in text and os.path.exists(tmp_path / "plots" / "kl.png")


def test_plot_against_sqrt_kl(tmp_path):
    runs = {
        "β = 0.1": [
            {"step": i, "eval/kl": 0.5 * i, "gold/score": 1.0 + i, "eval/learned_score": 0.5 * i}
            for i in (1, 2)
        ],
        "no evals": [{"step": 1, "objective/kl": 0.2}],
    }
    start = {"gold": 1.0, "learned": 0.0}
    path = plot_against_sqrt_kl(runs, start, str(tmp_path / "p" / "gold_vs_kl.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert plot_against_sqrt_kl({"none": runs["no evals"]}, start, str(tmp_path / "q.png")) is None
    assert not os.path.exists(tmp_path / "q.png")
