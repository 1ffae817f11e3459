"""Run the walkthrough notebook the way CI does, and check that the committed copy is clean.

    python scripts/run_notebook.py                 # check, then execute; exit 1 on any failure
    python scripts/run_notebook.py --check-only    # only check that no outputs are committed
    python scripts/run_notebook.py --strip         # remove outputs from the notebook in place

Executing works on a copy with every output removed, in a scratch folder, through nbclient and
the ``python3`` kernel of this interpreter; a cell that raises (every claim in the notebook is an
``assert``) fails the run, and so does a run that takes longer than ``--budget`` seconds.

The kernel runs torch on one thread unless ``--threads`` says otherwise: CI machines are shared,
and on a loaded machine two spinning threads make the notebook's small matrices about ten times
slower than one.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

REPO = Path(__file__).resolve().parents[1]
DEFAULT_NOTEBOOKS = (REPO / "notebooks" / "gpt2_walkthrough.ipynb",)


def dirty_cells(nb: nbformat.NotebookNode) -> list[int]:
    """Indices of the code cells that carry outputs or an execution count."""
    return [
        i
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count"))
    ]


def stripped(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """A copy of ``nb`` with no outputs, execution counts or execution metadata."""
    nb = copy.deepcopy(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        cell.metadata.pop("execution", None)
    return nb


def execute(path: Path, budget: float, threads: int, save_to: Path | None) -> float:
    """Execute a stripped copy of ``path``; return the seconds it took. Raises on a failed cell."""
    nb = stripped(nbformat.read(path, as_version=4))
    # The kernel gets this environment (the asset cache, $GPT2_CACHE_DIR), the thread count, and
    # this interpreter first on PATH: the "python3" kernel is started as `python -m ipykernel_launcher`.
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    with tempfile.TemporaryDirectory(prefix="run-notebook-") as scratch:
        client = NotebookClient(
            nb,
            timeout=max(1, int(budget)),  # no single cell may take the whole budget either
            kernel_name="python3",
            resources={"metadata": {"path": scratch}},
        )
        start = time.perf_counter()
        try:
            client.execute(env=env)
        finally:
            elapsed = time.perf_counter() - start
            if save_to is not None:
                nbformat.write(nb, save_to)
    if elapsed > budget:
        raise TimeoutError(f"{path.name} took {elapsed:.0f}s, over its budget of {budget:.0f}s")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, default=list(DEFAULT_NOTEBOOKS))
    parser.add_argument("--check-only", action="store_true", help="only check for outputs")
    parser.add_argument("--strip", action="store_true", help="remove outputs in place, then exit")
    parser.add_argument(
        "--budget", type=float, default=300.0, help="seconds a notebook may take (default: 300)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads in the kernel (default: 1; 0: torch's default)",
    )
    parser.add_argument(
        "--save-executed", type=Path, help="folder to write the executed copies to, for reading"
    )
    args = parser.parse_args(argv)

    failed = False
    for path in args.notebooks:
        nb = nbformat.read(path, as_version=4)
        if args.strip:
            nbformat.write(stripped(nb), path)
            print(f"{path}: outputs removed")
            continue
        dirty = dirty_cells(nb)
        if dirty:
            print(
                f"{path}: code cells {dirty} have outputs; commit it without them "
                f"(python scripts/run_notebook.py --strip {path})",
                file=sys.stderr,
            )
            failed = True
            continue
        print(f"{path}: no outputs committed")
        if args.check_only:
            continue
        save_to = None
        if args.save_executed:
            args.save_executed.mkdir(parents=True, exist_ok=True)
            save_to = args.save_executed / path.name
        try:
            elapsed = execute(path, args.budget, args.threads, save_to)
        except CellExecutionError as e:
            print(f"{path}: a cell failed:\n{e}", file=sys.stderr)
            failed = True
        except (CellTimeoutError, DeadKernelError, TimeoutError) as e:
            print(f"{path}: {e}", file=sys.stderr)
            failed = True
        else:
            print(f"{path}: ran in {elapsed:.0f}s (budget {args.budget:.0f}s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
