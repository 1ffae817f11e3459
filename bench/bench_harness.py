"""lm-evaluation-harness speed: `gpt2.harness.HarnessModel` against lm-eval's own Hugging Face
model (``--model hf``) on the same weights, the same tasks and the same machine, in one process.

Setting (issue 19): random weights of the gpt2 shape (12 x 768, context 1024, vocabulary 50257;
``--small`` for a 4 x 256 one), made by transformers and saved with GPT-2's tokenizer files;
three local tasks over TinyShakespeare, one per request type, shaped like the real ones:

- ``bench_lambada`` (loglikelihood): ``--items`` passages of 60-140 words, the last word scored
  (lambada_openai's prompt and metrics);
- ``bench_wikitext`` (loglikelihood_rolling): ``--items // 8`` documents of ~1,500 words, scored in
  the harness's rolling windows of 1024 tokens (wikitext's metrics);
- ``bench_generate`` (generate_until): ``--items // 4`` prompts of ~40 words, greedy, 32 new tokens
  at most, stopping at a newline or a period.

Each task runs with ours and with hf alternately, ``--reps`` times (after one untimed run of
each); the median is compared. "model" times only the model's answers to the requests (the same
requests for both), wall-clock and CPU time (CPU time is what to compare on a machine whose
scheduler pauses processes; with one thread it is the compute alone); "total" is the whole `lm_eval.simple_evaluate` call (task building and
metrics included, which are the same for both). The figures are also checked to be equal
(1e-4 relative), as tests/test_harness.py checks on a tiny model.

Usage: python bench/bench_harness.py [--items 64] [--reps 3] [--batch-size 8] [--threads N]
       [--small] [--tasks bench_lambada,bench_wikitext,bench_generate]
Prints the figures, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from gpt2.assets import fetch  # noqa: E402
from gpt2.checkpoint import load_model  # noqa: E402
from gpt2.device import cpu_name  # noqa: E402
from gpt2.harness import HarnessModel  # noqa: E402
from gpt2.hf import save_hf_tokenizer  # noqa: E402
from gpt2.tokenizer import GPT2Tokenizer  # noqa: E402

TASKS = ("bench_lambada", "bench_wikitext", "bench_generate")
REQUEST_TYPES = ("loglikelihood", "loglikelihood_rolling", "generate_until")


@torch.no_grad()
def make_model(folder: Path, small: bool) -> None:
    """A random GPT-2 (gpt2's shape unless ``small``) saved with GPT-2's tokenizer files."""
    shape = dict(n_layer=4, n_head=4, n_embd=256) if small else {}
    config = transformers.GPT2Config(n_positions=1024, vocab_size=50257, **shape)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(folder)
    save_hf_tokenizer(GPT2Tokenizer(), folder, config.n_positions)


def write_tasks(folder: Path, items: int) -> Path:
    """The three task YAML files and their JSON-lines data, from TinyShakespeare's words."""
    words = fetch("tinyshakespeare/input.txt").read_text(encoding="utf-8").split()
    rng = random.Random(19)

    def passage(n: int) -> str:
        start = rng.randrange(len(words) - n)
        return " ".join(words[start : start + n])

    data = {
        "lambada": [{"text": passage(rng.randint(60, 140))} for _ in range(items)],
        "wiki": [{"page": passage(1500)} for _ in range(max(1, items // 8))],
        "gen": [{"q": passage(40), "a": passage(1)} for _ in range(max(1, items // 4))],
    }
    for name, rows in data.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def head(task: str, name: str, output_type: str) -> str:
        files = json.dumps({"test": str(folder / f"{name}.jsonl")})
        cache = json.dumps(str(folder / "datasets-cache"))
        return (
            f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files: {files}\n"
            f"  cache_dir: {cache}\ntest_split: test\noutput_type: {output_type}\n"
        )

    (folder / "bench_lambada.yaml").write_text(
        head("bench_lambada", "lambada", "loglikelihood")
        + "doc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\n"
        "doc_to_target: \"{{' '+text.split(' ')[-1]}}\"\n"
        "metric_list:\n"
        "  - {metric: perplexity, aggregation: perplexity, higher_is_better: false}\n"
        "  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
    )
    (folder / "bench_wikitext.yaml").write_text(
        head("bench_wikitext", "wiki", "loglikelihood_rolling")
        + 'doc_to_text: ""\ndoc_to_target: "{{page}}"\n'
        "metric_list:\n"
        "  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
    )
    (folder / "bench_generate.yaml").write_text(
        head("bench_generate", "gen", "generate_until")
        + 'doc_to_text: "{{q}}"\ndoc_to_target: "{{a}}"\n'
        'generation_kwargs:\n  until: ["\\n", "."]\n  max_gen_toks: 32\n  do_sample: false\n'
        "metric_list:\n  - {metric: exact_match, aggregation: mean, higher_is_better: true}\n"
    )
    return folder


class ModelClock:
    """Seconds the model spends answering requests, wall-clock and CPU (this process's, all
    threads): wraps an LM's three request methods."""

    def __init__(self, lm: Any) -> None:
        self.seconds = self.cpu_seconds = 0.0
        for name in REQUEST_TYPES:
            setattr(lm, name, self._timed(getattr(lm, name)))

    def _timed(self, method: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            t, c = time.perf_counter(), time.process_time()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t
                self.cpu_seconds += time.process_time() - c

        return call


def figures(results: dict[str, Any]) -> dict[str, float]:
    return {
        f"{task}/{key}": float(value)
        for task, row in results["results"].items()
        for key, value in row.items()
        if "stderr" not in key and isinstance(value, (int, float))
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--small", action="store_true", help="a 4 x 256 model instead of gpt2's")
    parser.add_argument("--tasks", default=",".join(TASKS), help="which of the three to run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    root = Path(tempfile.mkdtemp(prefix="bench-harness-"))
    make_model(root / "model", args.small)
    tasks = write_tasks(root, args.items)
    manager = TaskManager(include_path=str(tasks), include_defaults=False)

    model, tokenizer = load_model(str(root / "model"), "cpu")
    ours = HarnessModel(model, tokenizer, batch_size=args.batch_size, show_progress=False)
    hf = HFLM(
        pretrained=str(root / "model"), dtype="float32", device="cpu", batch_size=args.batch_size
    )
    lms = {"ours": ours, "hf": hf}
    clocks = {name: ModelClock(lm) for name, lm in lms.items()}

    report: dict[str, Any] = {
        "cpu": cpu_name(),
        "threads": args.threads,
        "model": "4x256" if args.small else "gpt2-124M",
        "items": args.items,
        "batch_size": args.batch_size,
        "tasks": {},
    }
    for task in args.tasks.split(","):
        kinds = ("model", "model_cpu", "total")
        times: dict[str, dict[str, list[float]]] = {n: {k: [] for k in kinds} for n in lms}
        results: dict[str, dict[str, float]] = {}
        for rep in range(args.reps + 1):  # the first round warms up and is not counted
            for name, lm in lms.items():
                clocks[name].seconds = clocks[name].cpu_seconds = 0.0
                t = time.perf_counter()
                out = simple_evaluate(
                    model=lm, tasks=[task], task_manager=manager, log_samples=False,
                    bootstrap_iters=0,
                )  # fmt: skip
                total = time.perf_counter() - t
                results[name] = figures(out)
                if rep > 0:
                    times[name]["model"].append(clocks[name].seconds)
                    times[name]["model_cpu"].append(clocks[name].cpu_seconds)
                    times[name]["total"].append(total)
        for key, value in results["hf"].items():
            mine = results["ours"][key]
            assert abs(mine - value) <= 1e-4 * abs(value), (key, mine, value)
        row = {
            f"{name}_{kind}_s": round(statistics.median(times[name][kind]), 3)
            for name in lms
            for kind in kinds
        }
        row["speedup_model"] = round(row["hf_model_s"] / row["ours_model_s"], 2)
        row["speedup_model_cpu"] = round(row["hf_model_cpu_s"] / row["ours_model_cpu_s"], 2)
        row["speedup_total"] = round(row["hf_total_s"] / row["ours_total_s"], 2)
        row["figures"] = results["ours"]
        report["tasks"][task] = row
        print(
            f"{task:16s} model: ours {row['ours_model_s']:.2f} s, hf {row['hf_model_s']:.2f} s "
            f"({row['speedup_model']:.2f}x; CPU time {row['speedup_model_cpu']:.2f}x); whole call: ours {row['ours_total_s']:.2f} s, "
            f"hf {row['hf_total_s']:.2f} s ({row['speedup_total']:.2f}x); figures equal to 1e-4"
        )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
