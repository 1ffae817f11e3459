"""The quality bar of the built-in demo: `gpt2 train` with no options (nanoGPT's character CPU
recipe on TinyShakespeare, 2000 steps) must reach a val loss of at most 1.90.

Runs the recipe exactly as the command does (the defaults of `TrainConfig`), in a temporary
out_dir, and prints the wall time, ms per step, tokens/s and the final losses.

Usage: python bench/bench_quality.py [--max-iters N] [--threads N]
Prints the figures, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile

from gpt2.config import TrainConfig
from gpt2.train import Trainer

VAL_LOSS_BAR = 1.90


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-iters", type=int, default=TrainConfig().max_iters)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(
            out_dir=out, max_iters=args.max_iters, num_threads=args.threads, plot=False
        )
        result = Trainer(cfg, show_progress=False).run()
    finished = result.step == args.max_iters and not result.stopped_by
    ok = finished and result.val_loss <= VAL_LOSS_BAR
    print(f"steps          {result.step}" + ("" if finished else " (STOPPED EARLY)"))
    print(f"wall time      {result.wall_s:.1f} s (training and evaluation)")
    print(f"per step       {result.ms_per_iter:.1f} ms, {result.tokens_per_s:.0f} tokens/s")
    print(f"train loss     {result.train_loss:.4f}")
    print(
        f"val loss       {result.val_loss:.4f} (bar: <= {VAL_LOSS_BAR}) {'ok' if ok else 'MISSED'}"
    )
    record = {
        "bench": "quality",
        "steps": result.step,
        "finished": finished,
        "wall_s": result.wall_s,
        "ms_per_iter": result.ms_per_iter,
        "tokens_per_s": result.tokens_per_s,
        "train_loss": result.train_loss,
        "val_loss": result.val_loss,
        "val_loss_bar": VAL_LOSS_BAR,
        "ok": ok,
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
