#!/usr/bin/env bash
# Put into .whl/ the Python packages the GPU machine lacks, as wheels for ITS Python (CPython 3.12, manylinux
# x86_64), so that they travel with the working tree to a machine that reaches no package index.
#
#   bench/gpu_wheels.sh            # -> .whl/ (git-ignored), about 6 MiB
#   bench/gpu_wheels.sh DIR        # -> DIR
#
# The GPU machine (docs/gpu.md) has torch, transformers, peft, safetensors, tokenizers, psutil, pyarrow, pandas,
# numpy, xxhash, fsspec, huggingface-hub, einops, msgpack, ninja, py-cpuinfo, PyYAML; it lacks:
#   deepspeed (+ hjson, pydantic and its pydantic-core, annotated-types, typing-inspection, typing-extensions),
#   hydra-core + omegaconf (+ antlr4-python3-runtime), datasets (+ dill, multiprocess).
# wandb is left out: the suite logs nothing to W&B (logger=none), and its wheel alone is ~20 MiB.
#
# Versions are the ones this project's environment runs (the one `make test` builds), so the GPU runs the code CI
# tests; a package missing here falls back to the pin below. deepspeed and antlr4 ship as sdists only: their wheels
# are built here (pure Python; DeepSpeed's ops are compiled on first use on the GPU machine, see docs/gpu.md).
# bench/gpu_suite.py installs them there (`--no-index`, nothing newer already installed is replaced).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DEST=${1:-.whl}
MAX_MIB=60

# name=fallback-version; the environment's version wins when the package is installed here.
BUILD_FROM_SDIST="deepspeed=0.19.8 antlr4-python3-runtime=4.9.3"
DOWNLOAD_BINARY="hydra-core=1.3.8 omegaconf=2.3.1 datasets=5.2.0 dill=0.4.1 multiprocess=0.70.19 hjson=3.1.0
  pydantic=2.14.4 pydantic-core=2.50.5 annotated-types=0.8.0 typing-inspection=0.4.5 typing-extensions=4.16.0"

pinned() {  # "name=fallback ..." -> "name==version ..." with the installed version where there is one
  for item in "$@"; do
    name=${item%%=*}
    version=$("$PYTHON" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: print(sys.argv[2])" "$name" "${item#*=}")
    printf '%s==%s ' "$name" "$version"
  done
}

# Only wheels are ever deleted, and only from a DEST that is a bundle this script made: an existing DEST must be a
# directory holding nothing but wheels and the marker, so a mistyped DEST (a home directory, a checkout) is refused.
MARKER=.gpu_wheels_bundle
if [ -e "$DEST" ] || [ -L "$DEST" ]; then
  other=$(find "$DEST" -mindepth 1 -maxdepth 1 ! \( -type f -name '*.whl' \) ! -name "$MARKER" -print -quit 2>/dev/null || echo "?")
  if [ ! -d "$DEST" ] || [ -L "$DEST" ]; then other="$DEST is a symlink or not a directory"; fi
  if [ -n "$other" ]; then
    echo "error: DEST=$DEST exists and is not a wheel bundle made by this script ($other: only wheels and" \
      "$MARKER may be there); nothing was deleted. Pass a new or empty directory, or remove $DEST yourself." >&2
    exit 2
  fi
  find "$DEST" -maxdepth 1 -type f -name '*.whl' -delete  # the previous bundle's wheels; nothing else
fi
mkdir -p "$DEST"
touch "$DEST/$MARKER"
# shellcheck disable=SC2046  # word splitting of the pinned list is intended
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation --wheel-dir "$DEST" $(pinned $BUILD_FROM_SDIST)
# shellcheck disable=SC2046
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --dest "$DEST" \
  --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any \
  $(pinned $DOWNLOAD_BINARY)

ls -1 "$DEST"
size_kib=$(du -sk "$DEST" | cut -f1)
echo "$(ls "$DEST"/*.whl | wc -l) wheels, $((size_kib / 1024)) MiB in $DEST"
if [ "$size_kib" -gt $((MAX_MIB * 1024)) ]; then
  echo "error: $DEST is over $MAX_MIB MiB; the working tree that travels to the GPU machine is limited to 64 MiB." >&2
  exit 1
fi
