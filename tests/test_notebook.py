"""The walkthrough notebook: committed without outputs, and (slow) it runs top to bottom.

CI executes it with `make notebook` (scripts/run_notebook.py); the slow test here does the same
for a developer who wants it from pytest: ``pytest tests/test_notebook.py -m slow``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "gpt2_walkthrough.ipynb"

nbformat = pytest.importorskip("nbformat")


def _runner():
    """scripts/run_notebook.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(
        "run_notebook", REPO / "scripts" / "run_notebook.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert _runner().dirty_cells(nb) == []
    assert any(cell.cell_type == "code" for cell in nb.cells)


def test_notebook_imports_the_package_and_checks_its_claims():
    """Every import is from gpt2 or a listed library, and the claims are asserted."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = "\n".join(cell.source for cell in nb.cells if cell.cell_type == "code")
    allowed = {
        "gpt2",
        "math",
        "tempfile",
        "time",
        "pathlib",
        "warnings",
        "matplotlib",
        "numpy",
        "torch",
        "IPython",
    }
    for line in code.splitlines():
        if line.startswith(("import ", "from ")):
            assert line.split()[1].split(".")[0] in allowed, line
    assert code.count("assert ") >= 30


def test_strip_removes_outputs(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    cell = next(c for c in nb.cells if c.cell_type == "code")
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="hello\n")]
    cell.execution_count = 3
    path = tmp_path / "dirty.ipynb"
    nbformat.write(nb, path)
    runner = _runner()
    assert runner.main([str(path), "--check-only"]) == 1
    assert runner.main([str(path), "--strip"]) == 0
    assert runner.main([str(path), "--check-only"]) == 0


@pytest.mark.slow
def test_notebook_runs(asset_cache):
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    assert _runner().main([str(NOTEBOOK), "--budget", "300"]) == 0, "see the failing cell above"
