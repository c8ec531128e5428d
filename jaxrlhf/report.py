"""The end-of-run report: a markdown file plus PNG curves of reward, KL, entropy and value loss."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

# The curves of a PPO run, by trl's metric names.
PPO_CURVES = {
    "reward": ("objective/scores", "gold/score"),
    "kl": ("objective/kl",),
    "entropy": ("objective/entropy",),
    "value_loss": ("loss/value_avg",),
}


def plot_curves(
    runs: Mapping[str, Sequence[Mapping]], out_dir: str, curves: Mapping[str, tuple] = PPO_CURVES
) -> dict[str, str]:
    """One PNG per curve; each run (name → metric records) is a line per available metric key.

    Returns {curve name: png path} for the curves that had data.
    """
    os.makedirs(out_dir, exist_ok=True)
    written = {}
    for curve, keys in curves.items():
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        drew = False
        for run_name, records in runs.items():
            for key in keys:
                points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
                if not points:
                    continue
                steps, values = np.array(points, dtype=float).T
                label = run_name if len(keys) == 1 else f"{run_name}: {key}"
                ax.plot(steps, values, marker=".", label=label)
                drew = True
        if drew:
            ax.set_xlabel("PPO iteration")
            ax.set_title(curve.replace("_", " "))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            fig.tight_layout()
            path = os.path.join(out_dir, f"{curve}.png")
            fig.savefig(path, dpi=110)
            written[curve] = path
        plt.close(fig)
    return written


def plot_against_sqrt_kl(
    runs: Mapping[str, Sequence[Mapping]],
    start: Mapping[str, float],
    path: str,
    *,
    keys: tuple[str, str, str] = ("eval/kl", "gold/score", "eval/learned_score"),
) -> str | None:
    """Gao et al.'s picture (2022, arXiv:2210.10760): the gold and the proxy (learned) reward of each
    run against d = √KL(π ‖ π_init), each run starting at ``start`` ({"gold", "learned"}, d = 0).

    ``keys``: the records' (KL, gold, proxy) metrics; records without them are skipped. Returns the
    PNG's path, or None when no run has a point.
    """
    kl_key, gold_key, proxy_key = keys
    fig, (gold_ax, proxy_ax) = plt.subplots(1, 2, figsize=(9, 3.5))
    drew = False
    for run_name, records in runs.items():
        points = [(0.0, start["gold"], start["learned"])] + [
            (max(r[kl_key], 0.0) ** 0.5, r[gold_key], r[proxy_key])
            for r in records
            if all(r.get(k) is not None for k in keys)
        ]
        if len(points) < 2:
            continue
        d, gold, proxy = np.array(points, dtype=float).T
        gold_ax.plot(d, gold, marker=".", label=run_name)
        proxy_ax.plot(d, proxy, marker=".", label=run_name)
        drew = True
    if drew:
        for ax, what in ((gold_ax, "gold reward"), (proxy_ax, "proxy (learned) reward")):
            ax.set_xlabel("√KL(π ‖ π_init)  (nats^½, per sequence)")
            ax.set_title(what)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return path if drew else None


def markdown_table(rows: Sequence[Mapping], columns: Sequence[str]) -> str:
    """A GitHub markdown table of ``rows`` (floats with 3 decimals)."""

    def cell(v):
        if isinstance(v, float):
            return f"{v:.3f}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_report(
    path: str,
    *,
    title: str,
    sections: Sequence[tuple[str, str]],
    plots: Mapping[str, str] | None = None,
) -> str:
    """Write a markdown report: a title, (heading, body) sections, and the plots (relative links).
    Process 0 writes it (a multi-process run writes one report)."""
    import jax

    if jax.process_index() != 0:
        return path
    base = os.path.dirname(os.path.abspath(path))
    parts = [f"# {title}", ""]
    for heading, body in sections:
        parts += [f"## {heading}", "", body.rstrip(), ""]
    if plots:
        parts += ["## Curves", ""]
        for name, png in plots.items():
            parts.append(f"![{name}]({os.path.relpath(png, base)})")
        parts.append("")
    os.makedirs(base, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
    return path
