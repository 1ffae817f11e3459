"""Atomic writes and JSON reading (`gpt2.files`): a failed write keeps what was there and leaves
no temp file; OS errors and bad JSON are one `UserError` line naming the path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from gpt2.errors import UserError
from gpt2.files import (
    atomic_file,
    make_folder,
    open_log,
    read_json,
    read_jsonl,
    read_toml,
    replaced_folder,
    write_json,
    write_line,
    write_text,
)


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_files_get_0644_under_the_default_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        write_text(tmp_path / "a.txt", "x")
        with atomic_file(tmp_path / "w.safetensors") as tmp:  # safetensors alone gives 0600
            save_file({"w": torch.zeros(2)}, str(tmp))
    finally:
        os.umask(old)
    for name in ("a.txt", "w.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644
    assert names(tmp_path) == ["a.txt", "w.safetensors"]


def test_an_error_while_writing_keeps_the_old_file_and_no_temp(tmp_path: Path) -> None:
    write_text(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError), atomic_file(tmp_path / "a.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed halfway")
    assert (tmp_path / "a.txt").read_text() == "old" and names(tmp_path) == ["a.txt"]


def test_os_errors_become_one_line_naming_the_path(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("a file where a folder is expected")
    with pytest.raises(UserError, match=f"cannot write {tmp_path / 'file' / 'x.json'}: "):
        write_json(tmp_path / "file" / "x.json", {})
    if os.geteuid() != 0:  # root writes into read-only folders
        (tmp_path / "ro").mkdir(mode=0o555)
        with pytest.raises(UserError, match="Permission denied"):
            write_text(tmp_path / "ro" / "x.txt", "x")
    with (
        pytest.raises(UserError, match="exists and is not a folder"),
        replaced_folder(tmp_path / "file"),
    ):
        pass


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path: Path) -> None:
    with replaced_folder(tmp_path / "out") as tmp:
        write_text(tmp / "one", "1")
    with pytest.raises(RuntimeError), replaced_folder(tmp_path / "out") as tmp:
        write_text(tmp / "two", "2")
        raise RuntimeError("disk full")
    assert names(tmp_path) == ["out"] and names(tmp_path / "out") == ["one"]
    with replaced_folder(tmp_path / "out") as tmp:
        write_text(tmp / "two", "2")
    assert names(tmp_path) == ["out"] and names(tmp_path / "out") == ["two"]


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\xff\xfe", "is not UTF-8 text"),
        (b"{not json", r"is not valid JSON \(.*line 1\)"),
        (b"[1, 2]", "must hold a JSON object, not a list"),
    ],
)
def test_read_json_errors_name_the_file(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "meta.json"
    path.write_bytes(content)
    with pytest.raises(UserError, match=f"{path} {message}"):
        read_json(path)
    with pytest.raises(UserError, match="file not found"):
        read_json(tmp_path / "missing.json")


def test_json_round_trip_and_jsonl(tmp_path: Path) -> None:
    write_json(tmp_path / "a.json", {"text": "été"})
    assert (tmp_path / "a.json").read_text(encoding="utf-8") == '{\n  "text": "été"\n}\n'
    assert read_json(tmp_path / "a.json") == {"text": "été"}
    (tmp_path / "b.jsonl").write_text('{"a": 1}\n\n{"a": 2}\n')
    assert read_jsonl(tmp_path / "b.jsonl") == [{"a": 1}, {"a": 2}]
    assert read_jsonl(tmp_path / "b.jsonl", limit=1) == [{"a": 1}]
    (tmp_path / "c.jsonl").write_text('{"a": 1}\n[2]\n')
    with pytest.raises(UserError, match="c.jsonl:2: expected a JSON object"):
        read_jsonl(tmp_path / "c.jsonl")


@pytest.mark.parametrize(
    "failure, reason",
    [
        # what safetensors, torch.save and numpy's tofile raise on a full disk (none an errno)
        (RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),
         "No space left on device"),
        (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 67008 vs 66900"),
         "unexpected pos"),
        (OSError("4096 requested and 432 written"), "4096 requested and 432 written"),
    ],
)  # fmt: skip
def test_a_writers_own_io_error_is_one_line_naming_the_target(
    tmp_path: Path, failure: Exception, reason: str
) -> None:
    write_text(tmp_path / "w.bin", "old")
    message = f"cannot write {tmp_path / 'w.bin'}: .*{reason}"
    with pytest.raises(UserError, match=message), atomic_file(tmp_path / "w.bin") as tmp:
        tmp.write_text("half")
        raise failure
    assert names(tmp_path) == ["w.bin"] and (tmp_path / "w.bin").read_text() == "old"


def test_a_failed_file_in_a_replaced_folder_names_where_it_was_going(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    with (
        pytest.raises(UserError) as e,
        replaced_folder(tmp_path / "out") as tmp,
        atomic_file(tmp / "w.bin"),
    ):
        raise RuntimeError("I/O error: No space left on device (os error 28)")
    assert str(e.value) == f"cannot write {tmp_path / 'out' / 'w.bin'}: No space left on device"
    assert names(tmp_path) == ["out"]


def test_a_file_where_a_folder_should_be_is_said_so(tmp_path: Path) -> None:
    (tmp_path / "run").write_text("a file")
    with pytest.raises(UserError, match="cannot create --out-dir .*run: it exists and is not a"):
        make_folder(tmp_path / "run", "--out-dir")
    assert (tmp_path / "run").read_text() == "a file"


def test_a_log_file_that_cannot_be_opened_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=f"cannot write {tmp_path / 'file' / 'metrics.jsonl'}: "):
        open_log(tmp_path / "file" / "metrics.jsonl")
    with open_log(tmp_path / "metrics.jsonl") as f:
        write_line(f, '{"step": 1}')
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'


@pytest.mark.parametrize(
    "content, message",
    [(b"\xff\xfe", "is not UTF-8 text"), (b"a = = 1", "is not valid TOML"), (b"", None)],
)
def test_read_toml_errors_name_the_file(tmp_path: Path, content: bytes, message: str | None):
    path = tmp_path / "run.toml"
    path.write_bytes(content)
    if message is None:
        assert read_toml(path) == {}
        return
    with pytest.raises(UserError, match=f"{path} {message}"):
        read_toml(path)
