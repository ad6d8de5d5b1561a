#!/usr/bin/env bash
# The second prepared GPU command (docs/RELIABILITY.md, docs/BENCHMARKS.md "GPU"): DDP with NCCL
# through the real launchers, at most 3 minutes all in (the numbers after `limit` add up to at most
# BUDGET_S; tests/test_benchmarks.py checks it). Under torchrun, one rank per GPU (one rank on a
# one-GPU machine still creates the NCCL process group and the DDP wrapper, so every collective
# runs): phase 1, generate_soft_label.py and get_thresholds.py, phase 2, and the kill-and-restart
# scenario (a rank SIGKILLed, the group restarted with --resume_from auto, the result compared
# with the uninterrupted run); with two GPUs or more also a killed --dist rank
# (benchmarks/ddp_check.py). Printed and saved into OUTDIR/gpu_ddp_check.txt line by line.
#
#   bash benchmarks/gpu_ddp_check.sh OUTDIR
#   GPU_CHECK_TINY=1 bash benchmarks/gpu_ddp_check.sh OUTDIR   # the same on the CPU, gloo, one rank (tests;
#                                                              # every limit x GPU_CHECK_SCALE, default 4)
# BUDGET_S=180
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-}
if [ -z "$OUTDIR" ]; then
  echo "error: usage: bash benchmarks/gpu_ddp_check.sh OUTDIR (the folder the report is saved into)" >&2
  exit 2
fi
mkdir -p "$OUTDIR" || { echo "error: OUTDIR $OUTDIR: cannot create the folder" >&2; exit 2; }
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if [ "${GPU_CHECK_TINY:-0}" = 1 ]; then  # every limit x GPU_CHECK_SCALE (default 4): a 2-core CPU is slower
  DEV=cpu RANKS=(--nproc 1) SCALE=${GPU_CHECK_SCALE:-4}
else
  DEV=cuda RANKS=() SCALE=1
fi
exec > >(tee -a "$OUTDIR/gpu_ddp_check.txt") 2>&1
TEE=$!

. benchmarks/gpu_limit.sh  # limit SECONDS COMMAND...

echo "== gpu_ddp_check $(date -u +%FT%TZ), device $DEV, into $OUTDIR"
# --budget below the limit: the check ends its own runs and prints its summary before the limit
limit 175 $PY benchmarks/ddp_check.py --device "$DEV" ${RANKS[@]+"${RANKS[@]}"} --budget $((160 * SCALE)) \
  --timeout $((75 * SCALE))
echo "== gpu_ddp_check done in ${SECONDS}s"
exec >&- 2>&-
wait "$TEE"  # the saved copy is complete when this script returns
