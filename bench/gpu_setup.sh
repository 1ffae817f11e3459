#!/usr/bin/env bash
# The GPU check on a device machine that has Python and torch but no network (bench/NOTES.md,
# "GPU check"). Three steps:
#
#   bash bench/gpu_setup.sh fetch     HERE: the wheels `gpt2 serve` needs and the test assets,
#                                     into .gpu/ (ignored by git; carry it: about 7 MB)
#   bash bench/gpu_setup.sh install   THERE: install them and the project, editable, without
#                                     dependencies: the machine's own torch, transformers,
#                                     tiktoken, numpy, safetensors, pytest are used
#   bash bench/gpu_setup.sh run [ARGS] THERE: install, then bench/gpu_check.py ARGS (at most
#                                     8 min; e.g. --parts train for a rerun of one part), its
#                                     JSON and log copied to $OUT
set -euo pipefail
cd "$(dirname "$0")/.."

GPU_DIR=.gpu
PYTHON=${PYTHON:-python3}
# What the device image lacks among the serve extra's needs, at the versions the suite passes
# with here (fastapi imports opentelemetry); the image has anyio, h11, click and annotated-doc.
WHEELS=(
  fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0
  pydantic==2.14.4 pydantic_core==2.50.5 annotated_types==0.8.0 typing_inspection==0.4.5
  typing_extensions==4.16.0 opentelemetry_api==1.45.2
)
DEVICE_PYTHON=${DEVICE_PYTHON:-3.12}  # the device image's python3

fetch() {
  rm -rf "$GPU_DIR/whl"
  mkdir -p "$GPU_DIR/whl" "$GPU_DIR/data"
  local platforms=()
  for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
    manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
  done
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
    --python-version "$DEVICE_PYTHON" --implementation cp "${platforms[@]}" \
    -d "$GPU_DIR/whl" "${WHEELS[@]}"
  cp -r "${GPT2_SHARED_DATA:-../shared/data}/." "$GPU_DIR/data/"
  du -sh "$GPU_DIR"
}

install() {
  "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile "$GPU_DIR"/whl/*.whl
  if ! "$PYTHON" -m pip install --quiet --no-index --no-deps --no-build-isolation -e . \
    >/dev/null 2>&1; then
    # An older setuptools there: put src/ on the path instead (no `gpt2` script; python -m gpt2).
    echo "gpu_setup: no editable install (setuptools too old?): src/ goes on the path instead"
    local site
    site=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo "$PWD/src" >"$site/gpt2-src.pth"
  fi
  "$PYTHON" -c 'import torch, transformers, fastapi, uvicorn, gpt2
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "transformers",
      transformers.__version__, "gpt2 from", gpt2.__file__)'
}

run() {
  install
  export GPT2_SHARED_DATA=$PWD/$GPU_DIR/data GPT2_CACHE_DIR=$PWD/$GPU_DIR/data PYTHONUNBUFFERED=1
  local out=${OUT:-bench/results}
  set +e
  mkdir -p "$out"
  "$PYTHON" bench/gpu_check.py --out-dir "$out" "$@" 2>&1 | tee "$out/gpu_check.log"
  local code=${PIPESTATUS[0]}
  set -e
  return "$code"
}

command=${1:-}
shift || true
case "$command" in
  fetch | install | run) "$command" "$@" ;;
  *)
    echo "usage: bash bench/gpu_setup.sh fetch|install|run" >&2
    exit 2
    ;;
esac
