"""Decoding on the CPU against llama.cpp, in one run on the same weights: ours at float32,
bfloat16 and int8 against llama.cpp's F32, BF16 and Q8_0 files of the same checkpoint.

Setting (issue 18): random weights of the GPT-2 124M shape (seed 0) with GPT-2's tokenizer,
saved as our checkpoint and written to GGUF by our own ``gpt2 export --format gguf`` (f32, bf16,
q8_0); every core (``--threads``, default all) on both sides; greedy.

- llama.cpp: ``llama-bench`` from the cached build of scripts/build_llama_cpp.sh (``make
  llama-cpp``; ``--build`` builds it when missing), tests pp32, pp512, tg128, tg512, one
  repetition a round (after its own warm-up). Without the build, or without a compiler for it,
  one "skipped: ..." line says so and only our figures are printed.
- ours: `gpt2.decode` (the loop ``gpt2 sample``, ``generate`` and the server use) on the model
  prepared by `gpt2.decode_layout.prepare_for_decoding` at each precision: a 32-token prompt is
  admitted (prefill and the first token: our time to first token), then timed decode steps;
  tg N = N decode steps / their time, as llama-bench counts (it starts from an empty context,
  ours after the 32 prompt tokens). A 512-token prompt gives the other time to first token;
  8 prompts decoded together give batch 8's aggregate tokens/s.
- llama.cpp's time to first token: prompt tokens / pp speed + one token at tg128's speed.

The sides alternate within every round, so a machine shared with other work slows both alike;
``--rounds`` rounds, each ratio the median of the per-round ratios. The load average is printed
with each round. Physical limits beside each figure: a token's weight bytes (every weight once,
the position table not; GGUF: the tensors' own sizes) over the read bandwidth measured in the
same run (the faster of torch's sum and the native one-row product over 1 GiB, all threads,
best of 5); batch 8 reads them once for 8 tokens; time
to first token: the larger of the bytes over bandwidth and the prompt's FLOPs over the same
run's best square product in the precision (int8: float32's, for want of a better one).

Usage: python bench/bench_llama_cpp.py [--rounds 3] [--threads N] [--build] [--precisions ...]
Prints the figures, the ratios and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from gpt2 import native
from gpt2.checkpoint import load_model, save_checkpoint
from gpt2.cli import main as gpt2_main
from gpt2.config import GPTConfig, TrainConfig
from gpt2.decode import Decoder, DecodeSequence, KVCacheEngine
from gpt2.decode_layout import prepare_for_decoding
from gpt2.device import cpu_flags, cpu_name, cpu_peak_flops
from gpt2.model import GPT
from gpt2.sampling import Sampler, SamplingParams
from gpt2.tokenizer import GPT2Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import weight_bytes_per_token  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# ours (quantize, dtype) and the GGUF type of the same precision
PRECISIONS = {
    "fp32": (("none", "float32"), "f32"),
    "bf16": (("none", "bfloat16"), "bf16"),
    "int8": (("int8", "float32"), "q8_0"),
}
TG = (128, 512)
PP = (32, 512)
BATCH = 8


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def read_bandwidth(gib: float = 1.0, tries: int = 5) -> tuple[float, str]:
    """GB/s of the fastest of a few ways to read a buffer far larger than the caches, all
    threads, best of ``tries``: torch's sum, and (when built) the native kernel's one-row product
    over the buffer as a (rows, 4096) matrix. Which one won is returned too."""
    x = torch.ones(int(gib * 2**30) // 4)
    probes = {"torch sum": lambda: x.sum()}
    if native.available():
        w, v = x.view(-1, 4096), torch.ones(1, 4096)
        probes["native one-row product"] = lambda: torch.ops.gpt2.linear(v, w, None, False)
    best = {}
    for name, fn in probes.items():
        fn()
        seconds = min(timed(fn) for _ in range(tries))
        best[name] = x.numel() * 4 / seconds / 1e9
    name = max(best, key=best.get)
    return best[name], name


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def find_llama_cpp(build: bool) -> tuple[Path | None, str]:
    """The llama.cpp folder (bin/llama-bench inside), or None and why not."""
    script = REPO / "scripts" / "build_llama_cpp.sh"
    found = subprocess.run(["bash", str(script), "--find"], capture_output=True, text=True)
    if found.returncode == 0:
        return Path(found.stdout.strip()), ""
    if not build:
        return None, "llama.cpp is not built here (make llama-cpp, or pass --build)"
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env)
    if done.returncode == 3:
        return None, f"llama.cpp cannot be built here: {done.stderr.strip().splitlines()[-1]}"
    if done.returncode != 0:
        return None, f"the llama.cpp build failed: {done.stderr.strip()[-300:]}"
    return Path(done.stdout.strip().splitlines()[-1]), ""


def make_checkpoint(folder: Path) -> Path:
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("gpt2"))
    return save_checkpoint(folder / "ckpt", model, GPT2Tokenizer(), TrainConfig())


def export_gguf(ckpt: Path, folder: Path, gguf_type: str) -> Path:
    """The checkpoint as GGUF, written by our own ``gpt2 export --format gguf``."""
    out = folder / f"gpt2-{gguf_type}.gguf"
    argv = ["-q", "export", "--format", "gguf", "--gguf-type", gguf_type]
    if gpt2_main([*argv, "--checkpoint", str(ckpt), "--out", str(out)]) != 0:
        raise SystemExit(f"gpt2 export --format gguf --gguf-type {gguf_type} failed")
    return out


def gguf_bytes_per_token(path: Path) -> int:
    """Bytes of the file's tensors a decode step reads: all but the position table."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return sum(int(t.n_bytes) for t in reader.tensors if not t.name.startswith("position_embd"))


def llama_bench(bin_dir: Path, model: Path, threads: int) -> dict[str, float]:
    """tokens/s of pp32, pp512, tg128 and tg512 from one llama-bench run (one repetition)."""
    cmd = [
        str(bin_dir / "llama-bench"), "-m", str(model), "-t", str(threads), "-r", "1",
        "-p", ",".join(map(str, PP)), "-n", ",".join(map(str, TG)), "-o", "json",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"llama-bench failed: {done.stderr[-2000:]}")
    out = {}
    for test in json.loads(done.stdout):
        kind = f"pp{test['n_prompt']}" if test["n_gen"] == 0 else f"tg{test['n_gen']}"
        out[kind] = float(test["avg_ts"])
    return out


def ours_decode(model: GPT, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """(seconds to the first token, seconds per decode step) for ``prompts`` decoded together,
    each to ``new_tokens`` + 1 tokens: the prefill gives the first, then ``new_tokens`` steps."""
    params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens + 1, ignore_eot=True)
    longest = max(len(p) for p in prompts)
    engine = KVCacheEngine(model, len(prompts), longest + new_tokens + 1)
    decoder = Decoder(engine, eot=None)
    seqs = [DecodeSequence(Sampler(params, p, seed=i)) for i, p in enumerate(prompts)]
    start = time.perf_counter()
    decoder.admit(seqs)
    first = time.perf_counter()
    steps = 0
    while decoder.active:
        decoder.step()
        steps += 1
    end = time.perf_counter()
    assert steps == new_tokens, (steps, new_tokens)
    return first - start, (end - first) / steps


def ours_round(model: GPT, rng: torch.Generator) -> dict[str, float]:
    """Our figures for one round: tg128, tg512 (tokens/s), ttft32, ttft512 (s), batch8 (tok/s)."""

    def prompt(n: int) -> list[int]:
        return torch.randint(0, 50257, (n,), generator=rng).tolist()

    out = {}
    for n in TG:
        ttft, step = ours_decode(model, [prompt(PP[0])], n)
        out[f"tg{n}"] = 1 / step
        if n == TG[0]:
            out[f"ttft{PP[0]}"] = ttft
    out[f"ttft{PP[1]}"] = ours_decode(model, [prompt(PP[1])], 1)[0]
    _, step = ours_decode(model, [prompt(PP[0]) for _ in range(BATCH)], TG[0])
    out[f"batch{BATCH}"] = BATCH / step
    return out


def llama_figures(raw: dict[str, float]) -> dict[str, float]:
    """llama-bench's speeds plus its time to first token (prompt / pp + one tg128 token)."""
    out = {f"tg{n}": raw[f"tg{n}"] for n in TG}
    for n in PP:
        out[f"ttft{n}"] = n / raw[f"pp{n}"] + 1 / raw[f"tg{TG[0]}"]
        out[f"pp{n}"] = raw[f"pp{n}"]
    return out


def bounds(bytes_per_token: int, bandwidth: float, flops_peak: float, params: int) -> dict:
    """The physical limits of one precision (see the module docstring)."""
    tg = bandwidth * 1e9 / bytes_per_token
    out = {f"tg{n}": tg for n in TG} | {f"batch{BATCH}": BATCH * tg}
    for n in PP:
        out[f"ttft{n}"] = max(bytes_per_token / (bandwidth * 1e9), 2 * params * n / flops_peak)
    return out


def show(key: str, value: float, bound: float) -> str:
    if key.startswith("ttft"):
        return f"{value * 1e3:8.1f} ms (bound {bound * 1e3:6.1f})"
    return f"{value:8.2f} tok/s (bound {bound:6.1f}, {value / bound:4.0%})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (medians)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads on both sides")
    ap.add_argument("--build", action="store_true", help="build llama.cpp if it is missing")
    ap.add_argument("--precisions", default=",".join(PRECISIONS), help="fp32,bf16,int8")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    flags = sorted(f for f in cpu_flags() if f in ("avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8"))  # fmt: skip
    print(f"CPU: {cpu_name()} ({os.cpu_count()} cores; {' '.join(flags)}); threads {args.threads}; "
          f"torch {torch.__version__}; load average {loadavg()}")  # fmt: skip
    bandwidth, probe = read_bandwidth()
    peaks = {"fp32": cpu_peak_flops(torch.float32), "bf16": cpu_peak_flops(torch.bfloat16)}
    peaks["int8"] = peaks["fp32"]
    print(f"read bandwidth {bandwidth:.1f} GB/s ({probe}); best square product fp32 {peaks['fp32'] / 1e9:.0f}, "
          f"bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s")  # fmt: skip
    llama_dir, why = find_llama_cpp(args.build)
    try:
        import gguf  # noqa: F401
    except ImportError:
        llama_dir, why = None, "the gguf package is missing (pip install -e '.[gguf]')"
    if llama_dir is None:
        print(f"skipped: llama.cpp: {why}; only our figures follow")
    with tempfile.TemporaryDirectory(prefix="bench-llama-") as tmp:
        ckpt = make_checkpoint(Path(tmp))
        models, files, limits = {}, {}, {}
        for name in precisions:
            (quantize, dtype), gguf_type = PRECISIONS[name]
            model = prepare_for_decoding(load_model(ckpt)[0], quantize, dtype)
            models[name] = model
            c = model.config  # the products' weights: 12 C^2 a block, and the head
            n_params = c.n_layer * 12 * c.n_embd**2 + c.vocab_size * c.n_embd
            limits[f"ours/{name}"] = bounds(weight_bytes_per_token(model), bandwidth, peaks[name], n_params)  # fmt: skip
            if llama_dir is not None:
                files[name] = export_gguf(ckpt, Path(tmp), gguf_type)
                limits[f"llama/{name}"] = bounds(gguf_bytes_per_token(files[name]), bandwidth, peaks[name], n_params)  # fmt: skip
        for model in models.values():  # warm-up: thread pool, first touch of the buffers
            ours_decode(model, [[1] * 8], 4)
        rounds: list[dict[str, dict[str, float]]] = []
        rng = torch.Generator().manual_seed(0)
        for r in range(args.rounds):
            figures: dict[str, dict[str, float]] = {}
            for name in precisions:
                if llama_dir is not None:
                    raw = llama_bench(llama_dir / "bin", files[name], args.threads)
                    figures[f"llama/{name}"] = llama_figures(raw)
                figures[f"ours/{name}"] = ours_round(models[name], rng)
            figures["loadavg"] = loadavg()  # type: ignore[assignment]
            rounds.append(figures)
            print(f"round {r + 1}/{args.rounds} done, load average {figures['loadavg']}")
    machine = {"bandwidth_gbs": bandwidth, "bandwidth_probe": probe, "peak_gflops": {k: v / 1e9 for k, v in peaks.items()}}  # fmt: skip
    report(rounds, limits, precisions, llama_dir is not None, args, machine, why)


def report(rounds, limits, precisions, with_llama, args, machine, why) -> None:
    """Medians over rounds, each beside its bound; the ratios; one JSON line."""
    sides = [s for s in rounds[0] if s != "loadavg"]
    medians = {
        side: {k: statistics.median(r[side][k] for r in rounds) for k in rounds[0][side]}
        for side in sides
    }
    for side in sides:
        print(f"{side}:")
        for key, value in medians[side].items():
            if key.startswith("pp"):
                print(f"  {key:>8}: {value:8.1f} tok/s")
            else:
                print(f"  {key:>8}: {show(key, value, limits[side][key])}")
    ratios: dict[str, float] = {}
    for name in precisions:
        ours = f"ours/{name}"
        b = [r[ours][f"batch{BATCH}"] / r[ours][f"tg{TG[0]}"] for r in rounds]
        ratios[f"{name} batch{BATCH}/batch1"] = statistics.median(b)
        if not with_llama:
            continue
        llama = f"llama/{name}"
        for key in [f"tg{n}" for n in TG] + [f"ttft{n}" for n in PP]:
            # speed ratio: tokens/s ours / llama.cpp; for time to first token llama / ours
            per = [
                r[llama][key] / r[ours][key] if key.startswith("ttft") else r[ours][key] / r[llama][key]
                for r in rounds
            ]  # fmt: skip
            ratios[f"{name} {key} ours/llama.cpp"] = statistics.median(per)
    print("ratios (medians of the per-round ratios; time to first token as speed):")
    for k, v in ratios.items():
        print(f"  {k}: {v:.2f}x")
    if not with_llama:
        print(f"skipped: llama.cpp: {why}")
    summary = {
        "bench": "llama_cpp", "cpu": cpu_name(), "cores": os.cpu_count(), "threads": args.threads,
        "torch": torch.__version__, **machine, "rounds": rounds,
        "medians": medians, "bounds": limits, "ratios": ratios,
        "llama_cpp": "measured" if with_llama else f"skipped: {why}",
    }  # fmt: skip
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
