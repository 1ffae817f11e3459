#!/usr/bin/env bash
# Build the llama.cpp tools the GGUF tests and the benchmarks run, from the llama.cpp source that
# the llama-cpp-python sdist vendors (PyPI is reachable where GitHub may not be). The build is
# cached outside the repository, keyed by version and machine: a second run only prints the
# folder, and a run that asks for more tools builds just those.
#
#   scripts/build_llama_cpp.sh            # prints the folder holding bin/ and src/ (the converter)
#   scripts/build_llama_cpp.sh --find     # prints it only if it is built, else exits 1
#   LLAMA_CPP_PYTHON_VERSION=0.3.36 PYTHON=.venv/bin/python JOBS=2 scripts/build_llama_cpp.sh
#
# GPT2_LLAMA_CPP_DIR chooses another folder. Needs cmake and a C++17 compiler (exit 3 without).
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
PYTHON="${PYTHON:-python3}"
JOBS="${JOBS:-2}"
TOOLS=(llama-perplexity llama-simple llama-tokenize llama-completion llama-bench llama-server)
ROOT="${GPT2_LLAMA_CPP_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/gpt2-llama.cpp/$VERSION-$(uname -m)}"

# A tool is built when bin/ holds it: it is renamed there only after its build succeeded. (The
# .complete file earlier versions of this script compared is left as it is, for their sake.)
MISSING=()
for tool in "${TOOLS[@]}"; do
    [[ -x "$ROOT/bin/$tool" ]] || MISSING+=("$tool")
done
if (( ${#MISSING[@]} == 0 )); then
    echo "$ROOT"
    exit 0
fi
if [[ "${1:-}" == "--find" ]]; then
    echo "build_llama_cpp.sh: llama.cpp is not built in $ROOT (missing: ${MISSING[*]})" >&2
    exit 1
fi

for tool in cmake c++ tar; do
    command -v "$tool" >/dev/null || { echo "build_llama_cpp.sh: $tool is not installed" >&2; exit 3; }
done

mkdir -p "$ROOT"
if [[ ! -f "$ROOT/src/CMakeLists.txt" ]]; then
    work="$(mktemp -d "$ROOT/.work.XXXXXX")"
    trap 'rm -rf "$work"' EXIT
    "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: --dest "$work" \
        "llama-cpp-python==$VERSION" >&2
    tar -xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
    rm -rf "$ROOT/src" "$ROOT/build"
    mv "$work"/llama_cpp_python-*/vendor/llama.cpp "$ROOT/src"
fi

start=$(date +%s)
# Native code for this machine (the cache is per machine); static, so bin/ holds whole programs.
# llama-server (bench/bench_serve.py) is built without its web page: no npm, no download of the
# prebuilt page, so the build stays offline once the source is here.
cmake -S "$ROOT/src" -B "$ROOT/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF >&2
cmake --build "$ROOT/build" --config Release -j "$JOBS" --target "${MISSING[@]}" >&2
echo "build_llama_cpp.sh: built ${MISSING[*]} in $(( $(date +%s) - start )) s with -j $JOBS" >&2

mkdir -p "$ROOT/bin"
for tool in "${MISSING[@]}"; do
    cp "$ROOT/build/bin/$tool" "$ROOT/bin/.$tool.tmp"
    mv -f "$ROOT/bin/.$tool.tmp" "$ROOT/bin/$tool"
done
echo "$ROOT"
