"""Decoding speed at the GPT-2 124M shape, fp32 on the CPU: ours against transformers' generate
and against the cache-free loop, with every figure as a fraction of the memory-bandwidth bound.

Setting (issue 5): random weights of the gpt2 shape (12 x 768, vocabulary 50257), the same values
copied into transformers' GPT2LMHeadModel; a 32-token prompt; greedy; batch 1 (and batch 8).

- ours: `gpt2.generate.generate` with the KV cache, on the model prepared by
  `gpt2.decode_layout.prepare_for_decoding` (weights stored (in, out); ``--quantize int8``: int8);
- transformers: ``generate(do_sample=False)`` with its own cache, end-of-text disabled so that
  both produce exactly N tokens (and the tokens are checked to be the same);
- cache-free: nanoGPT's loop, a full forward pass over the context for every token.

Runs of ours and transformers alternate in one process so that a busy machine slows both alike;
the median of ``--reps`` runs is compared (the best is printed too), after one short untimed run
of each. tokens/s counts new tokens over the whole call, the 32-token prefill included.

Bound: weight bytes read per token (every parameter once, the tied head counted once, the position
table not) over a read bandwidth measured here (a sum over 1 GiB, best of 5).

Quality of int8: perplexity of a trained model on held-out text (the last 10% of TinyShakespeare)
before and after quantization; ``--quality-model`` is any source `gpt2.checkpoint.load_model` takes
(default: out/shakespeare-char, which ``make demo`` trains).

Usage: python bench/bench_generate.py [--reps 3] [--threads N] [--quantize int8] [--quick]
Prints the figures, then one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from gpt2.config import GPTConfig
from gpt2.decode_layout import prepare_for_decoding
from gpt2.generate import generate
from gpt2.model import GPT

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def read_bandwidth_gbs(gib: float = 1.0, tries: int = 5) -> float:
    """GB/s for one pass of reads over a buffer far larger than the caches (best of ``tries``)."""
    x = torch.ones(int(gib * 2**30) // 4)
    best = math.inf
    for _ in range(tries):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def weight_bytes_per_token(model: GPT) -> int:
    """Bytes a decode step reads: every parameter and buffer once, but one row of the position
    table; int8 modules' weights (buffers) at one byte each plus their float32 scales and biases."""
    n = 0
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen or name.endswith("wpe.weight"):
            continue
        seen.add(id(p))
        # The embedding is only looked up when the head is int8 (it has its own copy then).
        if name.endswith("wte.weight") and "qweight" in model.lm_head._buffers:
            continue
        n += p.numel() * p.element_size()
    for b in model.buffers():
        n += b.numel() * b.element_size()
    return n


def twin_transformers(model: GPT):
    import transformers

    c = model.config
    cfg = transformers.GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
        n_head=c.n_head, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    state = {k: v.t() if k.endswith(CONV1D) else v for k, v in model.state_dict().items()}
    hf.load_state_dict(state, strict=False)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf


@torch.no_grad()
def cache_free(model: GPT, idx: torch.Tensor, n: int) -> torch.Tensor:
    """nanoGPT's generate: the whole context through the model for every new token."""
    for _ in range(n):
        logits, _ = model(idx[:, -model.config.block_size :])
        idx = torch.cat((idx, logits[:, -1, :].argmax(dim=-1, keepdim=True)), dim=1)
    return idx


def timed(fn: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def race(runners: dict[str, Callable[[], torch.Tensor]], reps: int) -> dict[str, dict]:
    """Each runner ``reps`` times, alternating; seconds (median, best) and the last output."""
    times: dict[str, list[float]] = {k: [] for k in runners}
    outs: dict[str, torch.Tensor] = {}
    for _ in range(reps):
        for name, fn in runners.items():
            seconds, outs[name] = timed(fn)
            times[name].append(seconds)
    return {
        k: {"median_s": statistics.median(v), "best_s": min(v), "out": outs[k]}
        for k, v in times.items()
    }


@torch.no_grad()
def perplexity(model: GPT, tokens: torch.Tensor, batch: int = 32) -> float:
    """exp(mean next-token loss) over non-overlapping windows of block_size + 1 tokens."""
    T = model.config.block_size
    n = (len(tokens) - 1) // T
    windows = tokens[: n * T + 1]
    x = windows[:-1].view(n, T)
    y = windows[1:].view(n, T)
    total = 0.0
    for i in range(0, n, batch):
        logits, _ = model(x[i : i + batch])
        total += F.cross_entropy(
            logits.flatten(0, 1), y[i : i + batch].flatten(), reduction="sum"
        ).item()
    return math.exp(total / (n * T))


def int8_quality(source: str) -> dict | None:
    """Perplexity of a trained model before and after int8, on held-out TinyShakespeare."""
    from gpt2.assets import fetch
    from gpt2.checkpoint import load_model

    if not Path(source).exists():
        print(f"quality: {source} not found, skipped (train one with `make demo`)")
        return None
    model, tok = load_model(source)
    model.eval()
    text = fetch("tinyshakespeare/input.txt").read_text(encoding="utf-8")
    held_out = text[int(len(text) * 0.9) :]
    tokens = torch.tensor(tok.encode(held_out), dtype=torch.long)
    before = perplexity(model, tokens)
    after = perplexity(prepare_for_decoding(copy.deepcopy(model), "int8"), tokens)
    return {"model": source, "tokens": len(tokens), "ppl_fp32": before, "ppl_int8": after}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3, help="alternating runs per figure (median)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument(
        "--quantize", choices=("none", "int8"), default="none", help="also measure int8"
    )
    ap.add_argument(
        "--quick", action="store_true", help="skip the 512-token cache-free run (minutes)"
    )
    ap.add_argument(
        "--quality-model", default="out/shakespeare-char", help="trained model for int8 perplexity"
    )
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bandwidth = read_bandwidth_gbs()
    plain = GPT(GPTConfig.preset("gpt2")).eval()  # the training layout, for the cache-free loop
    hf = twin_transformers(plain)
    ours = prepare_for_decoding(copy.deepcopy(plain))
    variants = {"ours": ours}
    if args.quantize == "int8":
        variants["ours_int8"] = prepare_for_decoding(copy.deepcopy(plain), "int8")
    bytes_fp32 = weight_bytes_per_token(ours)
    bound = {k: bandwidth * 1e9 / weight_bytes_per_token(m) for k, m in variants.items()}
    bound["transformers"] = bound["cache_free"] = bandwidth * 1e9 / bytes_fp32
    print(f"torch threads {torch.get_num_threads()}; read bandwidth {bandwidth:.1f} GB/s; "
          f"fp32 weights {bytes_fp32 / 1e6:.0f} MB/token -> bound {bound['ours']:.1f} tokens/s")  # fmt: skip
    prompt = torch.randint(0, 50257, (1, 32), generator=torch.Generator().manual_seed(0))
    prompts8 = torch.randint(0, 50257, (8, 32), generator=torch.Generator().manual_seed(8))
    report: dict[str, dict] = {}
    # One short untimed run of each first: one-time costs (the thread pool starting, pages of
    # fresh buffers touched for the first time, views made on a module's first call) would
    # otherwise fall on whichever runner goes first.
    for m in variants.values():
        generate(m, prompt, 8, temperature=0.0)
    hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=8)

    def record(label: str, n: int, batch: int, results: dict[str, dict]) -> None:
        for name, r in results.items():
            tps = n * batch / r["median_s"]
            # A decode step reads the weights once for the whole batch: the bound scales with it.
            fraction = tps / (batch * bound[name])
            report[f"{label}/{name}"] = {
                "new_tokens": n, "batch": batch, "tokens_per_s": tps,
                "best_tokens_per_s": n * batch / r["best_s"], "fraction_of_bound": fraction,
            }  # fmt: skip
            print(f"{label:>8} {name:>13}: {tps:7.2f} tokens/s (best {n * batch / r['best_s']:6.2f}),"
                  f" {fraction:.0%} of the bound")  # fmt: skip

    for n in (128, 512):
        runners = {
            k: (lambda m=m, n=n: generate(m, prompt, n, temperature=0.0))
            for k, m in variants.items()
        }
        runners["transformers"] = lambda n=n: hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=n)  # fmt: skip
        results = race(runners, args.reps)
        same = torch.equal(results["ours"]["out"], results["transformers"]["out"])
        print(f"{n} new tokens: ours == transformers greedy tokens: {same}")
        report[f"n{n}/same_tokens_as_transformers"] = {"value": same}
        if not args.quick or n == 128:
            cf = race({"cache_free": lambda n=n: cache_free(plain, prompt, n)}, 1)
            results.update(cf)
        record(f"n{n}", n, 1, results)

    batch_runners = {
        "ours": lambda: generate(ours, prompts8, 128, temperature=0.0),
        "transformers": lambda: hf.generate(prompts8, attention_mask=torch.ones_like(prompts8), do_sample=False, max_new_tokens=128),
    }  # fmt: skip
    record("b8n128", 128, 8, race(batch_runners, max(1, args.reps - 1)))

    def ratio(a: str, b: str) -> float | None:
        if a in report and b in report:
            return report[a]["tokens_per_s"] / report[b]["tokens_per_s"]
        return None

    ratios = {
        "ours/transformers n128": ratio("n128/ours", "n128/transformers"),
        "ours/transformers n512": ratio("n512/ours", "n512/transformers"),
        "ours/cache_free n512": ratio("n512/ours", "n512/cache_free"),
        "ours/cache_free n128": ratio("n128/ours", "n128/cache_free"),
        "ours/transformers batch8 n128": ratio("b8n128/ours", "b8n128/transformers"),
    }
    if args.quantize == "int8":
        ratios["int8/transformers-fp32 n128"] = ratio("n128/ours_int8", "n128/transformers")
        ratios["int8/transformers-fp32 n512"] = ratio("n512/ours_int8", "n512/transformers")
        quality = int8_quality(args.quality_model)
        if quality:
            print(f"int8 quality on {quality['model']}: perplexity {quality['ppl_fp32']:.3f} (fp32) "
                  f"-> {quality['ppl_int8']:.3f} (int8) over {quality['tokens']} held-out tokens")  # fmt: skip
        report["int8_quality"] = quality or {}
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x" if v is not None else f"{k}: not measured")

    def at_least(key: str, target: float) -> bool | None:
        return None if ratios.get(key) is None else ratios[key] >= target

    goals = {
        "fp32 >= 1.5x transformers at 128": at_least("ours/transformers n128", 1.5),
        "fp32 >= 1.5x transformers at 512": at_least("ours/transformers n512", 1.5),
        "fp32 >= 10x cache-free at 512": at_least("ours/cache_free n512", 10),
    }
    if args.quantize == "int8":
        goals["int8 >= 2.5x transformers fp32 at 128"] = at_least(
            "int8/transformers-fp32 n128", 2.5
        )
    for k, v in goals.items():
        print(f"goal {k}: {'not measured' if v is None else 'met' if v else 'NOT met'}")
    summary = {
        "bench": "generate", "threads": torch.get_num_threads(), "bandwidth_gbs": bandwidth,
        "fp32_bytes_per_token": bytes_fp32, "bound_tokens_per_s": bound, "figures": report,
        "ratios": ratios, "goals": goals,
    }  # fmt: skip
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
