"""Downloadable assets (the GPT-2 vocabulary, sample corpora), cached and checked by sha256.

The cache folder is ``$GPT2_CACHE_DIR`` (default ``~/.cache/gpt2``) and holds each asset at its
relative path, e.g. ``tinyshakespeare/input.txt``. To work offline, put the files there yourself:
a file already in the cache is used once its hash matches, and nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from gpt2.errors import UserError
from gpt2.files import atomic_file, make_folder

CACHE_ENV = "GPT2_CACHE_DIR"


@dataclass(frozen=True)
class Asset:
    """A file the package can download: where it goes in the cache, where it comes from, and the
    sha256 it must have (a changed upstream file is refused, never used silently)."""

    path: str  # relative to the cache folder
    url: str
    sha256: str


ASSETS: dict[str, Asset] = {
    a.path: a
    for a in (
        Asset(
            "gpt2-tokenizer/encoder.json",
            "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
            "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
        ),
        Asset(
            "gpt2-tokenizer/vocab.bpe",
            "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
            "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
        ),
        # The same 50,000 merges as GPT-2 in tiktoken's format (tiktoken calls it r50k_base).
        Asset(
            "gpt2-tokenizer/gpt2.tiktoken",
            "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken",
            "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
        ),
        Asset(
            "tinyshakespeare/input.txt",
            "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
            "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        ),
        # Evaluation data (gpt2.evaluate). Hashes as recorded by Hugging Face `datasets`
        # (hellaswag, wikitext dataset_infos.json) and EleutherAI's lambada_openai card.
        Asset(
            "hellaswag/hellaswag_val.jsonl",
            "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl",
            "0aa3b88843990f3f10a97b9575c94d7b71fb2205240ba04ae4884d9e9c992588",
        ),
        Asset(
            "lambada/lambada_test.jsonl",
            "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl",
            "4aa8d02cd17c719165fc8a7887fddd641f43fcafa4b1c806ca8abc31fabdb226",
        ),
        Asset(
            "wikitext-2-raw/wikitext-2-raw-v1.zip",
            "https://wikitext.smerity.com/wikitext-2-raw-v1.zip",
            "ef7edb566e3e2b2d31b29c1fdb0c89a4cc683597484c3dc2517919c615435a11",
        ),
    )
}


def cache_dir() -> Path:
    """The asset cache folder: ``$GPT2_CACHE_DIR`` or ``~/.cache/gpt2``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gpt2"


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file, read in 1 MiB pieces (assets can be hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(name: str) -> Path:
    """The local path of asset ``name`` (e.g. ``"tinyshakespeare/input.txt"``), downloading it
    on first use. Raises `UserError` naming the file and the folder when it cannot be had."""
    if name not in ASSETS:
        raise UserError(f"unknown asset {name!r}; known: {', '.join(ASSETS)}")
    asset = ASSETS[name]
    target = cache_dir() / asset.path
    if target.exists():
        digest = sha256_file(target)
        if digest != asset.sha256:
            raise UserError(
                f"{target} has sha256 {digest}, expected {asset.sha256}; delete it or replace it "
                f"with the file from {asset.url}"
            )
        return target
    _download(asset, target)
    return target


def _download(asset: Asset, target: Path) -> None:
    """Download to a temp file beside the target, check the hash, then rename into place."""
    make_folder(target.parent, "the asset cache folder")
    with atomic_file(target) as tmp:
        try:
            with urllib.request.urlopen(asset.url, timeout=30) as response, tmp.open("wb") as out:
                shutil.copyfileobj(response, out)
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise UserError(
                f"could not download {asset.path} from {asset.url} ({reason}); download it by "
                f"hand and put it at {target} (or set {CACHE_ENV} to a folder that has it)"
            ) from None
        digest = sha256_file(tmp)
        if digest != asset.sha256:
            raise UserError(
                f"downloaded {asset.path} has sha256 {digest}, expected {asset.sha256}; put a good "
                f"copy at {target}"
            )
