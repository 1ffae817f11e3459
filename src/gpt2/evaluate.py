"""Evaluation: perplexity of a text, HellaSwag and LAMBADA accuracy, for any `GPT` and tokenizer.

Every task reduces to one question asked of the model many times: "how likely are the last ``n``
tokens of this row, given the tokens before them, and is each of them the model's first choice?"
`score_rows` answers it in batches; the tasks only build the rows and turn the answers into
figures.

    perplexity  a text (or a token file) cut into overlapping windows, every token scored once
                (Hugging Face, "Perplexity of fixed-length models"); token-weighted mean NLL,
                perplexity, bits per byte.
    hellaswag   each ending's log-likelihood given the context: ``acc`` picks the largest sum,
                ``acc_norm`` the largest length-normalised one. ``style="harness"`` follows
                lm-evaluation-harness (its prompt clean-up, normalised by characters);
                ``style="nanogpt"`` follows build-nanogpt's hellaswag.py (the raw ``ctx``,
                normalised by tokens).
    lambada     OpenAI's LAMBADA test set: the text minus its last word is the context, `` word``
                the target; ``acc`` counts targets whose every token is the greedy choice, and
                ``perplexity`` is exp(-mean log p(word)), both as lm-evaluation-harness's
                ``lambada_openai`` defines them.

The public data sets are assets (`gpt2.assets`): downloaded once, checked by sha256; ``data=``
points at a local copy instead.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from gpt2.assets import ASSETS, fetch, sha256_file
from gpt2.corpus import read_text
from gpt2.errors import UserError
from gpt2.files import read_jsonl
from gpt2.model import GPT
from gpt2.shards import open_shard
from gpt2.tokenizer import TOKENIZER_FILE, Tokenizer, load_tokenizer

TASKS = ("perplexity", "hellaswag", "lambada")
HELLASWAG_STYLES = ("harness", "nanogpt")
DEFAULT_BATCH_SIZE = 8

# The data each task reads when none is given: an asset name (see gpt2.assets.ASSETS).
DEFAULT_DATA = {
    "perplexity": "wikitext-2-raw/wikitext-2-raw-v1.zip",
    "hellaswag": "hellaswag/hellaswag_val.jsonl",
    "lambada": "lambada/lambada_test.jsonl",
}
# The member of a WikiText zip that is scored: the test split, as the GPT-2 paper reports.
WIKITEXT_MEMBER = "wiki.test.raw"


# ----------------------------------------------------------------------------------------------
# Scoring rows: the one model call every task is built on


@dataclass(frozen=True)
class Row:
    """Tokens whose last ``n_scored`` are predicted from the ones before them."""

    tokens: Sequence[int]  # a list or a 1-D numpy array
    n_scored: int


@dataclass
class RowScores:
    """Per row: the summed log-probability of the scored tokens, how many were scored (fewer than
    asked when a row is longer than the context), and whether each was the model's argmax."""

    logprob: np.ndarray  # (N,) float64
    n_scored: np.ndarray  # (N,) int64
    greedy: np.ndarray  # (N,) bool


def _fit_row(row: Row, block_size: int) -> tuple[np.ndarray, int]:
    """Drop tokens from the left until the row fits the context (block_size inputs + 1 target)."""
    tokens = np.asarray(row.tokens, dtype=np.int64)[-(block_size + 1) :]
    return tokens, min(row.n_scored, len(tokens) - 1)


@torch.no_grad()
def score_rows(
    model: GPT,
    rows: Sequence[Row],
    batch_size: int = DEFAULT_BATCH_SIZE,
    desc: str = "scoring",
    show_progress: bool = False,
) -> RowScores:
    """Score ``rows`` with ``batch_size`` rows per forward pass.

    Rows are sorted by length so a batch holds rows of similar length, then right-padded: under a
    causal mask a pad token after a row cannot change the logits of the positions before it.
    """
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    block = model.config.block_size
    fitted = [_fit_row(row, block) for row in rows]
    for i, (tokens, n) in enumerate(fitted):
        if n < 1:
            raise ValueError(f"row {i} has no token to score ({len(tokens)} tokens, n_scored {n})")
    device = next(model.parameters()).device
    order = sorted(range(len(fitted)), key=lambda i: len(fitted[i][0]), reverse=True)
    logprob = np.zeros(len(fitted), dtype=np.float64)
    n_scored = np.array([n for _, n in fitted], dtype=np.int64)
    greedy = np.zeros(len(fitted), dtype=bool)

    was_training = model.training
    model.eval()
    bar = tqdm(total=len(fitted), desc=desc, unit="row", disable=not show_progress)
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            T = len(fitted[batch[0]][0]) - 1  # the longest row's inputs: the batch is sorted
            x = torch.zeros((len(batch), T), dtype=torch.long)  # (B, T) inputs, 0-padded
            y = torch.full((len(batch), T), -1, dtype=torch.long)  # (B, T) targets, -1: unscored
            for b, i in enumerate(batch):
                tokens, n = fitted[i]
                length = len(tokens) - 1
                x[b, :length] = torch.from_numpy(tokens[:-1])
                y[b, length - n : length] = torch.from_numpy(tokens[length - n + 1 :])
            x, y = x.to(device), y.to(device)
            logits, _ = model(x)  # (B, T, V)
            scored = y >= 0  # (B, T)
            # Only the scored positions go through the softmax: with a short continuation that
            # is a few rows of (V,) instead of the whole (B, T, V).
            picked = logits[scored].float()  # (S, V)
            nll = F.cross_entropy(picked, y[scored], reduction="none")  # (S,)
            hit = picked.argmax(dim=-1) == y[scored]  # (S,)
            # Summed per row in float64 on the CPU (MPS has no float64): S numbers, cheap to move.
            row_of = torch.nonzero(scored)[:, 0].cpu()  # (S,) the batch row of each scored token
            sums = torch.zeros(len(batch), dtype=torch.float64)
            sums.index_add_(0, row_of, nll.cpu().double())
            misses = torch.zeros(len(batch), dtype=torch.long)
            misses.index_add_(0, row_of, (~hit).cpu().long())
            idx = np.asarray(batch)
            logprob[idx] = -sums.numpy()
            greedy[idx] = (misses == 0).numpy()
            bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    return RowScores(logprob, n_scored, greedy)


# ----------------------------------------------------------------------------------------------
# Data: where it comes from and what it hashes to


@dataclass(frozen=True)
class DataSource:
    path: Path
    sha256: str
    asset: str | None = None  # the asset name when it came from the cache

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "sha256": self.sha256, "asset": self.asset}


def resolve_data(task: str, data: str | Path | None) -> DataSource:
    """The task's file: ``data`` when given (a local path), else its asset, fetched once."""
    if data is None or str(data) == "":
        name = DEFAULT_DATA[task]
        try:
            path = fetch(name)
        except UserError as e:
            raise UserError(
                f"{e}; or give a local copy with --data (training: --eval-data)"
            ) from None
        return DataSource(path, ASSETS[name].sha256, name)
    path = Path(data)
    if not path.exists():
        raise UserError(f"data file not found: {path}")
    if not path.is_file():
        raise UserError(f"data is not a file: {path}")
    return DataSource(path, sha256_file(path))


def read_items(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """The first ``limit`` items of a benchmark's JSON Lines file; none is an error."""
    items = read_jsonl(path, limit)
    if not items:
        raise UserError(f"{path} has no items")
    return items


def _field(
    item: dict[str, Any], key: str, path: Path, index: int, kind: type | tuple[type, ...]
) -> Any:
    """``item[key]``, or a `UserError` naming the file, the item and the key."""
    if key not in item:
        raise UserError(f"{path} item {index + 1}: missing key {key!r}")
    value = item[key]
    if not isinstance(value, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise UserError(f"{path} item {index + 1}: {key!r} should be a {names}")
    return value


def _encode(tokenizer: Tokenizer, text: str) -> list[int]:
    """Text as ids; ``<|endoftext|>`` inside evaluation text is ordinary text, not a control."""
    encode_ordinary = getattr(tokenizer, "encode_ordinary", None)
    return encode_ordinary(text) if encode_ordinary else tokenizer.encode(text)


def _context(tokenizer: Tokenizer, text: str, where: str) -> list[int]:
    """Context ids; an empty context becomes the end-of-text id, the document boundary GPT-2
    was trained with, so that the first continuation token still has something to follow."""
    ids = _encode(tokenizer, text)
    if ids:
        return ids
    if tokenizer.eot_token is None:
        raise UserError(f"{where}: empty context, and this tokenizer has no end-of-text token")
    return [tokenizer.eot_token]


# ----------------------------------------------------------------------------------------------
# Tasks


class Task(ABC):
    """A data set read and tokenized once, then `evaluate`d as often as wanted (for example
    every few hundred training steps). ``n_items`` is how many items are scored (tokens for
    perplexity, examples otherwise); ``options``, the task's settings, go into the record."""

    name: str

    def __init__(self, source: DataSource, n_items: int, **options: Any) -> None:
        self.source, self.n_items, self.options = source, n_items, options

    @abstractmethod
    def evaluate(
        self, model: GPT, batch_size: int = DEFAULT_BATCH_SIZE, show_progress: bool = False
    ) -> dict[str, float]:
        """The task's figures for ``model``."""


def sliding_windows(n_tokens: int, block_size: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """``(start, stop, n_new)``: windows ``tokens[start:stop]`` of at most ``block_size + 1``
    tokens, each scoring its last ``n_new`` tokens, so that tokens 1..n_tokens-1 are each scored
    exactly once, and after the first window with at least ``block_size - stride`` tokens of
    context before them.
    """
    if not 1 <= stride <= block_size:
        raise UserError(f"stride must be between 1 and the block size {block_size}, got {stride}")
    start, stop = 0, min(block_size + 1, n_tokens)
    yield start, stop, stop - 1
    while stop < n_tokens:
        start += stride
        new_stop = min(start + block_size + 1, n_tokens)
        yield start, new_stop, new_stop - stop
        stop = new_stop


class PerplexityTask(Task):
    """Token-weighted perplexity of one long token sequence."""

    name = "perplexity"

    def __init__(
        self, tokens: np.ndarray, n_bytes: int, source: DataSource, stride: int | None = None
    ) -> None:
        if len(tokens) < 2:
            raise UserError(
                f"{source.path} gives {len(tokens)} token(s): perplexity needs at least 2"
            )
        # The first token has no context and is not scored.
        super().__init__(source, len(tokens) - 1, stride=stride)
        self.tokens = tokens
        self.n_bytes = n_bytes  # bytes of the text that the scored tokens spell
        self.stride = stride

    def evaluate(
        self, model: GPT, batch_size: int = DEFAULT_BATCH_SIZE, show_progress: bool = False
    ) -> dict[str, float]:
        block = model.config.block_size
        stride = self.stride or block
        rows = [
            Row(self.tokens[start:stop], n_new)
            for start, stop, n_new in sliding_windows(len(self.tokens), block, stride)
        ]
        scores = score_rows(model, rows, batch_size, "perplexity", show_progress)
        total_nll = -float(scores.logprob.sum())
        n = int(scores.n_scored.sum())
        nll = total_nll / n
        return {
            "nll": nll,
            "perplexity": math.exp(nll),
            "bits_per_byte": total_nll / (math.log(2) * self.n_bytes),
            "tokens": n,
            "bytes": self.n_bytes,
            "stride": stride,
            "windows": len(rows),
        }


def _wikitext_member(archive: zipfile.ZipFile, path: Path) -> str:
    """The test split's name inside a WikiText zip, or the only file of a one-file zip."""
    names = [n for n in archive.namelist() if not n.endswith("/")]
    matches = [n for n in names if n.endswith(WIKITEXT_MEMBER)]
    if len(matches) == 1:
        return matches[0]
    if len(names) == 1:
        return names[0]
    raise UserError(
        f"{path}: a zip must hold one file or one {WIKITEXT_MEMBER}; it has {len(names)}"
    )


def read_eval_text(path: Path) -> str:
    """A UTF-8 text file, or the WikiText test split read straight out of its zip."""
    if path.suffix != ".zip":
        return read_text(path)
    try:
        with zipfile.ZipFile(path) as archive:
            raw = archive.read(_wikitext_member(archive, path))
    except zipfile.BadZipFile as e:
        raise UserError(f"{path} is not a readable zip file: {e}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: the text inside is not UTF-8 (byte {e.start})") from None


def read_token_file(path: Path, tokenizer: Tokenizer) -> np.ndarray:
    """A ``.bin`` token shard (`gpt2.shards`, llm.c's format). A ``tokenizer.json`` beside it
    must be the model's."""
    folder = path.parent
    beside = load_tokenizer(folder) if (folder / TOKENIZER_FILE).is_file() else None
    if beside is not None and beside.to_dict() != tokenizer.to_dict():
        raise UserError(
            f"{path} was tokenized by {folder / TOKENIZER_FILE}, not the model's tokenizer"
        )
    tokens = np.asarray(open_shard(path), dtype=np.int64)
    if len(tokens) and tokens.max() >= tokenizer.vocab_size:
        raise UserError(
            f"{path} holds id {tokens.max()}, outside the vocabulary of {tokenizer.vocab_size}"
        )
    return tokens


def load_perplexity(
    tokenizer: Tokenizer, source: DataSource, limit: int | None, stride: int | None
) -> PerplexityTask:
    if source.path.suffix == ".bin":
        tokens = read_token_file(source.path, tokenizer)
    else:
        tokens = np.asarray(_encode(tokenizer, read_eval_text(source.path)), dtype=np.int64)
    if limit is not None:
        tokens = tokens[: limit + 1]
    n_bytes = len(tokenizer.decode_bytes(tokens[1:].tolist()))
    return PerplexityTask(tokens, n_bytes, source, stride)


def hellaswag_preprocess(text: str) -> str:
    """lm-evaluation-harness's clean-up of HellaSwag text: WikiHow's ``[title]`` becomes a
    sentence break and other bracketed artefacts are removed."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


@dataclass
class ChoiceItem:
    """One multiple-choice question: a context, its candidate continuations, the right one."""

    context: list[int]
    choices: list[list[int]]
    label: int
    lengths: list[int] = field(default_factory=list)  # the normaliser of each choice for acc_norm


class HellaSwagTask(Task):
    name = "hellaswag"

    def __init__(self, items: list[ChoiceItem], source: DataSource, style: str) -> None:
        super().__init__(source, len(items), style=style)
        self.items = items
        self.style = style

    def evaluate(
        self, model: GPT, batch_size: int = DEFAULT_BATCH_SIZE, show_progress: bool = False
    ) -> dict[str, float]:
        rows = [
            Row(item.context + choice, len(choice))
            for item in self.items
            for choice in item.choices
        ]
        scores = score_rows(model, rows, batch_size, "hellaswag", show_progress)
        correct = correct_norm = 0
        offset = 0
        for item in self.items:
            k = len(item.choices)
            logprob = scores.logprob[offset : offset + k]
            # nanogpt normalises by the tokens actually scored, the harness by the characters.
            norm = (
                scores.n_scored[offset : offset + k]
                if self.style == "nanogpt"
                else np.asarray(item.lengths)
            )
            correct += int(np.argmax(logprob)) == item.label
            correct_norm += int(np.argmax(logprob / norm)) == item.label
            offset += k
        n = len(self.items)
        return {"acc": correct / n, "acc_norm": correct_norm / n, "items": n}


def load_hellaswag(
    tokenizer: Tokenizer, source: DataSource, limit: int | None, style: str
) -> HellaSwagTask:
    if style not in HELLASWAG_STYLES:
        raise UserError(f"unknown HellaSwag style {style!r}; known: {', '.join(HELLASWAG_STYLES)}")
    path = source.path
    items = []
    for i, raw in enumerate(read_items(path, limit)):
        endings = _field(raw, "endings", path, i, list)
        if len(endings) < 2 or not all(isinstance(e, str) and e for e in endings):
            raise UserError(f"{path} item {i + 1}: 'endings' must be two or more non-empty strings")
        try:
            label = int(_field(raw, "label", path, i, (int, str)))
        except ValueError:
            raise UserError(f"{path} item {i + 1}: 'label' is not a number") from None
        if not 0 <= label < len(endings):
            raise UserError(
                f"{path} item {i + 1}: label {label} is not an index into its {len(endings)} endings"
            )
        if style == "harness":
            ctx_b = _field(raw, "ctx_b", path, i, str)
            ctx = _field(raw, "ctx_a", path, i, str) + " " + ctx_b.capitalize()
            query = hellaswag_preprocess(_field(raw, "activity_label", path, i, str) + ": " + ctx)
            texts = [hellaswag_preprocess(e) for e in endings]
        else:
            query = _field(raw, "ctx", path, i, str)
            texts = list(endings)
        context = _context(tokenizer, query, f"{path} item {i + 1}")
        choices = [_encode(tokenizer, " " + t) for t in texts]
        items.append(ChoiceItem(context, choices, label, [max(1, len(t)) for t in texts]))
    return HellaSwagTask(items, source, style)


@dataclass
class TargetItem:
    context: list[int]
    target: list[int]


class LambadaTask(Task):
    name = "lambada"

    def __init__(self, items: list[TargetItem], source: DataSource) -> None:
        super().__init__(source, len(items))
        self.items = items

    def evaluate(
        self, model: GPT, batch_size: int = DEFAULT_BATCH_SIZE, show_progress: bool = False
    ) -> dict[str, float]:
        rows = [Row(item.context + item.target, len(item.target)) for item in self.items]
        scores = score_rows(model, rows, batch_size, "lambada", show_progress)
        n = len(self.items)
        return {
            "acc": float(scores.greedy.mean()),
            # Per word, not per token: exp of the mean negative log-likelihood of whole words.
            "perplexity": math.exp(-float(scores.logprob.mean())),
            "target_tokens": int(scores.n_scored.sum()),
            "items": n,
        }


def load_lambada(tokenizer: Tokenizer, source: DataSource, limit: int | None) -> LambadaTask:
    path = source.path
    items = []
    for i, raw in enumerate(read_items(path, limit)):
        text = _field(raw, "text", path, i, str)
        if " " not in text.strip():
            raise UserError(f"{path} item {i + 1}: the text needs a context and a last word")
        context, word = text.rsplit(" ", 1)
        if not word:
            raise UserError(
                f"{path} item {i + 1}: the text ends in a space, so it has no last word"
            )
        context_ids = _context(tokenizer, context, f"{path} item {i + 1}")
        items.append(TargetItem(context_ids, _encode(tokenizer, " " + word)))
    return LambadaTask(items, source)


def load_task(
    task: str,
    tokenizer: Tokenizer,
    data: str | Path | None = None,
    limit: int | None = None,
    stride: int | None = None,
    style: str = "harness",
) -> Task:
    """Read and tokenize a task's data (``data``, else its asset): the first ``limit`` items, or
    for perplexity the first ``limit`` scored tokens."""
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    if limit is not None and limit < 1:
        raise UserError(f"limit must be at least 1, got {limit}")
    if stride is not None and stride < 1:
        raise UserError(f"stride must be at least 1, got {stride}")
    source = resolve_data(task, data)
    if task == "perplexity":
        return load_perplexity(tokenizer, source, limit, stride)
    if task == "hellaswag":
        return load_hellaswag(tokenizer, source, limit, style)
    return load_lambada(tokenizer, source, limit)


def evaluate_task(model: GPT, tokenizer: Tokenizer, task: str, **options: Any) -> dict[str, float]:
    """One call: load ``task`` and return its figures for ``model`` (dropout is off while scoring
    and the model's train/eval mode is restored afterwards); ``options`` are `run_eval`'s."""
    return run_eval(model, tokenizer, task, model_name="", **options).metrics


# ----------------------------------------------------------------------------------------------
# A full run, as the command line does it: the figures plus what they were measured on


@dataclass
class EvalResult:
    task: str
    model: str
    metrics: dict[str, float]
    items: int
    data: DataSource
    options: dict[str, Any]
    seconds: float
    model_config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "data": self.data.to_dict()}


def run_eval(
    model: GPT,
    tokenizer: Tokenizer,
    task: str,
    model_name: str,
    data: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    stride: int | None = None,
    style: str = "harness",
    show_progress: bool = False,
) -> EvalResult:
    loaded = load_task(task, tokenizer, data, limit, stride, style)
    t0 = time.perf_counter()
    metrics = loaded.evaluate(model, batch_size, show_progress)
    seconds = time.perf_counter() - t0
    options = {"limit": limit, "batch_size": batch_size, **loaded.options}
    if task == "perplexity":
        options["stride"] = metrics["stride"]
    return EvalResult(task, model_name, metrics, loaded.n_items, loaded.source, options,
                      seconds, model.config.to_dict())  # fmt: skip


def format_table(result: EvalResult) -> str:
    """The figures as an aligned two-column table for the terminal."""
    unit = "tokens" if result.task == "perplexity" else "items"
    header = [
        ("task", result.task),
        ("model", result.model),
        ("data", str(result.data.path)),
        ("sha256", result.data.sha256),
        (unit, f"{result.items:,}"),
        ("seconds", f"{result.seconds:.1f}"),
    ]
    figures = [
        (k, f"{v:,}" if isinstance(v, int) else f"{v:.4f}") for k, v in result.metrics.items()
    ]
    width = max(len(k) for k, _ in header + figures)
    lines = [f"{k:<{width}}  {v}" for k, v in header]
    lines.append("-" * (width + 14))
    lines += [f"{k:<{width}}  {v:>12}" for k, v in figures]
    return "\n".join(lines)
