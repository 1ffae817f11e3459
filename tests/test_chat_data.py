"""Conversation data and fine-tuning on it: ``gpt2 prepare --chat`` (JSONL, folders, Parquet, a
saved Hugging Face dataset) writes llm.c shards whose masks are `gpt2.chat.conversation_ids`'s;
it resumes to identical files; bad lines are one-line errors; the loader turns unmasked targets
into -1; masked tokens add exactly nothing to the gradient; micro-batches weigh their scored
tokens; training resumes exactly and ``gpt2 train --init-from`` writes the data's template."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import gpt2.corpus
import gpt2.prepare
import gpt2.shards
from gpt2.chat import check_messages, conversation_ids
from gpt2.checkpoint import load_checkpoint
from gpt2.cli import main
from gpt2.config import GPTConfig, TrainConfig
from gpt2.loader import WindowSequence
from gpt2.model import GPT
from gpt2.prepare import is_val_document
from gpt2.shards import (
    CONVERSATION_START,
    HEADER_BYTES,
    MAGIC,
    MASK_MAGIC,
    REPLY,
    load_masks,
    load_split,
    read_meta,
)
from gpt2.tokenizer import GPT2Tokenizer, load_tokenizer
from gpt2.train import Trainer

TINY = {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32, "dropout": 0.0}
VAL_FRACTION = 0.1
# A custom template: other role markers, the reply still closed by end-of-text.
TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}Bot: {{ m['content'] }}{{ eos_token }}"
    "{% else %}{{ m['role'] }}: {{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Bot:{% endif %}"
)


def conversations(n: int) -> list[list[dict]]:
    """Conversations of one to three turns, some with a system message, replies of varied length."""
    out = []
    for i in range(n):
        messages = [{"role": "system", "content": "Answer briefly."}] if i % 3 == 0 else []
        for t in range(1 + i % 3):
            messages.append({"role": "user", "content": f"What is {i} plus {t}?"})
            messages.append({"role": "assistant", "content": f"{i + t}." + " Quite so." * (i % 4)})
        out.append(messages)
    return out


CONVERSATIONS = conversations(120)


def write_jsonl(path: Path, convs: list[list[dict]], field: str = "messages") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({field: c}) + "\n" for c in convs), encoding="utf-8")
    return path


def expected(tok: GPT2Tokenizer, template: str | None = None) -> dict[str, tuple[list, list]]:
    """Each split's ids and mask: the conversations' `conversation_ids`, back to back."""
    out: dict[str, tuple[list, list]] = {"train": ([], []), "val": ([], [])}
    for n, conv in enumerate(CONVERSATIONS):
        ids, mask = conversation_ids(tok, check_messages(conv), template)
        split = out["val" if is_val_document(n, VAL_FRACTION) else "train"]
        split[0].extend(ids)
        split[1].extend(mask)
    return out


def prepare_chat(out: Path, *args: str) -> int:
    return main(["-q", "prepare", "--chat", "--out", str(out), "--val-fraction", str(VAL_FRACTION),
                 "--shard-tokens", "600", "--workers", "1", *args])  # fmt: skip


def data_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix in (".bin", ".mask")}  # fmt: skip


@pytest.fixture(scope="module")
def gpt2_tok(asset_cache: Path) -> GPT2Tokenizer:
    return GPT2Tokenizer()


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory: pytest.TempPathFactory, asset_cache: Path) -> Path:
    out = tmp_path_factory.mktemp("chat") / "data"
    jsonl = write_jsonl(out.parent / "in" / "chat.jsonl", CONVERSATIONS)
    assert prepare_chat(out, "--input", str(jsonl)) == 0
    return out


# --- prepare --chat -------------------------------------------------------------------------------


def test_jsonl_gives_llmc_shards_with_the_masks_of_conversation_ids(chat_data, gpt2_tok):
    meta, want = read_meta(chat_data), expected(gpt2_tok)
    assert meta["documents"] == {"train": 108, "val": 12}
    assert load_tokenizer(chat_data).chat_template is None  # the default template
    for split in ("train", "val"):
        tokens, masks = load_split(chat_data, split), load_masks(chat_data, split)
        assert masks is not None and [len(m) for m in masks] == [len(t) for t in tokens]
        assert np.concatenate(tokens).tolist() == want[split][0]
        flags = np.concatenate(masks)
        assert (flags & REPLY).astype(bool).tolist() == want[split][1]
        starts = np.flatnonzero(flags & CONVERSATION_START)
        assert len(starts) == meta["documents"][split] and starts[0] == 0
        assert meta["trained_tokens"][split] == sum(want[split][1]) > 0
        assert meta["masks"][split] == [n.replace(".bin", ".mask") for n in meta["shards"][split]]
        first = meta["shards"][split][0]
        header = np.fromfile(chat_data / first, dtype="<i4", count=3)
        assert header.tolist() == [MAGIC, 1, len(tokens[0])]  # llm.c's, unchanged
        mask_file = (chat_data / first.replace(".bin", ".mask")).read_bytes()
        assert mask_file[:4] == b"MASK" and int.from_bytes(b"MASK", "little") == MASK_MAGIC
        assert np.frombuffer(mask_file[4:12], dtype="<i4").tolist() == [1, len(tokens[0])]
        assert len(mask_file) == HEADER_BYTES + len(tokens[0])
    assert len(meta["shards"]["train"]) > 3


def test_folder_parquet_and_saved_dataset_give_the_same_files(chat_data, tmp_path):
    folder = tmp_path / "folder"
    write_jsonl(folder / "a.jsonl", CONVERSATIONS[:50])
    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    pq.write_table(pa.Table.from_pylist([{"messages": c} for c in CONVERSATIONS[50:]]), folder / "b.parquet")  # fmt: skip
    (folder / "notes.txt").write_text("not a conversation")  # a folder's text files are not read
    assert prepare_chat(tmp_path / "from-folder", "--input", str(folder)) == 0
    assert data_files(tmp_path / "from-folder") == data_files(chat_data)
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"conversation": CONVERSATIONS}).save_to_disk(str(tmp_path / "ds"))
    assert prepare_chat(tmp_path / "from-hf", "--hf-dataset", str(tmp_path / "ds"), "--messages-field", "conversation") == 0  # fmt: skip
    assert data_files(tmp_path / "from-hf") == data_files(chat_data)


def test_custom_template_is_used_and_saved(tmp_path, gpt2_tok):
    (tmp_path / "t.jinja").write_text(TEMPLATE, encoding="utf-8")
    jsonl = write_jsonl(tmp_path / "c.jsonl", CONVERSATIONS)
    assert prepare_chat(tmp_path / "out", "--input", str(jsonl), "--chat-template", str(tmp_path / "t.jinja")) == 0  # fmt: skip
    assert load_tokenizer(tmp_path / "out").chat_template == TEMPLATE
    want = expected(gpt2_tok, TEMPLATE)
    assert np.concatenate(load_split(tmp_path / "out", "val")).tolist() == want["val"][0]
    masks = load_masks(tmp_path / "out", "val")
    assert masks is not None
    assert (np.concatenate(masks) & REPLY).astype(bool).tolist() == want["val"][1]
    # Another template is another run: the folder is not added to.
    (tmp_path / "u.jinja").write_text(TEMPLATE.replace("Bot", "AI"), encoding="utf-8")
    assert prepare_chat(tmp_path / "out", "--input", str(jsonl), "--chat-template", str(tmp_path / "u.jinja")) == 2  # fmt: skip


class Crash(KeyboardInterrupt):
    """Stands in for a kill: not a UserError, so the run leaves its files as a kill would."""


def test_resume_after_a_crash_gives_identical_shards_and_masks(chat_data, tmp_path, monkeypatch, gpt2_tok):  # fmt: skip
    sources = gpt2.corpus.find_sources(
        [write_jsonl(tmp_path / "c.jsonl", CONVERSATIONS)], chat=True
    )
    kw = dict(shard_tokens=600, val_fraction=VAL_FRACTION, text_field="messages", chat=True, show_progress=False)  # fmt: skip
    monkeypatch.setattr(gpt2.prepare, "BATCH_CHARS", 300)  # many batches; the output is the same
    real_append, calls = gpt2.shards.ShardWriter.append, {"n": 0}

    def crashing(self, ids, documents=0, mask=None):
        real_append(self, ids, documents, mask)
        calls["n"] += 1
        if calls["n"] == 25:  # written past the last checkpoint, then death
            self.file.write(b"\x01\x02" * 50)
            self.mask_file.write(b"\x01" * 77)
            self.flush()
            raise Crash

    monkeypatch.setattr(gpt2.shards.ShardWriter, "append", crashing)
    with pytest.raises(Crash):
        gpt2.prepare.prepare_shards(sources, tmp_path / "cut", gpt2_tok, **kw)
    progress = json.loads((tmp_path / "cut" / "progress.json").read_text())
    assert progress["splits"]["train"]["shard"] > 0 and "trained" in progress["splits"]["train"]
    monkeypatch.setattr(gpt2.shards.ShardWriter, "append", real_append)
    meta = gpt2.prepare.prepare_shards(sources, tmp_path / "cut", gpt2_tok, **kw)
    assert data_files(tmp_path / "cut") == data_files(chat_data)
    assert meta["trained_tokens"] == read_meta(chat_data)["trained_tokens"]
    assert not list((tmp_path / "cut").glob("*.partial"))


BAD_LINES = [
    ("{not json", "not valid JSON"),
    ('{"text": "no messages"}', "no field 'messages'"),
    ('{"messages": []}', "messages must be a non-empty list"),
    ('{"messages": [{"role": "bot", "content": "hi"}]}', "messages[0] has role 'bot'"),
    ('{"messages": [{"role": "user", "content": 3}]}', "messages[0].content must be a string"),
]


@pytest.mark.parametrize("line, why", BAD_LINES)
def test_a_bad_line_is_one_error_naming_file_and_line(line, why, tmp_path, capsys):
    jsonl = write_jsonl(tmp_path / "c.jsonl", CONVERSATIONS[:30])
    with open(jsonl, "a", encoding="utf-8") as f:
        f.write(line + "\n")
    assert prepare_chat(tmp_path / "out", "--input", str(jsonl)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"gpt2 prepare: error: {jsonl}:31: {why}") and "\n" not in err
    assert "--on-bad-line skip" in err and not (tmp_path / "out").exists()
    assert prepare_chat(tmp_path / "out", "--input", str(jsonl), "--on-bad-line", "skip") == 0
    assert read_meta(tmp_path / "out")["stats"]["skipped_lines"] == 1


def test_wrong_inputs_and_templates_are_one_line_errors(tmp_path, capsys):
    jsonl = write_jsonl(tmp_path / "c.jsonl", CONVERSATIONS[:30])
    (tmp_path / "notes.txt").write_text("plain text")
    (tmp_path / "refuses.jinja").write_text("{{ raise_exception('roles must alternate') }}")
    cases = [
        (["--input", str(tmp_path / "notes.txt")], "conversations are read from .jsonl or .parquet"),
        (["--input", str(jsonl), "--chat-template", str(tmp_path / "refuses.jinja")], "the chat template refuses"),
        (["--input", str(jsonl), "--chat-template", str(tmp_path / "none.jinja")], "not found"),
        (["--input", str(jsonl), "--tokenizer", "char"], "end-of-text"),
        ([], "--chat needs --input"),
    ]  # fmt: skip
    for args, why in cases:
        assert prepare_chat(tmp_path / "out", *args) == 2, args
        err = capsys.readouterr().err.strip()
        assert why in err and "\n" not in err and "Traceback" not in err, err
    assert main(["-q", "prepare", "--input", str(jsonl), "--out", str(tmp_path / "t"), "--chat-template", "x.jinja"]) == 2  # fmt: skip
    assert "--chat-template is for conversations: add --chat" in capsys.readouterr().err


# --- the loader and the loss ----------------------------------------------------------------------


def test_loader_rows_are_conversations_with_only_their_replies_as_targets(chat_data, gpt2_tok):
    """Row i of a batch is one whole conversation from its first token (padded, or run on into
    the next one, past its end); its targets are its own replies, -1 everywhere else."""
    tokens, masks = load_split(chat_data, "train"), load_masks(chat_data, "train")
    seq = WindowSequence(tokens, 32, seed=3, masks=masks)
    assert seq.n_windows == read_meta(chat_data)["documents"]["train"]  # one per conversation
    ids = seq.window_ids(0, seq.n_windows)
    assert sorted(ids.tolist()) == list(range(seq.n_windows))  # an epoch: each one once
    x, y = seq.batch(0, seq.n_windows)
    # The conversations of the train split, in file order, rebuilt from the files themselves.
    convs = []
    for t, m in zip(tokens, masks, strict=True):
        starts = np.append(np.flatnonzero(m & CONVERSATION_START), len(t))
        convs += [
            (t[a:b].astype(np.int64), m[a:b] & REPLY)
            for a, b in zip(starts[:-1], starts[1:], strict=True)
        ]
    assert len(convs) == seq.n_windows
    for row, i in enumerate(ids.tolist()):
        conv, reply = convs[i]
        n = min(len(conv), 33)
        assert x[row, : n - 1].tolist() == conv[: n - 1].tolist()
        want = np.where(reply[1:n] == 1, conv[1:n], -1).tolist()
        assert y[row, : n - 1].tolist() == want
        assert (y[row, n - 1 :] == -1).all()  # past its conversation: nothing to learn
    assert (y != -1).any()


@pytest.mark.parametrize("chunked", [False, True], ids=["plain-loss", "chunked-loss"])
def test_masked_targets_add_exactly_nothing_to_the_gradient(chunked):
    """Changing a target the mask leaves out leaves every gradient bit-identical; changing one
    it keeps changes them. (The window's last token is a target only, never an input.)"""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50))
    n = 64
    tokens = np.random.default_rng(0).integers(0, 50, n).astype(np.uint16)
    mask = (np.arange(n) % 3 != 0).astype(np.uint8) * REPLY
    mask[0] |= CONVERSATION_START  # one conversation: the one window starts at 0
    last = 16  # the window's last token: a target only

    def grads(last_token: int, last_trained: bool) -> list[torch.Tensor]:
        t, m = tokens.copy(), mask.copy()
        t[last], m[last] = last_token, REPLY if last_trained else 0
        x, y = WindowSequence([t], 16, seed=0, masks=[m]).batch(0, 1)
        assert y[0, -1] == (last_token if last_trained else -1)
        model.zero_grad()
        loss = model(x, y, return_logits=not chunked)[1]
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    base = grads(7, last_trained=False)
    assert all(torch.equal(a, b) for a, b in zip(base, grads(42, last_trained=False), strict=True))
    kept = grads(7, last_trained=True)
    assert not all(
        torch.equal(a, b) for a, b in zip(kept, grads(42, last_trained=True), strict=True)
    )
    # A batch with nothing to learn counts zero (not 0/0), with no gradient.
    x = torch.from_numpy(tokens[:16].astype(np.int64)).view(1, 16)
    model.zero_grad()
    loss = model(x, torch.full_like(x, -1), return_logits=not chunked)[1]
    loss.backward()
    assert loss.item() == 0.0 and all(not p.grad.any() for p in model.parameters())


# --- training -------------------------------------------------------------------------------------


def config(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=str(data), out_dir=str(out), max_iters=3, batch_size=4, eval_interval=3,
                eval_iters=1, log_interval=1, sample_tokens=0, plot=False, device="cpu",
                warmup_iters=1, learning_rate=1e-3, min_lr=1e-4)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_micro_batches_weigh_their_scored_tokens(chat_data, tmp_path):
    """One batch of 8 windows, or two micro-batches of 4 with different numbers of scored
    targets: the same step, since each micro-batch weighs its share of the step's tokens."""
    whole = Trainer(config(chat_data, tmp_path / "a", batch_size=8), TINY, show_progress=False)
    split = Trainer(config(chat_data, tmp_path / "b", total_batch_tokens=8 * 32), TINY, show_progress=False)  # fmt: skip
    assert (whole.accum_steps, split.accum_steps) == (1, 2)
    counts = [[int((y != -1).sum()) for _, y in split.batches.next_step()] for _ in range(3)]
    split.batches.position = 0
    assert any(a != b for a, b in counts)  # there a mean of the two means is not the mean
    whole.run()
    split.run()
    a, b = records(tmp_path / "a"), records(tmp_path / "b")
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "grad_norm", "trained_tokens"):  # (the eval batches differ)
            if key in ra:
                assert ra[key] == pytest.approx(rb[key], rel=1e-5), key
    steps = [r for r in a if "loss" in r]
    assert [r["trained_tokens"] for r in steps] == np.cumsum([sum(c) for c in counts]).tolist()
    assert steps[0]["trained_tokens_per_s"] < steps[0]["tokens_per_s"]
    # The val loss is the mean over the scored tokens of all its batches together.
    x = torch.cat([x for x, _ in whole.eval_batches["val"]])
    y = torch.cat([y for _, y in whole.eval_batches["val"]])
    whole.model.eval()
    with torch.no_grad():
        direct = whole.model(x, y)[1].item()
    assert whole.estimate_loss()["val"] == pytest.approx(direct, rel=1e-5)


def test_training_on_chat_data_resumes_exactly(chat_data, tmp_path):
    def run(out: Path, **kw) -> None:  # the schedule of 6 steps, however many are run
        Trainer(config(chat_data, out, lr_decay_iters=6, **kw), TINY, show_progress=False).run()

    run(tmp_path / "whole", max_iters=6)
    run(tmp_path / "cut", max_iters=3, save_interval=3)
    run(tmp_path / "cut", max_iters=6, resume="auto")
    whole = [(r["step"], r["loss"], r["trained_tokens"]) for r in records(tmp_path / "whole") if "loss" in r]  # fmt: skip
    cut = [(r["step"], r["loss"], r["trained_tokens"]) for r in records(tmp_path / "cut") if "loss" in r]  # fmt: skip
    assert cut == whole and len(whole) == 6


def test_gpt2_train_init_from_a_checkpoint_writes_the_datas_template(chat_data, tmp_path, capsys):
    """A base model (default template) fine-tuned with the SFT config on data prepared with
    another template: the new checkpoint's tokenizer.json carries the data's template."""
    shape = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32"]
    common = ["--device", "cpu", "--batch-size", "2", "--eval-iters", "1", "--sample-tokens", "0", "--no-plot"]  # fmt: skip
    base = ["-q", "train", "--data", str(chat_data), "--out-dir", str(tmp_path / "base"), "--model", "tiny",
            "--max-iters", "1", "--eval-interval", "1", *shape, *common]  # fmt: skip
    assert main(base) == 0
    (tmp_path / "t.jinja").write_text(TEMPLATE, encoding="utf-8")
    jsonl = write_jsonl(tmp_path / "c.jsonl", CONVERSATIONS)
    assert prepare_chat(tmp_path / "custom", "--input", str(jsonl), "--chat-template", str(tmp_path / "t.jinja")) == 0  # fmt: skip
    sft = ["train", "--config", "sft_gpt2_chat", "--init-from", str(tmp_path / "base"), "--data", str(tmp_path / "custom"),
           "--out-dir", str(tmp_path / "sft"), "--total-batch-tokens", "128", "--max-iters", "3",
           "--eval-interval", "3", "--log-interval", "1", "--warmup-iters", "1", *common]  # fmt: skip
    assert main(sft) == 0
    assert "trained on (the replies)" in capsys.readouterr().err
    ckpt = load_checkpoint(tmp_path / "sft")
    assert ckpt.tokenizer.chat_template == TEMPLATE
    assert json.loads((ckpt.path / "tokenizer.json").read_text())["chat_template"] == TEMPLATE
    assert ckpt.train_config.init_from == str(tmp_path / "base") and ckpt.state["step"] == 3
    steps = [r for r in records(tmp_path / "sft") if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3] and all(r["trained_tokens"] > 0 for r in steps)


@pytest.mark.slow  # two torchrun processes: about 20 s on 2 busy cores (tests/test_ddp.py: text)
def test_two_processes_weigh_tokens_as_one_process_accumulating(chat_data, tmp_path):
    """DDP on conversations: two ranks of one micro-batch each equal one process of two, where
    the micro-batches hold different numbers of scored targets (the weights count both ranks)."""
    import subprocess
    import sys

    settings = ["--device", "cpu", "--max-iters", "3", "--batch-size", "4", "--eval-interval", "3",
                "--eval-iters", "2", "--log-interval", "1", "--sample-tokens", "0", "--no-plot",
                "--warmup-iters", "1", "--learning-rate", "1e-3", "--total-batch-tokens", "256",
                "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32",
                "--dropout", "0.0", "--data", str(chat_data)]  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "gpt2", "-q", "train", "--out-dir", str(tmp_path / "ranks"), *settings]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert main(["-q", "train", "--out-dir", str(tmp_path / "single"), *settings]) == 0
    ranks = [r for r in records(tmp_path / "ranks") if "loss" in r]
    single = [r for r in records(tmp_path / "single") if "loss" in r]
    assert [r["trained_tokens"] for r in ranks] == [r["trained_tokens"] for r in single]
    for a, b in zip(ranks, single, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    val = [[r["val_loss"] for r in records(out) if "val_loss" in r] for out in (tmp_path / "ranks", tmp_path / "single")]  # fmt: skip
    assert val[0] == pytest.approx(val[1], abs=1e-5)


def test_every_command_in_docs_chat_parses():
    """docs/chat.md's commands spell real options (they run above, on local data)."""
    import re
    import shlex

    from gpt2.cli import build_parser

    text = (Path(__file__).resolve().parents[1] / "docs" / "chat.md").read_text(encoding="utf-8")
    commands = [
        line.split("#", 1)[0].strip()
        for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)
        for line in re.sub(r"\\\n\s*", " ", block).splitlines()
        if line.strip().startswith("gpt2 ")
    ]
    assert len(commands) >= 8
    for command in commands:
        assert callable(build_parser().parse_args(shlex.split(command)[1:]).func), command


def test_a_text_folder_is_not_taken_for_conversations(tmp_path):
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(30)))
    args = ["-q", "prepare", "--input", str(jsonl), "--out", str(tmp_path / "out"), "--val-fraction", "0.1"]  # fmt: skip
    assert main([*args, "--shard-tokens", "600"]) == 0
    assert main([*args, "--shard-tokens", "600", "--chat", "--messages-field", "text"]) == 2
    assert load_masks(tmp_path / "out", "train") is None
