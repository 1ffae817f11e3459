"""Writing files so that a reader never sees half of one, and reading JSON with one-line errors.

Every file the package writes goes through `atomic_file` (or the helpers on top of it): the data
goes to a temp file beside the target (same folder, so same file system), is flushed to disk
(fsync), then renamed over the target. A crash, a full disk or an exception leaves the previous
file as it was and no temp file behind. `replaced_folder` does the same for a whole folder
(a checkpoint, a prepared data set): it is replaced whole or not at all.

An `OSError` on the way (read-only file system, disk full, a file where a folder should be)
becomes one `UserError` line naming the path. Files come out with mode 0644 under the default
umask (``mkstemp`` alone would give 0600, which other users and containers cannot read).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gpt2.errors import UserError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _os_error(path: Path, e: OSError) -> UserError:
    return UserError(f"cannot write {path}: {e.strerror or e}")


def make_folder(folder: str | Path, what: str = "output folder") -> Path:
    """``folder`` and its parents, created if missing; failing, one `UserError` naming it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {what} {folder}: {e.strerror or e}") from None
    return folder


def _fsync_folder(folder: Path) -> None:
    """Flush the folder's entry list, so that a rename inside it survives a power cut."""
    with contextlib.suppress(OSError):  # not every file system lets a folder be opened
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """A temp path to write ``path``'s new contents to; renamed over ``path`` when the block
    ends without error, deleted otherwise. Writers that take a path (safetensors, torch.save,
    numpy) write to the yielded path."""
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(name)
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_folder(path.parent)
    except OSError as e:
        raise _os_error(path, e) from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, data: Any, indent: int | None = 2) -> Path:
    """JSON, UTF-8, not ASCII-escaped, one trailing newline."""
    return write_text(path, json.dumps(data, indent=indent, ensure_ascii=False) + "\n")


def copy_file(source: str | Path, path: str | Path) -> Path:
    with atomic_file(path) as tmp:
        shutil.copyfile(source, tmp)
    return Path(path)


def _temp_folder_beside(final: Path) -> Path:
    """A new empty folder next to ``final``, hidden and named so that a stale one is recognised
    (``.NAME.tmp-*``); its mode follows the umask (``mkdtemp`` would give 0700)."""
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    return tmp


def _fsync_files(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_file():
            with p.open("rb") as f:
                os.fsync(f.fileno())


def _swap_folder(new: Path, final: Path) -> None:
    """Rename ``new`` to ``final``; an existing ``final`` is moved aside first, then removed
    (two renames: at every moment one complete folder exists under one of the two names)."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
        os.replace(new, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, final)
    _fsync_folder(final.parent)


@contextlib.contextmanager
def replaced_folder(final: str | Path) -> Iterator[Path]:
    """A temp folder to fill; when the block ends without error its files are flushed and it
    replaces ``final`` whole. On error ``final`` keeps its old contents and the temp folder goes."""
    final = Path(final)
    tmp: Path | None = None
    try:
        if final.exists() and not final.is_dir():
            raise UserError(f"cannot write {final}: it exists and is not a folder")
        tmp = _temp_folder_beside(final)
        yield tmp
        _fsync_files(tmp)
        _swap_folder(tmp, final)
        tmp = None
    except OSError as e:
        raise _os_error(final, e) from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


# --- reading ----------------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None


def read_json(path: str | Path) -> dict[str, Any]:
    """A JSON file whose top level is an object; any other file is one `UserError` line."""
    path = Path(path)
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object, not a {type(data).__name__}")
    return data


def read_jsonl(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """The first ``limit`` objects of a JSON Lines file (blank lines skipped), read a line at a
    time; a bad line is one `UserError` naming the file and line."""
    path = Path(path)
    records: list[dict[str, Any]] = []
    try:
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if limit is not None and len(records) >= limit:
                    break
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{number}: not valid JSON ({e.msg})") from None
                if not isinstance(record, dict):
                    raise UserError(f"{path}:{number}: expected a JSON object")
                records.append(record)
    except FileNotFoundError:
        raise UserError(f"file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    return records
