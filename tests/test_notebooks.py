"""Execute every derivation notebook (notebooks/NN_*.py, jupytext percent) and check the pairs.

Each notebook asserts its own numeric claims against jaxrlhf, so running it top to bottom *is* the
test: a failed assert, an exception or a timeout fails the notebook's test. The kernel is the
``python3`` kernelspec of the interpreter running pytest (jupyter_client substitutes
``sys.executable`` for its ``python`` command), with the repository root on PYTHONPATH.
"""

from __future__ import annotations

import os
import pathlib
import sys

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
SOURCES = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))
CELL_TIMEOUT_S = 120


def _kernel_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), str(NOTEBOOKS), env.get("PYTHONPATH", "")) if p
    )
    env["JAX_PLATFORMS"] = "cpu"
    env["MPLBACKEND"] = "Agg"
    # One CPU device is enough for the notebooks (and compiles faster than four).
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    return env


def test_chapters_are_numbered_01_to_12():
    assert [p.name[:2] for p in SOURCES] == [f"{i:02d}" for i in range(1, 13)], SOURCES


def test_kernel_is_this_interpreter():
    """nbclient's python3 kernel must run in this venv, or the notebooks test another install."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec = KernelSpecManager().get_kernel_spec("python3")
    km = KernelManager(kernel_name="python3")
    cmd = km.format_kernel_cmd()
    assert spec.argv[0] in ("python", "python3", sys.executable)
    assert cmd[0] == sys.executable, cmd


@pytest.mark.parametrize("source", SOURCES, ids=[p.stem for p in SOURCES])
def test_ipynb_is_in_sync_with_py(source: pathlib.Path):
    """The stored .ipynb has the same cells (type and source) as its .py; outputs are not stored."""
    paired = source.with_suffix(".ipynb")
    assert paired.exists(), f"{paired.name} missing: run `jupytext --sync {source.name}`"
    from_py = jupytext.read(source)
    stored = nbformat.read(paired, as_version=4)
    assert [(c.cell_type, c.source) for c in stored.cells] == [
        (c.cell_type, c.source) for c in from_py.cells
    ], f"{paired.name} differs from {source.name}: run `jupytext --sync {source.name}`"
    assert all(not c.get("outputs") for c in stored.cells if c.cell_type == "code"), (
        f"{paired.name} stores outputs; clear them to keep diffs small"
    )
    header = source.read_text().split("# ---", 2)[1]
    assert "formats: ipynb,py:percent" in header, f"{source.name} lacks the jupytext pairing header"


@pytest.mark.parametrize("source", SOURCES, ids=[p.stem for p in SOURCES])
def test_notebook_executes(source: pathlib.Path):
    nb = jupytext.read(source)
    client = NotebookClient(
        nb,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute(
        env=_kernel_env()
    )  # raises CellExecutionError (with the failing cell and traceback) on failure
    n_asserts = sum(c.source.count("assert ") for c in nb.cells if c.cell_type == "code")
    assert n_asserts >= 5, f"{source.name}: a chapter must check its numeric claims"
