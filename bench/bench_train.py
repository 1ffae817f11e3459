"""Training-step speed and memory against transformers' GPT2LMHeadModel in fp32, on the CPU.

Two shapes:
- ``small``: nanoGPT's character CPU recipe (4 layers x 128, context 64, batch 12, vocabulary 65);
- ``124m``: GPT-2 124M (12 x 768, vocabulary 50257) at batch 4 x 256.

Ours is `gpt2.train.Trainer.train_step` itself: batch loading, forward, backward, clipping,
AdamW, exactly what `gpt2 train` runs. The reference is GPT2LMHeadModel with the same config,
SDPA attention, the same AdamW (same groups, same fused kernel), the same clipping and the same
batches. Steps of the two alternate in one process so that a busy machine slows both alike;
the medians are compared. Ours runs in ``--dtype`` (auto: what `gpt2 train` would pick here);
the reference always runs in fp32, the baseline a CPU user has. MFU is against the median of a
few matrix-product probes in the dtype each side computes in. Peak RSS is measured in a fresh
subprocess per model (peak RSS only grows within a process).

Usage: python bench/bench_train.py [--shape small|124m|both] [--dtype auto|float32|bfloat16]
                                   [--rounds N] [--compile] [--no-rss]
Prints the CPU, the figures, then one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gpt2.assets import fetch
from gpt2.config import GPTConfig, TrainConfig
from gpt2.device import cpu_flags, cpu_has_native_bf16, cpu_name, cpu_peak_flops
from gpt2.loader import Layout, TrainBatches, WindowSequence
from gpt2.metrics import peak_memory_gb
from gpt2.prepare import prepare_text
from gpt2.shards import load_split, read_meta
from gpt2.train import Trainer, build_optimizer

SHAPES = {
    "small": dict(
        tokenizer="char",
        model="char-small",
        batch_size=12,
        overrides={"dropout": 0.0},
        rounds=10,  # rounds of `block` steps of each side in turn
        block=8,
        warmup=5,
        goal_speed=1.4,
    ),
    "124m": dict(
        tokenizer="gpt2",
        model="gpt2",
        batch_size=4,
        overrides={"block_size": 256, "dropout": 0.0},
        rounds=4,
        block=1,
        warmup=2,
        goal_speed=2.0,
    ),
}


def data_dir(tokenizer: str, root: Path) -> Path:
    folder = root / f"shakespeare-{tokenizer}"
    if not (folder / "meta.json").is_file():
        prepare_text(
            fetch("tinyshakespeare/input.txt"), folder, tokenizer=tokenizer, show_progress=False
        )
    return folder


def our_config(
    shape: dict, root: Path, compile_ours: bool = False, dtype: str = "float32"
) -> TrainConfig:
    return TrainConfig(
        compile=compile_ours,
        data=str(data_dir(shape["tokenizer"], root)),
        out_dir=str(root / "out"),
        model=shape["model"],
        batch_size=shape["batch_size"],
        eval_iters=1,
        sample_tokens=0,
        device="cpu",
        dtype=dtype,
        plot=False,
    )


def our_trainer(
    shape: dict, root: Path, compile_ours: bool = False, dtype: str = "float32"
) -> Trainer:
    cfg = our_config(shape, root, compile_ours, dtype)
    return Trainer(cfg, shape["overrides"], show_progress=False)


class HFStep:
    """The reference: one AdamW step of GPT2LMHeadModel on the next batch of ``batches``."""

    def __init__(self, c: GPTConfig, cfg: TrainConfig, batches: TrainBatches) -> None:
        from transformers import GPT2Config, GPT2LMHeadModel

        from gpt2.hf import hf_config

        # The same shape through the exporter's own config, without dropout (as ours runs).
        shape = hf_config(dataclasses.replace(c, dropout=0.0), eot=None)
        config = GPT2Config(**shape, attn_implementation="sdpa")
        torch.manual_seed(0)
        self.model = GPT2LMHeadModel(config).train()
        self.optimizer = build_optimizer(self.model, cfg, torch.device("cpu"))
        self.batches = batches
        self.grad_clip = cfg.grad_clip

    @classmethod
    def beside(cls, trainer: Trainer) -> HFStep:
        """The same shape and settings as ``trainer``, on its own copy of the same batches."""
        batches = TrainBatches(trainer.batches.sequence, trainer.batches.layout)
        return cls(trainer.model.config, trainer.cfg, batches)

    def __call__(self) -> float:
        ((x, y),) = self.batches.next_step()
        logits = self.model(input_ids=x).logits  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


def median_peak(dtype: torch.dtype, n: int = 5) -> float:
    """Median of a few matrix-product probes in ``dtype`` (each the best of several products)."""
    return statistics.median(cpu_peak_flops.__wrapped__(dtype) for _ in range(n))


def compare(
    name: str, root: Path, rounds: int | None, compile_ours: bool = False, dtype: str = "float32"
) -> dict:
    """Rounds of ``block`` steps of each side in turn; per side the median step time over the
    rounds' block means, and the speed ratio as the median of the rounds' ratios (a round's two
    blocks run seconds apart, so a burst of load on the machine mostly cancels out)."""
    shape = SHAPES[name]
    trainer = our_trainer(shape, root, compile_ours, dtype)
    hf = HFStep.beside(trainer)
    tokens = trainer.tokens_per_step
    flops = trainer.flops_per_token
    runs = {"ours": trainer.train_step, "transformers": hf}
    for step in runs.values():
        for _ in range(shape["warmup"]):
            step()
    block: dict[str, list[float]] = {"ours": [], "transformers": []}
    for _ in range(rounds or shape["rounds"]):
        for side, step in runs.items():
            start = time.perf_counter()
            for _ in range(shape["block"]):
                step()
            block[side].append((time.perf_counter() - start) / shape["block"])
    peaks = {"ours": median_peak(trainer.dtype), "transformers": median_peak(torch.float32)}
    out = {
        "shape": name,
        "compiled": compile_ours,
        "dtype": trainer.precision.name,
        "dtype_reason": trainer.precision.reason,
        "tokens_per_step": tokens,
        "peak_gflops": {side: p / 1e9 for side, p in peaks.items()},
    }
    for side, ts in block.items():
        tps = tokens / statistics.median(ts)
        out[side] = {"tokens_per_s": tps, "mfu": tps * flops / peaks[side]}
    ratios = [h / o for o, h in zip(block["ours"], block["transformers"], strict=True)]
    out["speed_ratio"] = statistics.median(ratios)
    out["goal_speed"] = shape["goal_speed"]
    return out


def peak_rss(name: str, side: str, root: Path, dtype: str = "float32") -> float:
    """Peak RSS in GB of a fresh process that builds one side and runs a few steps."""
    here = str(Path(__file__).parent)
    code = (
        f"import sys; sys.path.insert(0, {here!r}); import bench_train as b; "
        f"from pathlib import Path; b.rss_child({name!r}, {side!r}, Path({str(root)!r}), {dtype!r})"
    )
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(done.stderr)
    return float(done.stdout.strip().splitlines()[-1])


def rss_child(name: str, side: str, root: Path, dtype: str = "float32") -> None:
    shape = SHAPES[name]
    if side == "ours":
        step = our_trainer(shape, root, dtype=dtype).train_step
    else:  # the same config and batches, without ever building our model in this process
        folder = data_dir(shape["tokenizer"], root)
        meta = read_meta(folder)
        config = GPTConfig.preset(
            shape["model"], **{**shape["overrides"], "vocab_size": meta["vocab_size"]}
        )
        cfg = our_config(shape, root)
        sequence = WindowSequence(load_split(folder, "train"), config.block_size, cfg.seed)
        step = HFStep(config, cfg, TrainBatches(sequence, Layout(cfg.batch_size)))
    for _ in range(3):
        step()
    print(peak_memory_gb(torch.device("cpu")))


def report(r: dict) -> None:
    how = " (ours compiled)" if r["compiled"] else ""
    print(f"== {r['shape']}{how}: {r['tokens_per_step']} tokens a step")
    print(f"  ours in {r['dtype']} ({r['dtype_reason']}); transformers in float32")
    for side in ("ours", "transformers"):
        s = r[side]
        rss = f", peak RSS {s['peak_rss_gb']:.2f} GB" if "peak_rss_gb" in s else ""
        peak = f"of {r['peak_gflops'][side]:.0f} GFLOP/s"
        print(f"  {side:13s} {s['tokens_per_s']:9.0f} tokens/s  MFU {s['mfu']:.1%} {peak}{rss}")
    rss = f", RSS ratio {r['rss_ratio']:.2f}x (goal <= 0.8x)" if "rss_ratio" in r else ""
    print(f"  speed ratio {r['speed_ratio']:.2f}x (goal >= {r['goal_speed']}x){rss}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=[*SHAPES, "both"], default="both")
    parser.add_argument(
        "--dtype", choices=["auto", "float32", "bfloat16"], default="auto", help="ours only"
    )
    parser.add_argument("--rounds", type=int, default=None, help="measured rounds per side")
    parser.add_argument("--compile", action="store_true", help="also time ours compiled")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak RSS subprocesses")
    args = parser.parse_args()
    names = list(SHAPES) if args.shape == "both" else [args.shape]
    print(f"CPU: {cpu_name()}; bf16 flags: {sorted(cpu_flags() & {'avx512_bf16', 'amx_bf16'})}")
    if args.dtype == "bfloat16" and not cpu_has_native_bf16():
        print("bf16 skipped: this CPU has no native bf16")
        print(json.dumps({"bench": "train", "skipped": "this CPU has no native bf16"}))
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name in names:
            r = compare(name, root, args.rounds, dtype=args.dtype)
            if not args.no_rss:
                for side in ("ours", "transformers"):
                    r[side]["peak_rss_gb"] = peak_rss(name, side, root, args.dtype)
                r["rss_ratio"] = r["ours"]["peak_rss_gb"] / r["transformers"]["peak_rss_gb"]
            results.append(r)
            report(r)
            if args.compile:
                results.append(compare(name, root, args.rounds, True, args.dtype))
                report(results[-1])
    print(json.dumps({"bench": "train", "cpu": cpu_name(), "results": results}))


if __name__ == "__main__":
    main()
