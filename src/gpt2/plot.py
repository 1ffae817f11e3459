"""Loss and learning-rate curves of a run, drawn from its ``metrics.jsonl`` into a PNG.

matplotlib is an optional dependency (``pip install gpt2[plot]``); the figure is drawn through
its object API on the Agg canvas, so no GUI backend and no global pyplot state is involved.
"""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from gpt2.errors import UserError
from gpt2.files import atomic_file, read_lines

METRICS_FILE = "metrics.jsonl"


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics file; a torn last line (a killed run) is skipped. Where a step
    appears twice (a resumed run), the later record wins."""
    by_key: dict[tuple, dict] = {}
    for line in read_lines(path):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "step" in record:
            by_key[(record["step"], "val_loss" in record)] = record
    return sorted(by_key.values(), key=lambda r: r["step"])


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw ``run_dir/metrics.jsonl`` to ``out`` (default ``run_dir/metrics.png``)."""
    run_dir = Path(run_dir)
    path = run_dir / METRICS_FILE if run_dir.is_dir() else run_dir
    if not path.is_file():
        raise UserError(f"no {METRICS_FILE} in {run_dir}: not a training run folder")
    records = read_metrics(path)
    steps = [r for r in records if r.get("loss") is not None]
    evals = [r for r in records if r.get("val_loss") is not None]
    if not steps and not evals:
        raise UserError(f"{path} has no loss records yet")
    out = Path(out) if out else path.with_name("metrics.png")

    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, lr_ax = fig.subplots(1, 2)
    if steps:
        loss_ax.plot(
            [r["step"] for r in steps],
            [r["loss"] for r in steps],
            lw=0.8,
            alpha=0.6,
            label="train (step)",
        )
    for key, style in (("train_loss", "o-"), ("val_loss", "s-")):
        if evals:
            loss_ax.plot(
                [r["step"] for r in evals],
                [r[key] for r in evals],
                style,
                ms=3,
                label=key.replace("_loss", " (eval)"),
            )
    loss_ax.set(xlabel="step", ylabel="loss", title="loss")
    loss_ax.grid(alpha=0.3)
    loss_ax.legend()
    with_lr = [r for r in steps if r.get("lr") is not None]
    lr_ax.plot([r["step"] for r in with_lr], [r["lr"] for r in with_lr], color="tab:green")
    lr_ax.set(xlabel="step", ylabel="learning rate", title="learning rate")
    lr_ax.grid(alpha=0.3)
    fig.suptitle(str(run_dir))

    with atomic_file(out) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    return out
