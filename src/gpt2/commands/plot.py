"""``gpt2 plot RUN_DIR``: loss and learning-rate curves of a training run, as a PNG."""

from __future__ import annotations

import argparse
import logging

from gpt2.commands.options import non_empty
from gpt2.errors import UserError

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="draw a run's loss and learning-rate curves to a PNG")
    p.add_argument("run_dir", help="the run's out_dir (it holds metrics.jsonl)")
    p.add_argument("--out", type=non_empty, help="PNG file to write (default: RUN_DIR/metrics.png)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        from gpt2.plot import plot_run
    except ImportError:
        raise UserError("gpt2 plot needs matplotlib: pip install matplotlib") from None
    out = plot_run(args.run_dir, args.out)
    log.info("wrote %s", out)
    return 0
