"""``gpt2 eval --harness``: lm-eval's tasks on our model give what lm-eval's own Hugging Face
model (``--model hf``) gives on the same weights.

The weights are a tiny random GPT-2 made by transformers, saved with GPT-2's real tokenizer
files; the tasks are local YAML files over data written here (``dataset_path: json``), one per
request type: a LAMBADA-style last word (``loglikelihood``), a WikiText-style document perplexity
(``loglikelihood_rolling``) and a completion with stop strings (``generate_until``). Nothing
touches the network.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import gpt2

pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")

from gpt2.checkpoint import load_model  # noqa: E402
from gpt2.hf import save_hf_tokenizer  # noqa: E402
from gpt2.tokenizer import GPT2Tokenizer  # noqa: E402

# Both sides compute in float32 from the same weights; what differs is the order of the sums
# (our attention and batching against transformers'), worth ~1e-6 relative on these figures.
RTOL = 1e-4
BLOCK = 64  # the model's context: short, so that documents need several rolling windows
TASKS = ["tiny_lambada", "tiny_wikitext", "tiny_generate"]
# tiny_generate's settings: stop strings a random model writes often ("e" inside a token, so the
# cut is mid-token), and a budget that cuts the longest prompts to BLOCK - MAX_GEN tokens.
UNTIL = ["e", "a"]
MAX_GEN = 12
TEXT = (
    "the river ran past a quiet town where seven bakers sold bread to sailors and the old "
    "lighthouse keeper wrote letters every evening about storms ships gulls and distant islands"
)
WORDS = TEXT.split()


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever lm-eval, datasets or transformers would fetch, they must find locally."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@torch.no_grad()
def _random_gpt2(folder: Path) -> transformers.GPT2LMHeadModel:
    """A 2-layer GPT-2 with GPT-2's vocabulary, every tensor random (gains and biases too)."""
    config = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, n_positions=BLOCK, vocab_size=50257
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    g = torch.Generator().manual_seed(19)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        gain = name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight"))
        p.copy_(1.0 + 0.1 * noise if gain else 0.2 * noise if p.dim() >= 2 else 0.02 * noise)
    model.save_pretrained(folder)
    save_hf_tokenizer(GPT2Tokenizer(), folder, BLOCK)
    return model


def _greedy_word(model: Any, tok: GPT2Tokenizer, context: str) -> str | None:
    """The model's most likely next token after ``context``, if it is a space and letters: a
    "last word" the model gets right, so that ``acc`` is not trivially 0."""
    with torch.no_grad():
        ids = tok.encode(context)[-BLOCK:]  # what the harness keeps of a long context
        best = int(model(torch.tensor([ids])).logits[0, -1].argmax())
    word = tok.decode([best])
    ok = word.startswith(" ") and word[1:].isalpha() and tok.encode(context + word)[-1] == best
    return word if ok else None


def _greedy_completion(model: Any, tok: GPT2Tokenizer, prompt: str) -> str:
    """What greedy decoding writes after ``prompt`` under tiny_generate's settings, by
    transformers' own ``generate``: an answer the model gets right, so that ``exact_match`` is
    not trivially 0."""
    ids = tok.encode(prompt)[-(BLOCK - MAX_GEN) :]
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=MAX_GEN, do_sample=False, pad_token_id=0
        )
    text = tok.decode([t for t in out[0, len(ids) :].tolist() if t != tok.eot_token])
    for stop in UNTIL:
        text = text.split(stop)[0]
    return text


def _write_tasks(folder: Path, model: Any) -> Path:
    """Three task YAML files and their data in ``folder/tasks``."""
    tasks, data = folder / "tasks", folder / "data"
    tasks.mkdir()
    data.mkdir()
    g = torch.Generator().manual_seed(7)

    def words(n: int) -> str:
        return " ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (n,), generator=g))

    tok = GPT2Tokenizer()
    lambada = []
    for i in range(12):
        context = words(5 + 7 * i)  # up to ~80 words: the longest rows are cut to the context
        word = _greedy_word(model, tok, context) if i % 2 == 0 else None
        lambada.append({"text": context + (word or " " + words(1))})
    assert any(_greedy_word(model, tok, d["text"].rsplit(" ", 1)[0]) for d in lambada)
    wiki = [{"page": words(n) + ".\n\n" + words(n // 2)} for n in (3, 20, 45, 90, 150)]
    gen = []
    for i in range(8):
        question = words(2 + 9 * i)
        answer = _greedy_completion(model, tok, question) if i % 2 == 0 else words(1)
        gen.append({"question": question, "answer": answer})
    for name, rows in (("lambada", lambada), ("wiki", wiki), ("gen", gen)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def dataset(name: str) -> str:
        files = json.dumps({"test": str(data / f"{name}.jsonl")})
        cache = json.dumps(str(folder / "datasets-cache"))
        return (
            f"dataset_path: json\ndataset_kwargs:\n  data_files: {files}\n  cache_dir: {cache}\n"
            "test_split: test\n"
        )

    (tasks / "tiny_lambada.yaml").write_text(
        "task: tiny_lambada\n" + dataset("lambada") + "output_type: loglikelihood\n"
        "doc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\n"
        "doc_to_target: \"{{' '+text.split(' ')[-1]}}\"\n"
        "metric_list:\n"
        "  - {metric: perplexity, aggregation: perplexity, higher_is_better: false}\n"
        "  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
    )
    (tasks / "tiny_wikitext.yaml").write_text(
        "task: tiny_wikitext\n" + dataset("wiki") + "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{page}}"\n'
        "metric_list:\n"
        "  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
    )
    (tasks / "tiny_generate.yaml").write_text(
        "task: tiny_generate\n" + dataset("gen") + "output_type: generate_until\n"
        'doc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
        f"generation_kwargs:\n  until: {json.dumps(UNTIL)}\n  max_gen_toks: {MAX_GEN}\n"
        "  do_sample: false\n"
        "metric_list:\n  - {metric: exact_match, aggregation: mean, higher_is_better: true}\n"
    )
    return tasks


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, asset_cache: Path) -> dict[str, Any]:
    """The model folder, the task folder, and lm-eval's Hugging Face model's results on them."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    root = tmp_path_factory.mktemp("harness")
    with pytest.MonkeyPatch.context() as mp:
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            mp.setenv(name, "1")
        hf_model = _random_gpt2(root / "model")
        tasks = _write_tasks(root, hf_model)
        reference = lm_eval.simple_evaluate(
            model="hf",
            model_args=f"pretrained={root / 'model'},dtype=float32,device=cpu",
            tasks=TASKS,
            batch_size=4,
            task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
            log_samples=True,
        )
    return {"model": root / "model", "tasks": tasks, "reference": reference}


def _ours(setup: dict[str, Any], batch_size: int) -> dict[str, Any]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from gpt2.harness import HarnessModel

    model, tokenizer = load_model(str(setup["model"]), "cpu")
    return lm_eval.simple_evaluate(
        model=HarnessModel(model, tokenizer, batch_size=batch_size, show_progress=False),
        tasks=TASKS,
        task_manager=TaskManager(include_path=str(setup["tasks"]), include_defaults=False),
        log_samples=True,
    )


def _metrics(results: dict[str, Any]) -> dict[tuple[str, str], float]:
    """Every figure of every task, by (task, metric); the stderr and alias entries left out."""
    return {
        (task, key): value
        for task, figures in results["results"].items()
        for key, value in figures.items()
        if "stderr" not in key and isinstance(value, (int, float))
    }


def _assert_same_figures(ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    a, b = _metrics(ours), _metrics(theirs)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=RTOL), key


@pytest.mark.parametrize("batch_size", [1, 5])
def test_every_figure_equals_lm_evals_hf_model(setup: dict[str, Any], batch_size: int) -> None:
    ours, theirs = _ours(setup, batch_size), setup["reference"]
    _assert_same_figures(ours, theirs)
    metrics = _metrics(ours)
    assert {(t, m) for t, m in metrics} >= {
        ("tiny_lambada", "acc,none"),
        ("tiny_lambada", "perplexity,none"),
        ("tiny_wikitext", "word_perplexity,none"),
        ("tiny_wikitext", "byte_perplexity,none"),
        ("tiny_wikitext", "bits_per_byte,none"),
        ("tiny_generate", "exact_match,none"),
    }
    assert 0 < metrics[("tiny_lambada", "acc,none")] < 1  # the greedy words count
    assert 0 < metrics[("tiny_generate", "exact_match,none")] < 1  # so do the greedy answers
    # Sample by sample: each request's log-likelihood and greediness, each completion's text.
    for task in TASKS:
        mine = sorted(ours["samples"][task], key=lambda s: s["doc_id"])
        ref = sorted(theirs["samples"][task], key=lambda s: s["doc_id"])
        assert len(mine) == len(ref) > 0
        for s, r in zip(mine, ref, strict=True):
            if task == "tiny_generate":
                assert s["filtered_resps"] == r["filtered_resps"]
            else:
                for x, y in zip(s["filtered_resps"], r["filtered_resps"], strict=True):
                    x, y = (x, y) if isinstance(x, (list, tuple)) else ([x], [y])
                    assert float(x[0]) == pytest.approx(float(y[0]), rel=RTOL)
                    assert list(x[1:]) == list(y[1:])
    completions = [s["filtered_resps"][0] for s in ours["samples"]["tiny_generate"]]
    assert any(0 < len(c) < MAX_GEN for c in completions)  # some stopped at a stop string


def _gpt2(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``gpt2 -q ARGS`` in this process (a fresh interpreter would import torch and lm-eval
    again, seconds per test): exit status, stdout, stderr."""
    from gpt2.cli import main

    capsys.readouterr()
    try:
        code = main(["-q", *args])
    except SystemExit as e:  # --help, or a usage error
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_writes_lm_evals_results_json(
    setup: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "results.json"
    code, stdout, stderr = _gpt2(
        capsys, "eval", "--checkpoint", str(setup["model"]), "--harness", ",".join(TASKS),
        "--include-path", str(setup["tasks"]), "--batch-size", "4", "--num-fewshot", "0",
        "--output-path", str(out), "--device", "cpu",
    )  # fmt: skip
    assert code == 0, stderr
    assert "tiny_lambada" in stdout and "word_perplexity" in stdout  # lm-eval's table
    results = json.loads(out.read_text())
    assert set(results["results"]) == set(TASKS)
    assert results["n-shot"] == dict.fromkeys(TASKS, 0)
    _assert_same_figures(results, setup["reference"])

    code, _, stderr = _gpt2(
        capsys, "eval", "--checkpoint", str(setup["model"]), "--harness", "tiny_lambada",
        "--include-path", str(setup["tasks"]), "--limit", "3", "--output-path", str(out),
    )  # fmt: skip
    assert code == 0, stderr
    assert json.loads(out.read_text())["n-samples"]["tiny_lambada"]["effective"] == 3


def test_unknown_task_is_one_line(
    setup: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, stderr = _gpt2(
        capsys, "eval", "--checkpoint", str(setup["model"]),
        "--harness", "tiny_lambada,no_such_task", "--include-path", str(setup["tasks"]),
    )  # fmt: skip
    assert code == 2
    assert stderr.strip().splitlines() == [
        "gpt2 eval: error: unknown lm-eval task(s): no_such_task (`lm-eval ls tasks` lists "
        "them; --include-path DIR adds task YAML files of your own)"
    ]


def test_missing_lm_eval_is_one_line(
    setup: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # None in sys.modules makes `import lm_eval` fail as if it were not installed.
    for name in [m for m in sys.modules if m == "gpt2.harness" or m.startswith("lm_eval")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    monkeypatch.delattr(gpt2, "harness", raising=False)
    code, _, stderr = _gpt2(
        capsys, "eval", "--checkpoint", str(setup["model"]), "--harness", "tiny_lambada"
    )
    assert code == 2
    assert stderr.strip().splitlines() == [
        "gpt2 eval: error: --harness needs lm-evaluation-harness: pip install -e '.[harness]' "
        "(or pip install lm-eval)"
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give one of --task or --harness"),
        (["--task", "lambada", "--harness", "x"], "give one of --task or --harness"),
        (["--task", "lambada", "--num-fewshot", "1"], "--num-fewshot applies to --harness only"),
        (["--harness", "x", "--include-path", "/no/such/dir"], "--include-path /no/such/dir: not a folder"),
        (["--harness", " , "], "--harness needs at least one task name"),
    ],
)  # fmt: skip
def test_option_errors_are_one_line(
    setup: dict[str, Any], args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, stderr = _gpt2(capsys, "eval", "--checkpoint", str(setup["model"]), *args)
    assert code == 2
    assert stderr.strip().splitlines() == [f"gpt2 eval: error: {message}"]


def test_help_documents_harness(capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, _ = _gpt2(capsys, "eval", "--help")
    assert code == 0
    for option in ("--harness", "--include-path", "--num-fewshot", "--output-path", "--limit"):
        assert option in stdout
