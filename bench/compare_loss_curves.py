"""Two training runs' loss curves in one PNG, and how far apart they are.

    python bench/compare_loss_curves.py RUN_A RUN_B --labels bfloat16 float32 \
        --out docs/images/bf16_vs_fp32_124m.png --after 50

Made for issue 16's quality check: the same model, data order and schedule trained once under
bf16 autocast and once in float32 (`gpt2 train --dtype ...`, `--log-interval 1` so that every
step is logged). Both runs read the same batches, so their step losses can be compared step by
step: the difference is what precision changed, not which batch was drawn. Printed: the largest
difference of the step losses after step ``--after``, the same for their means over
``--window`` steps (a step loss on a small batch swings by more than precision moves it), the
val losses at each estimate, and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from gpt2.files import atomic_file  # noqa: E402
from gpt2.plot import METRICS_FILE, read_metrics  # noqa: E402


def step_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / METRICS_FILE) if "loss" in r}


def val_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in read_metrics(run / METRICS_FILE) if "val_loss" in r}


def moving_mean(values: list[float], window: int) -> list[float]:
    """Mean of the last ``window`` values at each position (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs=2, type=Path, help="two run folders (each with metrics.jsonl)")
    ap.add_argument("--labels", nargs=2, default=None, help="names for the two runs")
    ap.add_argument("--out", type=Path, required=True, help="the PNG to write")
    ap.add_argument("--after", type=int, default=50, help="compare the steps after this one")
    ap.add_argument("--window", type=int, default=10, help="steps in the moving mean")
    args = ap.parse_args()
    for run in args.runs:
        if not (run / METRICS_FILE).is_file():
            raise SystemExit(f"no {METRICS_FILE} in {run}: not a training run folder")
    labels = args.labels or [r.name for r in args.runs]
    a, b = (step_losses(r) for r in args.runs)
    steps = sorted(set(a) & set(b))
    if not steps:
        raise SystemExit("the two runs share no logged step")
    la, lb = [a[s] for s in steps], [b[s] for s in steps]
    ma, mb = moving_mean(la, args.window), moving_mean(lb, args.window)
    late = [i for i, s in enumerate(steps) if s > args.after]
    raw = max(abs(la[i] - lb[i]) for i in late)
    smooth = max(abs(ma[i] - mb[i]) for i in late)
    va, vb = (val_losses(r) for r in args.runs)

    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    curves, gap = fig.subplots(1, 2)
    for losses, means, label in ((la, ma, labels[0]), (lb, mb, labels[1])):
        line = curves.plot(steps, losses, lw=0.6, alpha=0.35)[0]
        curves.plot(steps, means, lw=1.4, color=line.get_color(), label=f"{label} ({args.window}-step mean)")  # fmt: skip
    curves.set(xlabel="step", ylabel="train loss", title="loss per step")
    curves.legend()
    gap.plot(steps, [x - y for x, y in zip(la, lb, strict=True)], lw=0.6, alpha=0.5, label="step")
    gap.plot(steps, [x - y for x, y in zip(ma, mb, strict=True)], lw=1.4, label=f"{args.window}-step mean")  # fmt: skip
    gap.axhline(0, color="black", lw=0.5)
    gap.axvline(args.after, color="grey", lw=0.5, ls="--")
    gap.set(xlabel="step", ylabel=f"{labels[0]} - {labels[1]}", title="difference")
    gap.legend()
    with atomic_file(args.out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)

    print(f"steps compared: {len(steps)} ({steps[0]}..{steps[-1]})")
    print(f"largest |difference| after step {args.after}: step losses {raw:.4f}, {args.window}-step means {smooth:.4f}")  # fmt: skip
    for s in sorted(set(va) & set(vb)):
        print(f"val loss at step {s}: {labels[0]} {va[s]:.4f}, {labels[1]} {vb[s]:.4f}, difference {va[s] - vb[s]:+.4f}")  # fmt: skip
    print(f"wrote {args.out}")
    result = {"bench": "loss_curves", "labels": labels, "after": args.after, "window": args.window}
    result |= {"max_abs_diff_step": raw, "max_abs_diff_mean": smooth}
    result["val"] = {s: [va[s], vb[s]] for s in sorted(set(va) & set(vb))}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
