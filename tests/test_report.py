"""Metrics JSONL round trip and the markdown/PNG report."""

import math
import os

import numpy as np

from jaxrlhf.logging import MetricsLogger, read_metrics
from jaxrlhf.report import markdown_table, plot_curves, write_report


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
