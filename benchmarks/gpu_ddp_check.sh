#!/usr/bin/env bash
# DDP kill-and-restart on a lent GPU machine (NCCL), bounded to 4 minutes: torchrun restart after a
# SIGKILLed worker (final weights compared with an uninterrupted run) and, with two or more GPUs, a
# killed --dist rank (one line, seconds to the end). Called by benchmarks/gpu_check.sh.
#   bash benchmarks/gpu_ddp_check.sh           # writes ${OUT:-.}/gpu_ddp_check.txt too
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
timeout 240 $PY benchmarks/ddp_check.py --device cuda --timeout 75 2>&1 | tee "${OUT:-.}/gpu_ddp_check.txt"
