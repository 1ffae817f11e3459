"""The GPU path in one command: correctness on CUDA, GPT-2 124M training speed and MFU against
transformers, decoding speed against transformers' generate. About 7 minutes on one H100/H200.

Three parts, each in its own process with its own time limit, so that a crash, a hang or a
compile that runs long costs that part only; every step inside a part is a check of its own (a
step that raises records False and its traceback, and the part goes on):

- ``correctness``: ``pytest -m cuda tests/test_cuda.py`` (parity with transformers in fp32,
  cached greedy = cache-free, bf16 training, fp16 + scaler SIGKILL/resume, ``--compile`` with
  evaluation and sampling, its checkpoint's names, torchrun DDP/FSDP2, ``gpt2 serve``); one check
  per test: true, false, or "skipped" (without a GPU);
- ``train``: GPT-2 124M at T=1024 exactly as ``gpt2 train --config gpt2_124m_fineweb_edu`` runs it
  (`Trainer.train_step`: bf16 autocast, ``torch.compile``, fused AdamW, padded vocabulary), the
  largest micro-batch of 64/32/16 that fits, 30 timed steps after warm-up: tokens/s, MFU against
  the bf16 dense peak of `gpt2.metrics`' table, peak memory; whether SDPA ran the flash kernel
  (a profiled step); transformers' GPT2LMHeadModel (SDPA, bf16 autocast, compiled, the same fused
  AdamW and batches) side by side; the hours the FineWeb-Edu config needs on 1 and 8 GPUs;
- ``decode``: random gpt2-shaped weights in bf16, a 32-token prompt, 128 greedy tokens at batch 1
  and 32, ours (`gpt2.generate.generate`) against transformers' ``generate``; a profiled decode
  to say what limits it (the GPU's busy share of a step, kernels per token); a compiled decode step.

Writes ``bench/results/gpu-<device>-<date>.json`` ("device", "torch", "checks", "figures",
"goals", ...), prints a summary last, exits 1 if a check is false (goals such as MFU >= 0.5 are
reported, not checks). The dry run, ``--device cpu --quick``, runs every step on tiny shapes in
well under 2 minutes (compiling with ``aot_eager``: inductor's C++ build alone takes minutes on a
small CPU); tests/test_gpu_check.py runs it.

Usage: python bench/gpu_check.py [--device cuda|cpu] [--quick] [--parts train,decode]
       [--results-dir bench/results] [--out-dir DIR]
The device machine: see bench/NOTES.md ("GPU check") for the one `run` command.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
PARTS = ("correctness", "train", "decode", "decode_compiled")
EXPERIMENTS = {"decode_compiled"}  # figures only: a crash or a time-out there fails no check
# Seconds per part: on one H100/H200 (the whole run must stay under 8 minutes), and in the dry run.
BUDGET_S = {
    "gpu": {"correctness": 190, "train": 175, "decode": 60, "decode_compiled": 45},
    # Generous: they catch a hang; the dry run itself takes about a minute on two idle cores.
    "quick": {"correctness": 60, "train": 90, "decode": 60, "decode_compiled": 30},
}
TOTAL_S = {"gpu": 470, "quick": 240}  # the parent's own start and summary take seconds
FINEWEB_CONFIG = "gpt2_124m_fineweb_edu"
GOALS = {"mfu": 0.50, "train_speed_ratio": 1.3, "decode_speed_ratio_batch1": 2.0}

# Part settings: the real shapes on a GPU, tiny ones for the dry run.
TRAIN = {
    "gpu": dict(overrides={"dropout": 0.0}, batches=(64, 32, 16), warmup=5, steps=30),
    "quick": dict(
        overrides={"dropout": 0.0, "n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64},
        batches=(4, 2),
        warmup=1,
        steps=2,
    ),
}
DECODE = {
    "gpu": dict(overrides={}, batches=(1, 32), prompt=32, new_tokens=128, reps=3),
    "quick": dict(
        overrides={"n_layer": 2, "n_head": 2, "n_embd": 64},
        batches=(1, 4),
        prompt=8,
        new_tokens=16,
        reps=1,
    ),
}


# --- what a part records --------------------------------------------------------------------


class Record:
    """A part's checks (name -> True, False or "skipped"), figures and errors, rewritten to its
    file after every change: a part stopped at its time limit leaves what it had found."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {"checks": {}, "figures": {}, "errors": {}, "env": {}}
        self.save()

    def check(self, name: str, value: bool | str) -> None:
        self.data["checks"][name] = value
        self.save()

    def figure(self, key: str, value: Any) -> None:
        self.data["figures"][key] = value
        self.save()

    def save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str), encoding="utf-8")
        os.replace(tmp, self.path)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        """The block as one check: True if it finishes (unless it set the check itself), False
        with its traceback if it raises. Either way the part goes on."""
        print(f"  . {name}", flush=True)
        try:
            yield
        except Exception:
            text = traceback.format_exc()
            print(text, flush=True)
            self.data["errors"][name] = text[-4000:]
            self.check(name, False)
        else:
            if name not in self.data["checks"]:
                self.check(name, True)


class Context:
    """The device, the shapes (full or quick), a scratch folder and the part's deadline."""

    def __init__(self, args: argparse.Namespace, scratch: Path) -> None:
        import torch

        self.device = torch.device(args.device)
        self.quick = args.quick
        self.mode = "quick" if args.quick else "gpu"
        self.scratch = scratch
        self.deadline = args.deadline or math.inf
        self.cuda = self.device.type == "cuda"

    def left(self) -> float:
        return self.deadline - time.time()

    def sync(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()

    def free(self) -> None:
        """Release what a failed or finished try held: objects, cached blocks, compiled graphs."""
        import torch

        gc.collect()
        torch._dynamo.reset()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_memory_gb(self) -> float | None:
        import torch

        return torch.cuda.max_memory_allocated() / 1e9 if self.cuda else None


def environment(device: str) -> dict[str, Any]:
    import torch

    env = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "device": f"cpu {platform.machine()}",
    }
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = None
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        env["device"] = torch.cuda.get_device_name(0)
        env["device_memory_gb"] = round(props.total_memory / 1e9, 1)
        env["multiprocessors"] = props.multi_processor_count
        env["driver_capability"] = f"{props.major}.{props.minor}"
    return env


def gpt2_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "gpt2", *args], capture_output=True, text=True, timeout=timeout
    )
    if done.returncode:
        raise RuntimeError(f"gpt2 {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
    return done


def is_out_of_memory(e: BaseException) -> bool:
    return "out of memory" in str(e).lower()


def median_time(run: Callable[[], Any], reps: int, sync: Callable[[], None]) -> float:
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --- correctness: the cuda-marked tests ------------------------------------------------------


def part_correctness(rec: Record, ctx: Context) -> None:
    """``pytest -m cuda tests/test_cuda.py``; each test's outcome as a check of its own."""
    results = ctx.scratch / "pytest.jsonl"
    env = {**os.environ, "GPT2_PYTEST_RESULTS": str(results)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(BENCH), env.get("PYTHONPATH")) if p)
    command = [sys.executable, "-m", "pytest", "tests/test_cuda.py", "-m", "cuda"]
    command += ["-p", "pytest_results", "-p", "no:cacheprovider", "-q", "-rfEs"]
    with rec.step("cuda/pytest_finished"):
        proc = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True)
        # Its own process group (with every training, torchrun and server process it starts):
        # the parent ends the group too, should this process be stopped at its time limit.
        rec.data["process_groups"] = [proc.pid]
        rec.save()
        try:
            code = proc.wait(timeout=max(10.0, ctx.left() - 5))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise RuntimeError("pytest did not finish within the part's time limit") from None
        rec.figure("pytest_exit_code", code)
        if code not in (0, 1):  # 1: some test failed (recorded below); else pytest itself broke
            raise RuntimeError(f"pytest exited with {code}")
    outcomes = test_outcomes(results)
    if not outcomes:
        rec.check("cuda/tests_collected", False)
    for test, (value, properties, error) in outcomes.items():
        rec.check(f"cuda/{test}", value)
        if properties:
            rec.figure(test, properties)
        if error:
            rec.data["errors"][f"cuda/{test}"] = error
    rec.save()


def test_outcomes(path: Path) -> dict[str, tuple[bool | str, dict, str]]:
    """Per test: True (passed), False (failed, errored, or never finished) or "skipped", its
    recorded properties, and the error text."""
    phases: dict[str, dict[str, dict]] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            phases.setdefault(r["test"], {})[r["when"]] = r
    out = {}
    for test, p in phases.items():
        props = {k: v for r in p.values() for k, v in r["properties"].items()}
        errors = "\n".join(r.get("error", "") for r in p.values() if r["outcome"] == "failed")
        if errors:
            value: bool | str = False
        elif any(r["outcome"] == "skipped" for r in p.values()):
            value = "skipped"
        else:
            value = p.get("call", {}).get("outcome") == "passed" and "teardown" in p
        out[test] = (value, props, errors[-4000:])
    return out


# --- training speed --------------------------------------------------------------------------


class HFTrainStep:
    """The reference: GPT2LMHeadModel (SDPA) of our model's shape, compiled, under the same
    autocast, with the same fused AdamW groups and clipping, one step per call on given batches."""

    def __init__(self, like: dict[str, Any], batches: list[tuple[Any, Any]]) -> None:
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel

        from gpt2.hf import hf_config
        from gpt2.train import build_optimizer

        c = like["config"]
        # The same shape through the exporter's own config, without dropout (as ours runs).
        shape = hf_config(dataclasses.replace(c, dropout=0.0), eot=None)
        config = GPT2Config(**shape, attn_implementation="sdpa")
        torch.manual_seed(0)
        self.device, self.dtype = like["device"], like["dtype"]
        self.model = GPT2LMHeadModel(config).to(self.device).train()
        self.optimizer = build_optimizer(self.model, like["cfg"], self.device)
        self.compiled = torch.compile(self.model)
        self.batches, self.i = batches, 0
        self.grad_clip = like["cfg"].grad_clip

    def __call__(self) -> float:
        import torch
        import torch.nn.functional as F

        x, y = self.batches[self.i % len(self.batches)]
        self.i += 1
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        autocast = (
            torch.autocast(self.device.type, dtype=self.dtype)
            if self.dtype != torch.float32
            else contextlib.nullcontext()
        )
        with autocast:
            logits = self.compiled(input_ids=x).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


def our_trainer(ctx: Context, data: Path, batch: int) -> Any:
    """`gpt2 train --config gpt2_124m_fineweb_edu`'s settings for speed, on the prepared data."""
    from gpt2.config import TrainConfig
    from gpt2.train import Trainer

    cfg = TrainConfig(
        data=str(data),
        out_dir=str(ctx.scratch / "train-out"),
        model="gpt2",
        batch_size=batch,
        pad_vocab=True,
        compile=True,
        dtype="bfloat16" if ctx.cuda else "float32",
        device=str(ctx.device),
        max_iters=10**6,
        warmup_iters=10,
        learning_rate=6e-4,
        min_lr=6e-5,
        beta2=0.95,
        eval_iters=1,
        sample_tokens=0,
        plot=False,
    )
    return Trainer(cfg, TRAIN[ctx.mode]["overrides"], show_progress=False)


def fit_batch(
    ctx: Context, build: Callable[[int], Any], step_of: Callable[[Any], Callable], batches
) -> tuple[Any, int, list[dict]]:
    """The first micro-batch of ``batches`` (largest first) whose warm-up steps run: the object
    built for it, the batch, and what was tried (batch, fits, warm-up seconds)."""
    tried = []
    warmup = TRAIN[ctx.mode]["warmup"]
    for batch in batches:
        obj = step = None
        start = time.perf_counter()
        try:
            obj = build(batch)
            step = step_of(obj)
            for _ in range(warmup):  # the first step compiles
                step()
            ctx.sync()
            tried.append({"batch": batch, "fits": True, "warmup_s": time.perf_counter() - start})
            print(f"    batch {batch} fits; warm-up {tried[-1]['warmup_s']:.1f} s", flush=True)
            return obj, batch, tried
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            tried.append({"batch": batch, "fits": False})
            print(f"    batch {batch}: out of memory", flush=True)
        # Out of the handler: its traceback (and the frames holding activations) is gone now.
        obj = step = None
        ctx.free()
    raise RuntimeError(f"no micro-batch of {batches} fits")


def timed_steps(ctx: Context, step: Callable[[], float], n: int) -> dict[str, Any]:
    losses, times = [], []
    for _ in range(n):
        start = time.perf_counter()
        out = step()  # our train_step's StepStats, or the reference's loss
        losses.append(float(getattr(out, "loss", out)))
        ctx.sync()
        times.append(time.perf_counter() - start)
    return {"losses": losses, "step_s": times, "total_s": sum(times)}


def flash_kernel_ran(ctx: Context, step: Callable[[], Any]) -> tuple[bool, list[str]]:
    """Profile one step: did an attention kernel of the flash family run? (Its names.)"""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.cuda else [])
    with profile(activities=activities) as prof:
        step()
        ctx.sync()
    names = sorted({e.key for e in prof.key_averages()})
    attention = [n for n in names if "attention" in n.lower() or "flash" in n.lower()]
    return any("flash" in n.lower() for n in attention), attention[:12]


def fineweb_tokens() -> int:
    """Tokens the packaged FineWeb-Edu config trains on: steps x tokens per step."""
    from gpt2.commands.train import config_path
    from gpt2.config import load_toml

    values = load_toml(config_path(FINEWEB_CONFIG))
    return int(values["max_iters"]) * int(values["total_batch_tokens"])


def part_train(rec: Record, ctx: Context) -> None:
    from gpt2.metrics import peak_flops

    settings = TRAIN[ctx.mode]
    data = ctx.scratch / "data-gpt2"
    with rec.step("train/data_prepared"):
        gpt2_cli("-q", "prepare", "--tokenizer", "gpt2", "--out", str(data))
    precision = "bfloat16" if ctx.cuda else "float32"
    peak = peak_flops(ctx.device, precision)
    rec.figure("peak_tflops", peak / 1e12 if peak else None)
    ours: dict[str, Any] = {}
    hf_batches: list = []
    like: dict[str, Any] = {}  # what the reference copies from ours: shape, settings, device
    trainer = None
    with rec.step("train/ours"):
        ctx.free()
        trainer, batch, tried = fit_batch(
            ctx,
            lambda b: our_trainer(ctx, data, b),
            lambda t: t.train_step,
            settings["batches"],
        )
        like = {"config": trainer.model.config, "cfg": trainer.cfg}
        like.update(device=trainer.device, dtype=trainer.dtype)
        block = trainer.model.config.block_size
        fused = trainer.optimizer.defaults.get("fused")
        rec.check("train/fused_adamw", bool(fused))
        # The reference trains on the same windows: drawn now, before ours' timed steps.
        for _ in range(settings["warmup"] + settings["steps"]):
            hf_batches.append(next(iter(trainer.batches.next_step())))
        run = timed_steps(ctx, trainer.train_step, settings["steps"])
        tokens = batch * block * settings["steps"]
        tps = tokens / run["total_s"]
        ours = {
            "batch_size": batch,
            "block_size": block,
            "vocab_size": trainer.model.config.vocab_size,
            "dtype": str(trainer.dtype).removeprefix("torch."),
            "compiled": True,
            "fused_adamw": fused,
            "tried": tried,
            "timed_steps": settings["steps"],
            "tokens_per_s": tps,
            "ms_per_step_median": 1e3 * statistics.median(run["step_s"]),
            "mfu": tps * trainer.flops_per_token / peak if peak else None,
            "flops_per_token": trainer.flops_per_token,
            "peak_memory_gb": ctx.peak_memory_gb(),
            "first_loss": run["losses"][0],
            "last_loss": run["losses"][-1],
        }
        if not all(math.isfinite(v) for v in run["losses"]):
            raise RuntimeError(f"non-finite loss in ours' timed steps: {run['losses']}")
        rec.figure("ours", ours)
        total = fineweb_tokens()
        rec.figure(
            "fineweb_edu_hours",
            {
                "tokens": total,
                "1_gpu": total / tps / 3600,
                "8_gpus_if_linear": total / (8 * tps) / 3600,
            },
        )
        print(
            f"    ours: {tps:,.0f} tokens/s at batch {batch}, MFU "
            f"{ours['mfu'] if ours['mfu'] is not None else float('nan'):.1%}, "
            f"peak {ours['peak_memory_gb'] or 0:.1f} GB",
            flush=True,
        )
    if trainer is not None:
        with rec.step("train/flash_sdpa"):
            ran, names = flash_kernel_ran(ctx, trainer.train_step)
            rec.figure("attention_kernels", names)
            rec.check("train/flash_sdpa", ran)
    del trainer
    ctx.free()
    with rec.step("train/transformers"):
        if not ours:
            raise RuntimeError("ours did not run: no batch to compare at")
        sizes = [ours["batch_size"], ours["batch_size"] // 2]  # half, should it need more memory
        hf, batch, tried = fit_batch(
            ctx,
            lambda b: HFTrainStep(like, [_half(xy, b) for xy in hf_batches]),
            lambda h: h,
            [s for s in sizes if s >= 1],
        )
        run = timed_steps(ctx, hf, settings["steps"])
        tps = batch * ours["block_size"] * settings["steps"] / run["total_s"]
        theirs = {
            "batch_size": batch,
            "tried": tried,
            "tokens_per_s": tps,
            "ms_per_step_median": 1e3 * statistics.median(run["step_s"]),
            "mfu": tps * ours["flops_per_token"] / peak if peak else None,
            "peak_memory_gb": ctx.peak_memory_gb(),
            "first_loss": run["losses"][0],
            "last_loss": run["losses"][-1],
        }
        rec.figure("transformers", theirs)
        rec.figure("speed_ratio", ours["tokens_per_s"] / tps)
        print(f"    transformers: {tps:,.0f} tokens/s at batch {batch}", flush=True)
        del hf
    ctx.free()


def _half(xy: tuple[Any, Any], batch: int) -> tuple[Any, Any]:
    x, y = xy
    return x[:batch], y[:batch]


# --- decoding --------------------------------------------------------------------------------


def decode_models(ctx: Context, with_transformers: bool = True) -> dict[str, Any]:
    """Random gpt2-shaped weights (bf16 on a GPU), ours in the layout `gpt2 sample` and `gpt2
    serve` decode with, and the same values in transformers' GPT2LMHeadModel (SDPA)."""
    import torch

    from gpt2.config import GPTConfig
    from gpt2.hf import save_pretrained
    from gpt2.model import GPT

    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    config = GPTConfig.preset(
        "gpt2", vocab_size=50257, dropout=0.0, **DECODE[ctx.mode]["overrides"]
    )
    torch.manual_seed(0)
    model = GPT(config).eval()
    models = {}
    if with_transformers:
        from transformers import GPT2LMHeadModel

        folder = ctx.scratch / "hf-decode"
        save_pretrained(model, folder)
        hf = GPT2LMHeadModel.from_pretrained(folder, attn_implementation="sdpa")
        models["transformers"] = hf.to(ctx.device, dtype).eval()
    model = model.to(ctx.device, dtype)
    try:
        from gpt2.decode_layout import prepare_for_decoding

        model = prepare_for_decoding(model)
    except ImportError:  # moved: the model as built
        pass
    models["ours"] = model.eval()
    return models


def part_decode(rec: Record, ctx: Context) -> None:
    import torch

    from gpt2.generate import generate

    settings = DECODE[ctx.mode]
    rec.figure("dtype", "bfloat16" if ctx.cuda else "float32")
    models: dict[str, Any] = {}
    with rec.step("decode/models"):
        models = decode_models(ctx)
    if not models:
        return
    new = settings["new_tokens"]
    g = torch.Generator().manual_seed(1)

    def ours(idx: torch.Tensor, n: int = new) -> torch.Tensor:
        return generate(models["ours"], idx, n, temperature=0.0)

    def theirs(idx: torch.Tensor, n: int = new) -> torch.Tensor:
        with torch.no_grad():
            return models["transformers"].generate(
                input_ids=idx,
                attention_mask=torch.ones_like(idx),
                max_new_tokens=n,
                min_new_tokens=n,  # exactly n tokens, as ours: end-of-text never stops a row
                do_sample=False,
                pad_token_id=0,
            )

    for batch in settings["batches"]:
        with rec.step(f"decode/batch_{batch}"):
            idx = torch.randint(0, 50257, (batch, settings["prompt"]), generator=g)
            idx = idx.to(ctx.device)
            ours(idx, 4), theirs(idx, 4)  # warm-up: kernels, caches, allocator
            figures: dict[str, Any] = {"new_tokens": new, "prompt_tokens": settings["prompt"]}
            for side, run in (("ours", ours), ("transformers", theirs)):
                seconds = median_time(lambda r=run, i=idx: r(i), settings["reps"], ctx.sync)
                figures[side] = {
                    "seconds": seconds,
                    "tokens_per_s": batch * new / seconds,
                    "ms_per_token": 1e3 * seconds / new,
                }
            figures["speed_ratio"] = figures["transformers"]["seconds"] / figures["ours"]["seconds"]
            a, b = ours(idx).tolist(), theirs(idx).tolist()
            figures["rows_identical"] = sum(x == y for x, y in zip(a, b, strict=True)) / batch
            rec.figure(f"batch_{batch}", figures)
            print(
                f"    batch {batch}: ours {figures['ours']['tokens_per_s']:,.0f} tokens/s, "
                f"transformers {figures['transformers']['tokens_per_s']:,.0f} "
                f"({figures['speed_ratio']:.2f}x)",
                flush=True,
            )
    with rec.step("decode/profile"):
        rec.figure("limit", decode_limit(ctx, ours, rec.data["figures"].get("batch_1")))


def part_decode_compiled(rec: Record, ctx: Context) -> None:
    """An experiment, not a check (a part whose time limit fails nothing): batch 1 with the
    model's forward compiled (dynamic shapes: the cache grows every step), against eager."""
    import torch

    from gpt2.generate import generate

    settings = DECODE[ctx.mode]
    new = settings["new_tokens"]
    model = decode_models(ctx, with_transformers=False)["ours"]
    idx = torch.randint(
        0, 50257, (1, settings["prompt"]), generator=torch.Generator().manual_seed(1)
    )
    idx = idx.to(ctx.device)

    def run() -> torch.Tensor:
        return generate(model, idx, new, temperature=0.0)

    run()
    eager = median_time(run, settings["reps"], ctx.sync)
    rec.figure("eager_ms_per_token", 1e3 * eager / new)
    try:
        model.forward = torch.compile(model.forward, dynamic=True)
        start = time.perf_counter()
        run()  # compiles, and recompiles where a guard on the cache fails
        ctx.sync()
        rec.figure("warmup_s", time.perf_counter() - start)
        seconds = median_time(run, settings["reps"], ctx.sync)
        rec.figure("ms_per_token", 1e3 * seconds / new)
        rec.figure("speedup_over_eager", eager / seconds)
    except Exception as e:
        rec.figure("error", f"{type(e).__name__}: {str(e)[:500]}")


def decode_limit(ctx: Context, ours: Callable, timed: dict | None) -> dict[str, Any]:
    """What limits a decode step: the GPU's busy share of it (kernel time over wall time, from a
    profiled run) and the kernel launches per token. Low busy share: launches and Python."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    n = 16
    idx = torch.randint(0, 50257, (1, 8)).to(ctx.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.cuda else [])
    with profile(activities=activities) as prof:
        ours(idx, n)
        ctx.sync()
    kernels = [
        e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
    ]  # empty on the CPU
    out: dict[str, Any] = {"profiled_tokens": n}
    if not ctx.cuda:
        out["reading"] = "no GPU: nothing to read"
        return out
    out["kernels_per_token"] = len(kernels) / n
    if kernels and timed:
        busy_us = sum(e.time_range.elapsed_us() for e in kernels) / n
        out["kernel_us_per_token"] = busy_us
        out["gpu_busy_share"] = busy_us / (1e3 * timed["ours"]["ms_per_token"])
        out["reading"] = (
            "launch and Python overhead: the GPU idles between small kernels"
            if out["gpu_busy_share"] < 0.5
            else "the kernels themselves"
        )
    return out


# --- the parent: run the parts, merge, report ---------------------------------------------------

PART_FUNCTIONS = {
    "correctness": part_correctness,
    "train": part_train,
    "decode": part_decode,
    "decode_compiled": part_decode_compiled,
}


def run_part(args: argparse.Namespace) -> int:
    """Child mode: one part, recorded in ``--part-file``."""
    import torch

    if args.compile_backend != "inductor":  # the dry run: trace, but build no C++
        real = torch.compile

        def compile_with_backend(model=None, **kwargs):
            kwargs["backend"] = args.compile_backend
            kwargs.pop("mode", None)
            return real(model, **kwargs)

        torch.compile = compile_with_backend
    if args.device == "cpu":
        # Tiny shapes, where more threads only spin-wait on each other (see tests/conftest.py).
        torch.set_num_threads(1)
    rec = Record(Path(args.part_file))
    rec.data["env"] = environment(args.device)
    rec.save()
    if args.inject_failure == args.part:
        raise RuntimeError("failure injected by --inject-failure")
    with tempfile.TemporaryDirectory(prefix=f"gpu-check-{args.part}-") as tmp:
        ctx = Context(args, Path(tmp))
        if ctx.cuda:
            torch.backends.cuda.matmul.allow_tf32 = True
        PART_FUNCTIONS[args.part](rec, ctx)
    return 0


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def goals(figures: dict[str, Any], cuda: bool) -> dict[str, Any]:
    """The issue's targets, measured (None where the figure is missing or, for MFU, off a GPU)."""
    train, decode = figures.get("train", {}), figures.get("decode", {})
    mfu = train.get("ours", {}).get("mfu")
    ratio = train.get("speed_ratio")
    decode_ratio = decode.get("batch_1", {}).get("speed_ratio")
    return {
        "mfu>=0.50": (mfu >= GOALS["mfu"]) if (mfu is not None and cuda) else None,
        "train_ours/transformers>=1.3": (
            ratio >= GOALS["train_speed_ratio"] if ratio is not None else None
        ),
        "decode_batch1_ours/transformers>=2": (
            decode_ratio >= GOALS["decode_speed_ratio_batch1"] if decode_ratio else None
        ),
    }


def run_all(args: argparse.Namespace) -> int:
    mode = "quick" if args.quick else "gpu"
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        print(f"gpu_check: unknown part(s) {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print(
                "gpu_check: no CUDA GPU here; the dry run is --device cpu --quick", file=sys.stderr
            )
            return 2
    began = time.time()
    deadline = began + (args.total_s or TOTAL_S[mode])
    result: dict[str, Any] = {
        "device": None,
        "torch": None,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "mode": "dry run (tiny shapes)" if args.quick else "full",
        "checks": {},
        "figures": {},
        "parts": {},
        "errors": {},
    }
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        for i, part in enumerate(parts):
            later = parts[i + 1 :]
            # Its own share plus what the parts before it left unused; the later parts' shares
            # stay theirs. A longer --total-s makes every share longer in proportion.
            scale = (args.total_s or TOTAL_S[mode]) / sum(BUDGET_S[mode].values())
            later_shares = sum(scale * BUDGET_S[mode][p] for p in later if p in parts)
            budget = max(5.0, deadline - time.time() - later_shares)
            print(f"[{time.time() - began:5.0f}s] {part} (up to {budget:.0f} s)", flush=True)
            record = Path(tmp) / f"{part}.json"
            status, wall = run_child(args, part, record, budget)
            data = json.loads(record.read_text()) if record.is_file() else {}
            result["parts"][part] = {"status": status, "wall_s": round(wall, 1)}
            result["checks"].update(data.get("checks", {}))
            result["errors"].update(data.get("errors", {}))
            if data.get("figures"):
                result["figures"][part] = data["figures"]
            env = data.get("env", {})
            for key in ("device", "torch", "cuda", "python", "transformers", "device_memory_gb"):
                if env.get(key) is not None and result.get(key) is None:
                    result[key] = env[key]
            if status != "ok" and part not in EXPERIMENTS:
                result["checks"][f"{part}/finished"] = False
            print(f"[{time.time() - began:5.0f}s] {part}: {status} in {wall:.0f} s", flush=True)
    result["wall_s"] = round(time.time() - began, 1)
    result["goals"] = goals(result["figures"], args.device.startswith("cuda"))
    name = f"gpu-{slug(result['device'] or args.device)}{'-quick' if args.quick else ''}"
    path = Path(args.results_dir) / f"{name}-{result['date']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_name(path.name + ".tmp")
    tmp_path.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp_path, path)
    if args.out_dir:
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(args.out_dir) / path.name)
    summary(result, path)
    return 1 if any(v is False for v in result["checks"].values()) else 0


def run_child(
    args: argparse.Namespace, part: str, record: Path, budget: float
) -> tuple[str, float]:
    """Run one part in its own process (and process group) for at most ``budget`` seconds."""
    command = [sys.executable, str(Path(__file__).resolve()), "--part", part]
    command += ["--part-file", str(record), "--device", args.device]
    command += ["--deadline", str(time.time() + budget), "--compile-backend"]
    command += [args.compile_backend or ("aot_eager" if args.quick else "inductor")]
    command += ["--quick"] if args.quick else []
    command += ["--inject-failure", args.inject_failure] if args.inject_failure else []
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    start = time.time()
    proc = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True)
    try:
        code = proc.wait(timeout=budget)
        status = "ok" if code == 0 else f"crashed (exit code {code})"
    except subprocess.TimeoutExpired:
        status = "timed out"
    groups = [proc.pid]  # anything it left: pytest, a training, torchrun, a server
    if record.is_file():
        groups += json.loads(record.read_text()).get("process_groups", [])
    for group in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)
    proc.wait()
    return status, time.time() - start


def summary(result: dict[str, Any], path: Path) -> None:
    """The short table the device tool's reply ends with."""
    print("\n== gpu check:", result["device"], "| torch", result["torch"], "|", result["mode"])
    for part, p in result["parts"].items():
        print(f"  {part:12s} {p['status']} ({p['wall_s']} s)")
    for name, value in result["checks"].items():
        mark = {True: "ok  ", False: "FAIL"}.get(value, "skip")
        print(f"  {mark} {name}")
    train = result["figures"].get("train", {})
    ours, theirs = train.get("ours", {}), train.get("transformers", {})
    if ours:
        mfu = ours.get("mfu")
        print(
            f"  train: ours {ours['tokens_per_s']:,.0f} tokens/s at B={ours['batch_size']} "
            f"(MFU {mfu:.1%}, peak {ours.get('peak_memory_gb') or 0:.1f} GB)"
            if mfu is not None
            else f"  train: ours {ours['tokens_per_s']:,.0f} tokens/s at B={ours['batch_size']}"
        )
    if theirs:
        print(
            f"         transformers {theirs['tokens_per_s']:,.0f} tokens/s "
            f"(peak {theirs.get('peak_memory_gb') or 0:.1f} GB); ours/transformers "
            f"{train.get('speed_ratio', float('nan')):.2f}x"
        )
    hours = train.get("fineweb_edu_hours")
    if hours:
        print(
            f"         FineWeb-Edu 10B config: {hours['1_gpu']:.1f} h on 1 GPU, "
            f"{hours['8_gpus_if_linear']:.1f} h on 8 (if linear)"
        )
    decode = result["figures"].get("decode", {})
    for key in sorted(k for k in decode if k.startswith("batch_")):
        d = decode[key]
        print(
            f"  decode {key}: ours {d['ours']['ms_per_token']:.2f} ms/token, transformers "
            f"{d['transformers']['ms_per_token']:.2f} ({d['speed_ratio']:.2f}x)"
        )
    if decode.get("limit"):
        print(f"  decode limit: {json.dumps(decode['limit'])}")
    compiled = result["figures"].get("decode_compiled")
    if compiled:
        print(f"  decode compiled (batch 1): {json.dumps(compiled)[:600]}")
    print(f"  goals: {json.dumps(result['goals'])}")
    print(f"  wrote {path} ({result['wall_s']} s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (the dry run)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: the dry run")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated parts to run")
    parser.add_argument("--results-dir", default=str(BENCH / "results"))
    parser.add_argument("--out-dir", default="", help="also copy the JSON here (the device's $OUT)")
    parser.add_argument("--total-s", type=float, default=0, help="the whole run's time limit")
    parser.add_argument(
        "--compile-backend",
        default="",
        help="torch.compile backend (default: inductor; aot_eager with --quick)",
    )
    hidden = argparse.SUPPRESS  # the parent's arguments for its child processes, and a test's
    parser.add_argument("--part", choices=PARTS, help=hidden)
    parser.add_argument("--part-file", help=hidden)
    parser.add_argument("--deadline", type=float, default=0, help=hidden)
    parser.add_argument("--inject-failure", default="", help=hidden)
    args = parser.parse_args(argv)
    if args.part:
        return run_part(args)
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())
