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
