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
import re
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from gpt2.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _os_error(path: Path, e: OSError) -> UserError:
    return UserError(f"cannot write {path}: {e.strerror or e}")


# How writers that do their own I/O report a failed write: safetensors (Rust) says
# "I/O error: No space left on device (os error 28)", torch.save "iostream error" or "unexpected
# pos", numpy's tofile "4096 requested and 432 written" (an OSError without an errno).
_WRITER_IO_ERROR = re.compile(r"I/O error|iostream error|unexpected pos|requested and")
_OS_ERROR_NUMBER = re.compile(r"os error (\d+)")


def _write_failure(path: Path, e: Exception) -> UserError | None:
    """The one line for a writer's failed write to ``path``, or None when ``e`` is not one (a
    bug keeps its traceback)."""
    if isinstance(e, OSError) and e.errno is not None:
        return _os_error(path, e)
    text = str(e)
    number = _OS_ERROR_NUMBER.search(text)
    if number is not None:
        return UserError(f"cannot write {path}: {os.strerror(int(number.group(1)))}")
    if _WRITER_IO_ERROR.search(text) is None:
        return None
    with contextlib.suppress(OSError):
        if shutil.disk_usage(path.parent).free < 1 << 20:
            return UserError(f"cannot write {path}: No space left on device")
    return UserError(f"cannot write {path}: {text.strip().splitlines()[-1]}")


def refuse_non_folder(folder: str | Path, what: str = "output folder") -> Path:
    """``folder``, unless a file is in its place: checked before a long job that will write it."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"cannot create {what} {folder}: it exists and is not a folder")
    return folder


def make_folder(folder: str | Path, what: str = "output folder") -> Path:
    """``folder`` and its parents, created if missing; failing (a file in the way, a read-only
    location), one `UserError` naming it."""
    folder = refuse_non_folder(folder, what)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {what} {folder}: {e.strerror or e}") from None
    return folder


def open_log(path: str | Path, append: bool = False) -> IO[str]:
    """A text file that grows a line at a time (``metrics.jsonl``), where a reader may see the
    lines written so far; opening it fails with one `UserError` line naming it."""
    path = Path(path)
    try:
        return path.open("a" if append else "w", encoding="utf-8")
    except OSError as e:
        raise _os_error(path, e) from None


def write_line(f: IO[str], line: str) -> None:
    """Append ``line`` to a file from `open_log` and flush it; a full disk is one line."""
    try:
        f.write(line + "\n")
        f.flush()
    except OSError as e:
        raise _os_error(Path(f.name), e) from None


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
    except (UserError, KeyboardInterrupt):
        raise
    except Exception as e:
        failure = _write_failure(path, e)
        if failure is None:
            raise
        raise failure from None
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
    except UserError as e:
        if tmp is None:
            raise
        # A file inside the temp folder failed: name where it was going, not the temp folder.
        raise UserError(str(e).replace(str(tmp), str(final))) from None
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


def read_lines(path: str | Path) -> list[str]:
    """The lines of a UTF-8 text file (``metrics.jsonl``, whose callers skip a torn last line);
    a missing or non-UTF-8 file is one `UserError` line naming it."""
    return _read_text(Path(path)).splitlines()


def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML file (a run config); a missing, non-UTF-8 or malformed one is one line."""
    path = Path(path)
    try:
        return tomllib.loads(_read_text(path))
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path} is not valid TOML: {e}") from None


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
