"""The decoding kernels of csrc/ (C++), compiled for this machine on first use.

`available()` builds the C++ files once with the system's C++ compiler (``$CXX``, else ``c++``)
against the installed torch, for this CPU (``-march=native``), caches the library outside the
repository (``$GPT2_NATIVE_DIR``, else ``~/.cache/gpt2/native/<key>``, the key covering the
source, torch's version, the compiler and the CPU's flags), loads it and registers
``torch.ops.gpt2.*``. Where there is no compiler, or the build fails, it says why once in the
log and returns False: every caller then runs its pure-PyTorch path, which computes the same
thing more slowly. ``GPT2_NATIVE=0`` turns the kernels off (the tests run both ways).

Why a compiled kernel at all: a one-row product reads its weight once, and torch's kernels for
one row read memory well below its speed in bfloat16 and int8 (figures: bench/NOTES.md,
"Decoding against llama.cpp").
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from gpt2.device import cpu_flags

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
SOURCES = (CSRC / "linear_ops.cpp", CSRC / "decode_step.cpp")
HEADERS = (CSRC / "kernels.h",)
LIBRARY = "gpt2_decode_kernels.so"


def enabled() -> bool:
    """False when ``GPT2_NATIVE=0`` asks for the pure-PyTorch paths."""
    return os.environ.get("GPT2_NATIVE", "1") != "0"


def compiler() -> str | None:
    """The C++ compiler to build with, if there is one."""
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


def build_key(cxx: str) -> str:
    """What the library depends on: the source, torch, the compiler and this CPU."""
    h = hashlib.sha256()
    for path in SOURCES + HEADERS:
        h.update(path.read_bytes())
    h.update(torch.__version__.encode())
    h.update(cxx.encode())
    h.update(" ".join(sorted(cpu_flags())).encode())
    return h.hexdigest()[:16]


def cache_dir(key: str) -> Path:
    root = os.environ.get("GPT2_NATIVE_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "gpt2" / "native"
    return base / key


def compile_flags() -> list[str]:
    torch_dir = Path(torch.__file__).resolve().parent
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [
        "-O3", "-march=native", "-std=c++17", "-fopenmp", "-fPIC", "-w",
        "-ffp-contract=off",  # no fused multiply-adds the source does not ask for: int8 is exact
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        f"-I{torch_dir / 'include'}", f"-I{torch_dir / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
    ]  # fmt: skip


def link_flags() -> list[str]:
    lib = Path(torch.__file__).resolve().parent / "lib"
    return ["-shared", "-fopenmp", f"-L{lib}", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{lib}"]


def run_all(commands: list[list[str]]) -> None:
    """Run the commands at once (one compiler per source: the build's wall time halves on two
    cores); the first failure's message."""
    procs = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for c in commands]  # fmt: skip
    errors = [p.communicate()[1] for p in procs]
    for p, err in zip(procs, errors, strict=True):
        if p.returncode != 0:
            raise RuntimeError(err.strip()[-2000:] or f"{p.args[0]} exited {p.returncode}")


def build(cxx: str, folder: Path) -> Path:
    """Compile into ``folder`` (a temporary file renamed into place: a build that fails or is
    interrupted leaves nothing that looks finished)."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / LIBRARY
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        objects = [Path(tmp) / f"{src.stem}.o" for src in SOURCES]
        run_all([[cxx, *compile_flags(), "-c", str(s), "-o", str(o)] for s, o in zip(SOURCES, objects, strict=True)])  # fmt: skip
        partial = Path(tmp) / LIBRARY
        run_all([[cxx, *map(str, objects), "-o", str(partial), *link_flags()]])
        os.replace(partial, target)
    return target


@functools.cache
def available() -> bool:
    """True once the kernels are loaded as ``torch.ops.gpt2`` (built first if need be)."""
    if not enabled():
        return False
    if sys.platform != "linux":
        log.info("decoding kernels: built on Linux only; using PyTorch's own kernels")
        return False
    cxx = compiler()
    if cxx is None:
        log.warning("decoding kernels: no C++ compiler (set CXX); using PyTorch's own, slower")
        return False
    folder = cache_dir(build_key(cxx))
    library = folder / LIBRARY
    try:
        if not library.is_file():
            log.info("decoding kernels: compiling %s (once, about 30 s)", CSRC)
            build(cxx, folder)
        torch.ops.load_library(str(library))
    except (OSError, RuntimeError) as e:
        lines = str(e).strip().splitlines() or [type(e).__name__]
        first = next((line for line in lines if "error" in line), lines[0])
        log.warning("decoding kernels: build failed (%s); using PyTorch's own, slower", first)
        return False
    return True
