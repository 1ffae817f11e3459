"""The asset cache: hash checks, downloads to a temp file, and clear errors offline."""

from __future__ import annotations

import hashlib
import io
import urllib.error
from pathlib import Path

import pytest

from gpt2 import assets
from gpt2.errors import UserError

NAME = "tinyshakespeare/input.txt"


def test_cached_file_is_used(asset_cache: Path) -> None:
    assert assets.fetch(NAME) == asset_cache / NAME


def test_corrupt_cached_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path))
    (tmp_path / "tinyshakespeare").mkdir()
    (tmp_path / NAME).write_text("not shakespeare")
    with pytest.raises(UserError, match="expected 86c4e6aa"):
        assets.fetch(NAME)


def test_no_network_names_file_and_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(assets.urllib.request, "urlopen", offline)
    with pytest.raises(UserError) as err:
        assets.fetch(NAME)
    assert str(tmp_path / NAME) in str(err.value)
    assert "no route to host" in str(err.value)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # no temp file left


def test_download_is_checked_then_renamed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shakespeare: Path
) -> None:
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path))
    body = shakespeare.read_bytes()
    monkeypatch.setattr(assets.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(body))
    path = assets.fetch(NAME)
    assert path == tmp_path / NAME
    assert hashlib.sha256(path.read_bytes()).hexdigest() == assets.ASSETS[NAME].sha256


def test_bad_download_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(
        assets.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(b"tampered")
    )
    with pytest.raises(UserError, match="downloaded tinyshakespeare/input.txt has sha256"):
        assets.fetch(NAME)
    assert not (tmp_path / NAME).exists()
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # no temp file left


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(assets.CACHE_ENV, raising=False)
    assert assets.cache_dir() == Path.home() / ".cache" / "gpt2"
