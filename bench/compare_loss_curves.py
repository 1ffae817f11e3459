"""Training runs' loss curves in one PNG, and how far each is from the last one's.

    python bench/compare_loss_curves.py RUN_A [RUN_B ...] REFERENCE --labels bfloat16 float32 \
        --out docs/images/bf16_vs_fp32_124m.png --after 50

Made for issue 16's quality check: the same model, data order and schedule trained once under
bf16 autocast and once in float32 (`gpt2 train --dtype ...`, `--log-interval 1` so that every
step is logged). The runs read the same batches, so their step losses can be compared step by
step: the difference is what precision changed, not which batch was drawn. A third run, float32
again with another kernel set (``ATEN_CPU_CAPABILITY=avx2``), shows how far two runs drift apart
when only the order of float32 sums differs. Printed, for each run against the last: the largest
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


def gaps(run: list[float], ref: list[float], late: list[int], window: int) -> tuple[float, float]:
    """The largest |run - ref| at the ``late`` positions: of the step losses, of their means."""
    mr, mf = moving_mean(run, window), moving_mean(ref, window)
    return max(abs(run[i] - ref[i]) for i in late), max(abs(mr[i] - mf[i]) for i in late)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "runs", nargs="+", type=Path,
        help="two or more run folders (each with metrics.jsonl); the last is the reference",
    )  # fmt: skip
    ap.add_argument("--labels", nargs="+", default=None, help="names for the runs")
    ap.add_argument("--out", type=Path, required=True, help="the PNG to write")
    ap.add_argument("--after", type=int, default=50, help="compare the steps after this one")
    ap.add_argument("--window", type=int, default=10, help="steps in the moving mean")
    args = ap.parse_args()
    if len(args.runs) < 2:
        raise SystemExit("give two or more run folders")
    for run in args.runs:
        if not (run / METRICS_FILE).is_file():
            raise SystemExit(f"no {METRICS_FILE} in {run}: not a training run folder")
    labels = args.labels or [r.name for r in args.runs]
    if len(labels) != len(args.runs):
        raise SystemExit(f"{len(labels)} labels for {len(args.runs)} runs")
    logged = [step_losses(r) for r in args.runs]
    ref, ref_label = logged[-1], labels[-1]
    vals = [val_losses(r) for r in args.runs]
    # Each run against the reference on the steps both logged (a shorter run ends sooner).
    shared = [sorted(set(run) & set(ref)) for run in logged]
    if not all(shared):
        raise SystemExit("a run shares no logged step with the reference")

    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    curves, gap = fig.subplots(1, 2)
    result = {"bench": "loss_curves", "labels": labels, "after": args.after, "window": args.window}
    result["runs"] = {}
    print(f"reference: {ref_label}")
    for run, steps, label, val in zip(logged, shared, labels, vals, strict=True):
        ys = [run[s] for s in steps]
        line = curves.plot(steps, ys, lw=0.6, alpha=0.35)[0]
        curves.plot(steps, moving_mean(ys, args.window), lw=1.4, color=line.get_color(), label=f"{label} ({args.window}-step mean)")  # fmt: skip
        if run is ref:
            continue
        ref_ys = [ref[s] for s in steps]
        diff = moving_mean([x - y for x, y in zip(ys, ref_ys, strict=True)], args.window)
        gap.plot(steps, diff, lw=1.4, color=line.get_color(), label=f"{label} - {ref_label}")
        late = [i for i, s in enumerate(steps) if s > args.after]
        raw, smooth = gaps(ys, ref_ys, late, args.window)
        print(f"{label}: steps {steps[0]}..{steps[-1]}; largest |difference| after step {args.after}: step losses {raw:.4f}, {args.window}-step means {smooth:.4f}")  # fmt: skip
        both = sorted(set(val) & set(vals[-1]))
        for s in both:
            print(f"  val loss at step {s}: {label} {val[s]:.4f}, {ref_label} {vals[-1][s]:.4f}, difference {val[s] - vals[-1][s]:+.4f}")  # fmt: skip
        result["runs"][label] = {"last_step": steps[-1], "max_abs_diff_step": raw, "max_abs_diff_mean": smooth}  # fmt: skip
        result["runs"][label]["val"] = {s: [val[s], vals[-1][s]] for s in both}
    curves.set(xlabel="step", ylabel="train loss", title="loss per step")
    curves.legend()
    gap.axhline(0, color="black", lw=0.5)
    gap.axvline(args.after, color="grey", lw=0.5, ls="--")
    gap.set(xlabel="step", ylabel=f"difference ({args.window}-step mean)", title=f"against {ref_label}")  # fmt: skip
    gap.legend()
    with atomic_file(args.out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    print(f"wrote {args.out}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
