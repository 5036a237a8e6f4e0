#!/usr/bin/env bash
# GPT-J 6B on one GPU, this project vs transformers, in one command (docs/gpu.md): full fine-tuning (ZeRO-3; and with
# the optimizer offloaded to CPU), LoRA, the cls/qa heads, generation and bf16 parity, each case in its own process
# with a timeout, all within 8 minutes. Tables go to OUT_DIR (default: $OUT, else outputs/gpu_suite) and stdout.
#
#   bench/gpu_wheels.sh                       # once, where pip reaches an index: the missing packages into .whl/
#   bench/gpu_suite.sh                        # on the GPU machine, from anywhere in the repo
#   bench/gpu_suite.sh OUT_DIR --cases full,generate --set full.micro_batch=1
#   bench/gpu_suite.sh --dry-run OUT_DIR      # the same cases on CPU at tiny shapes (what CI runs)
#
# On the GPU machine it first installs the wheels of .whl/ that the machine lacks (pip --no-index --no-deps --target,
# put first on PYTHONPATH), then runs bench/gpu_suite.py; `bench/gpu_suite.py --help` lists every option.
set -euo pipefail
started=$(date +%s.%N)
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
exec "$PYTHON" bench/gpu_suite.py --started "$started" "$@"
