"""Hostile input on the command line and in the files it reads: each gets one line on stderr,
exit code 2, no traceback, and nothing runs that should not (a pickle's payload, an allocation
sized by a crafted config, a training step on ids past the vocabulary).

Commands run in-process (`gpt2.cli.main`), as tests/test_cli.py does; models are tiny and built
here, not trained.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from gpt2.checkpoint import load_checkpoint, save_checkpoint
from gpt2.cli import build_parser, main
from gpt2.commands.train import exit_status
from gpt2.config import GPTConfig, TrainConfig
from gpt2.errors import UserError
from gpt2.model import GPT
from gpt2.shards import HEADER_BYTES
from gpt2.tokenizer import CharTokenizer
from gpt2.vocab_checks import tokenizer_difference

TEXT = "the quick brown fox jumps over the lazy dog\n" * 50


def one_line_error(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """Run ``gpt2 ARGV``: exit code 2 and one line on stderr, no traceback; return the line."""
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint of a character model (random weights)."""
    torch.manual_seed(0)
    tok = CharTokenizer.from_text(TEXT)
    config = GPTConfig.preset("tiny", vocab_size=tok.vocab_size)
    return save_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "ckpt", GPT(config), tok, TrainConfig()
    )


def copy_of(ckpt: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(ckpt, tmp_path / "copy"))


# --- options: ranges, NaN, empty strings ----------------------------------------------------

BAD_OPTIONS = [
    (["prepare", "--out", "x", "--workers", "0"], "--workers must be at least 1"),
    (["prepare", "--out", "x", "--workers", "-1"], "--workers must be at least 1"),
    (["prepare", "--out", "x", "--shard-tokens", "0"], "--shard-tokens must be at least 1"),
    (["prepare", "--out", "x", "--val-fraction", "0"], "--val-fraction must be in (0, 1)"),
    (["prepare", "--out", "x", "--val-fraction", "1"], "--val-fraction must be in (0, 1)"),
    (["prepare", "--out", "x", "--val-fraction", "nan"], "--val-fraction must be a finite"),
    (["presets", "--vocab-size", "0"], "--vocab-size must be at least 1"),
    (["presets", "--vocab-size", "-5"], "--vocab-size must be at least 1"),
    (["presets", "--vocab-size", "ten"], "--vocab-size must be an integer"),
    (["train", "--grad-clip", "nan"], "--grad-clip must be a finite number"),
    (["train", "--weight-decay", "nan"], "--weight-decay must be a finite number"),
    (["train", "--weight-decay", "-0.1"], "weight_decay must not be negative"),
    (["train", "--learning-rate", "inf"], "--learning-rate must be a finite number"),
    (["train", "--max-iters", "0"], "max_iters must be at least 1"),
    (["train", "--n-layer", "0"], "n_layer must be a positive integer"),
    (["tokenizer", "train", "--input", "a", "--vocab-size", "300", "--out", "o", "--special", ""],
     "--special must not be empty"),
    (["tokenizer", "train", "--input", "a", "--vocab-size", "300", "--out", "o", "--special", " "],
     "--special must not be empty"),
    (["tokenizer", "train", "--input", "a", "--vocab-size", "0", "--out", "o"],
     "--vocab-size must be at least 1"),
    (["serve", "--checkpoint", "x", "--port", "70000"], "--port must be in 0..65535"),
    (["serve", "--checkpoint", "x", "--max-batch", "0"], "--max-batch must be at least 1"),
    (["serve", "--checkpoint", "x", "--max-queued-tokens", "-1"], "must be at least 1"),
    (["eval", "--checkpoint", "x", "--task", "lambada", "--batch-size", "0"], "must be at least"),
    (["sample", "--checkpoint", "x", "--temperature", "nan"], "must be a finite number"),
    (["prepare", "--out", ""], "--out must not be empty"),
    (["prepare", "--out", "x", "--text-field", ""], "--text-field must not be empty"),
    (["export", "--checkpoint", "", "--out", "x"], "--checkpoint must not be empty"),
    (["serve", "--checkpoint", " "], "--checkpoint must not be empty"),
    (["train", "--out-dir", ""], "out_dir must not be empty"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "message"), BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS]
)
def test_an_option_out_of_range_is_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written anywhere that matters
    assert message in one_line_error(argv, capsys)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("grad_clip = nan", "grad_clip must be a finite number"),
        ("weight_decay = inf", "weight_decay must be a finite number"),
        ('max_iters = "5"', "max_iters must be an integer"),
        ("compile = 1", "compile must be true or false"),
        ("[model]\nn_layer = 2.5", "n_layer must be a positive integer"),
    ],
)
def test_a_config_file_value_of_the_wrong_kind_is_one_line(toml, message, capsys, tmp_path):
    (tmp_path / "run.toml").write_text(toml + "\n")
    assert message in one_line_error(["train", "--config", str(tmp_path / "run.toml")], capsys)


@pytest.mark.parametrize(
    "argv",
    [["-q", "presets"], ["presets", "-q"], ["tokenizer", "-q", "train", "--input", "a",
     "--vocab-size", "300", "--out", "o"], ["tokenizer", "train", "--input", "a",
     "--vocab-size", "300", "--out", "o", "--quiet"]],
)  # fmt: skip
def test_quiet_before_or_after_the_subcommand(argv):
    assert build_parser().parse_args(argv).quiet is True
    assert build_parser().parse_args([a for a in argv if a not in ("-q", "--quiet")]).quiet is False


def test_train_help_shows_the_shape_a_run_without_flags_uses(capsys):
    assert main(["train", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "width of the residual stream (default: 128, from --model char-small)" in out
    assert "(default: 768" not in out and "(default: 12," not in out


def test_a_signal_gives_the_shells_exit_code():
    assert exit_status("") == 0
    assert exit_status("SIGINT") == 130
    assert exit_status("SIGTERM") == 143
    assert exit_status("a signal to another process") == 143


@pytest.mark.parametrize("path", ["./no-such-run", "runs/a/b", "model.safetensors", "~/no-such"])
def test_a_missing_local_path_is_not_sent_to_the_hub(path, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = one_line_error(["sample", "--checkpoint", path], capsys)
    assert "Hub" not in err and ("not found" in err or "no such" in err)


def test_a_missing_path_under_an_existing_folder_is_local(capsys, tmp_path, monkeypatch):
    from gpt2.hf import looks_local

    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    assert looks_local("out/typo") and not looks_local("openai-community/gpt2")
    assert "Hub" not in one_line_error(["eval", "--checkpoint", "out/typo", "--task",
                                        "lambada"], capsys)  # fmt: skip


# --- files read back: crafted configs, non-finite weights, tokenizers, ids ---------------------


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("vocab_size", 1_000_000_000, "over the limit"),
        ("n_layer", 10**7, "over the limit"),
        ("n_embd", 1 << 16, "parameters, over the limit"),  # with n_layer 1024 below
        ("n_layer", -1, "positive integer"),
        ("n_head", 0, "positive integer"),
        ("block_size", 2.5, "positive integer"),
        ("n_embd", "32", "positive integer"),
        ("vocab_size", 1000, "does not match its config"),  # sane, but not the file's
        ("block_size", 64, "does not match its config"),
    ],
)
def test_a_crafted_config_is_refused_before_anything_is_allocated(
    ckpt, tmp_path, capsys, monkeypatch, field, value, message
):
    folder = copy_of(ckpt, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["model"][field] = value
    if field == "n_embd" and value == 1 << 16:
        config["model"].update(n_layer=1024, n_head=1)
    (folder / "config.json").write_text(json.dumps(config))

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the config was checked")

    monkeypatch.setattr("gpt2.checkpoint.GPT", no_model)
    assert message in one_line_error(["sample", "--checkpoint", str(folder)], capsys)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused_at_load(ckpt, tmp_path, capsys, bad):
    folder = copy_of(ckpt, tmp_path)
    weights = load_file(str(folder / "model.safetensors"))
    weights["transformer.h.0.mlp.c_fc.weight"][0, 0] = bad
    save_file(weights, str(folder / "model.safetensors"))
    err = one_line_error(["sample", "--checkpoint", str(folder), "--prompt", "the"], capsys)
    assert "non-finite weights" in err and "transformer.h.0.mlp.c_fc.weight" in err


def test_serve_loads_through_the_same_checks(ckpt, tmp_path, capsys):
    pytest.importorskip("fastapi")
    folder = copy_of(ckpt, tmp_path)
    weights = load_file(str(folder / "model.safetensors"))
    weights["transformer.wte.weight"].fill_(float("nan"))
    save_file(weights, str(folder / "model.safetensors"))
    err = one_line_error(["serve", "--checkpoint", str(folder), "--port", "0"], capsys)
    assert "non-finite weights" in err  # refused at load, before it listens


@pytest.mark.parametrize(
    "chars", ["ab", "abcdefghijklmnopqrstuvwxyz0123456789 \n.,;:!?'ABCDEFGHIJ"]
)
def test_a_tokenizer_that_does_not_fit_the_model_is_refused(ckpt, tmp_path, capsys, chars):
    folder = copy_of(ckpt, tmp_path)
    CharTokenizer(chars).save(folder)
    err = one_line_error(["sample", "--checkpoint", str(folder)], capsys)
    assert "they were not saved together" in err


def test_tokenizer_differences_are_said_in_words():
    a, b = CharTokenizer("abc"), CharTokenizer("abd")
    assert "characters differ" in tokenizer_difference(a, b) and "'cd'" in tokenizer_difference(
        a, b
    )
    assert "3 and 4 ids" in tokenizer_difference(a, CharTokenizer("abcd"))
    assert "another order" in tokenizer_difference(a, CharTokenizer("cba"))


@pytest.mark.parametrize("bad_id", [28, 60000])  # the text has 28 characters
def test_token_ids_past_the_vocabulary_stop_training_before_it_starts(tmp_path, capsys, bad_id):
    (tmp_path / "in.txt").write_text(TEXT)
    data, out = tmp_path / "data", tmp_path / "out"
    assert main(["-q", "prepare", "--input", str(tmp_path / "in.txt"), "--out", str(data),
                 "--tokenizer", "char"]) == 0  # fmt: skip
    meta = json.loads((data / "meta.json").read_text())
    train = data / "train_000000.bin"
    ids = np.memmap(train, dtype=meta["dtype"], mode="r+", offset=HEADER_BYTES)
    ids[len(ids) // 2] = bad_id
    ids.flush()
    del ids
    err = one_line_error(
        ["-q", "train", "--data", str(data), "--out-dir", str(out), "--model", "tiny",
         "--max-iters", "2", "--no-plot", "--sample-tokens", "0"], capsys,
    )  # fmt: skip
    assert "train_000000.bin holds token id" in err and str(bad_id) in err
    assert not (out / "ckpt").exists()


# --- pickles: refused in one line, payload never run, no torch warnings ------------------------


class Payload:
    """Unpickling this would create the marker file."""

    marker = ""

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def hostile_files(folder: Path, marker: Path) -> dict[str, Path]:
    Payload.marker = str(marker)
    files = {}
    files["raw pickle"] = folder / "raw.pt"
    files["raw pickle"].write_bytes(pickle.dumps({"x": Payload()}))
    files["zipped pickle"] = folder / "zipped.pt"
    torch.save({"x": Payload()}, files["zipped pickle"])
    files["truncated"] = folder / "truncated.pt"
    torch.save({"x": torch.ones(4)}, files["truncated"])
    files["truncated"].write_bytes(files["truncated"].read_bytes()[:60])
    files["text"] = folder / "text.pt"
    files["text"].write_text("hello")
    files["empty"] = folder / "empty.pt"
    files["empty"].write_bytes(b"")
    return files


@pytest.mark.parametrize("kind", ["raw pickle", "zipped pickle", "truncated", "text", "empty"])
@pytest.mark.parametrize("name", ["trainer.pt", "optimizer.pt"])
def test_an_unreadable_torch_file_is_refused_in_one_line(ckpt, tmp_path, kind, name):
    folder = copy_of(ckpt, tmp_path)
    marker = tmp_path / "payload-ran"
    shutil.copy(hostile_files(tmp_path, marker)[kind], folder / name)
    loaded = load_checkpoint(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a torch warning would fail the test
        with pytest.raises(UserError) as e:
            loaded.trainer_state() if name == "trainer.pt" else loaded.optimizer_state()
    message = str(e.value)
    assert len(message.splitlines()) == 1 and name in message
    assert "weights_only" not in message and "False" not in message
    assert ("will not be unpickled" in message) == ("pickle" in kind)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["raw pickle", "zipped pickle", "truncated"])
def test_a_hostile_pytorch_model_bin_is_refused(ckpt, tmp_path, capsys, kind):
    from gpt2.hf import export_checkpoint

    hf = export_checkpoint(ckpt, tmp_path / "hf")
    (hf / "model.safetensors").unlink()
    marker = tmp_path / "payload-ran"
    shutil.copy(hostile_files(tmp_path, marker)[kind], hf / "pytorch_model.bin")
    err = one_line_error(["sample", "--checkpoint", str(hf)], capsys)
    assert "pytorch_model.bin" in err and "weights_only" not in err
    assert not marker.exists()


# --- Hugging Face folders ------------------------------------------------------------------


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/../../x"])
def test_index_paths_stay_inside_their_folder(ckpt, tmp_path, capsys, shard):
    from gpt2.hf import export_checkpoint

    hf = export_checkpoint(ckpt, tmp_path / "hf")
    (tmp_path / "outside.safetensors").write_bytes((hf / "model.safetensors").read_bytes())
    names = load_file(str(hf / "model.safetensors"))
    (hf / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {name: shard for name in names}}
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "outside" in one_line_error(["sample", "--checkpoint", str(hf)], capsys)


def test_export_of_a_hugging_face_folder_says_what_it_is(ckpt, tmp_path, capsys):
    from gpt2.hf import export_checkpoint

    hf = export_checkpoint(ckpt, tmp_path / "hf")
    err = one_line_error(["export", "--checkpoint", str(hf), "--out", str(tmp_path / "x")], capsys)
    assert "is a Hugging Face model folder" in err and "'model'" not in err
    assert "corrupt" not in err  # nothing is wrong with it


# --- failing disks: a read-only mount, a full one, a file where a folder should be --------------


@pytest.fixture
def small_disk(tmp_path: Path):
    """``mount(size_kb, read_only)``: a tmpfs under tmp_path (root only; CI runs as root),
    unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted: list[Path] = []

    def mount(size_kb: int, read_only: bool = False) -> Path:
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        options = f"size={size_kb}k" + (",ro" if read_only else "")
        if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)]).returncode:
            pytest.skip("this machine does not let us mount a tmpfs")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        if subprocess.run(["umount", str(point)]).returncode:  # a file left open: a bug
            subprocess.run(["umount", "--lazy", str(point)], check=False)
            pytest.fail(f"{point} was busy: a failed write left a file open")


def test_export_to_a_read_only_or_full_disk_is_one_line(ckpt, small_disk, capsys):
    pytest.importorskip("gguf")
    read_only, full = small_disk(64, read_only=True), small_disk(64)  # the weights need ~120 KB
    for out, fmt in [(read_only / "hf", "hf"), (read_only / "m.gguf", "gguf"),
                     (full / "hf", "hf"), (full / "m.gguf", "gguf")]:  # fmt: skip
        argv = ["export", "--checkpoint", str(ckpt), "--out", str(out), "--format", fmt]
        err = one_line_error(argv, capsys)
        assert f"cannot write {out}" in err
        assert ("Read-only" if out.parent == read_only else "No space left on device") in err
        assert list(out.parent.iterdir()) == []  # no half folder, no temp file


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """TEXT prepared as characters (the demo's TinyShakespeare would take longer)."""
    from gpt2.prepare import prepare_text

    folder = tmp_path_factory.mktemp("data")
    (folder / "in.txt").write_text(TEXT)
    prepare_text(folder / "in.txt", folder / "chars", tokenizer="char", show_progress=False)
    return folder / "chars"


def train_argv(data: Path, out: Path) -> list[str]:
    return ["train", "--data", str(data), "--model", "tiny", "--max-iters", "2", "--out-dir",
            str(out), "--no-plot", "--sample-tokens", "0", "-q"]  # fmt: skip


def test_train_out_dir_that_cannot_be_a_folder_is_one_line(
    small_data, small_disk, tmp_path, capsys
):
    (tmp_path / "afile").write_text("keep me")
    read_only = small_disk(64, read_only=True)
    for out, reason in [(tmp_path / "afile", "it exists and is not a folder"),
                        (read_only / "run", "Read-only file system"),
                        (read_only, "Read-only file system")]:  # fmt: skip
        assert reason in one_line_error(train_argv(small_data, out), capsys)
    for argv in (["prepare", "--input", str(small_data / "meta.json"), "--tokenizer", "char"],
                 ["tokenizer", "train", "--input", str(small_data / "meta.json"),
                  "--vocab-size", "300"]):  # fmt: skip
        err = one_line_error([*argv, "--out", str(tmp_path / "afile")], capsys)
        assert f"{tmp_path / 'afile'}: it exists and is not a folder" in err
    assert (tmp_path / "afile").read_text() == "keep me"


def test_a_checkpoint_save_on_a_full_disk_is_one_line_and_keeps_none_half(
    small_data, small_disk, capsys
):
    disk = small_disk(200)  # a run's folder, not a checkpoint with its optimizer (~400 KB)
    err = one_line_error(train_argv(small_data, disk / "run"), capsys)
    assert f"cannot write {disk / 'run' / 'checkpoints'}" in err and "No space left" in err
    assert not [p for p in disk.rglob("*") if ".tmp" in p.name]
    assert list((disk / "run" / "checkpoints").iterdir()) == []


def test_quiet_silences_the_demo_data_preparation(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the demo prepares TinyShakespeare into ./data
    argv = ["train", "--model", "tiny", "--max-iters", "1", "--eval-iters", "1", "--out-dir",
            "run", "--no-plot", "--sample-tokens", "0", "-q"]  # fmt: skip
    assert main(argv) == 0
    assert capsys.readouterr().err == ""


def test_a_metrics_log_that_is_not_text_is_one_line(small_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_argv(small_data, run)) == 0
    capsys.readouterr()
    with (run / "metrics.jsonl").open("ab") as f:
        f.write(b"\xff\xfe\n")
    for argv in (["plot", str(run)], [*train_argv(small_data, run), "--resume", "auto"]):
        assert "metrics.jsonl is not UTF-8 text" in one_line_error(argv, capsys)


def test_train_help_says_the_cpu_precision_rule_that_runs(capsys):
    from gpt2.device import BF16_MIN_WIDTH

    assert main(["train", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"width {BF16_MIN_WIDTH} or more" in out and "short probe" not in out
