#!/usr/bin/env bash
# Every CPU benchmark of docs/BENCHMARKS.md with the arguments used there, in one run; the report
# is printed and written to ${OUT:-.}/benchmarks_cpu.txt. About 20 minutes on 2 cores (the memory
# benchmark alone about 10).
#   bash benchmarks/run_cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
LOG=${OUT:-.}/benchmarks_cpu.txt
{
echo "== $(date -u +%F) $(uname -m), $(nproc) CPUs, $($PY -c 'import torch; print("torch", torch.__version__)')"
echo "-- online class thresholds"; $PY benchmarks/bench_thresholds_online.py --repeats 8
echo "-- offline class thresholds"; $PY benchmarks/bench_thresholds_offline.py
echo "-- data pipeline"; $PY benchmarks/bench_data.py --samples 24 --pixels 24
echo "-- training step"; $PY benchmarks/bench_step.py --device cpu --crop 128,64 --batch 1 --iters 3 --baseline --rounds 3
echo "-- activation memory"; $PY benchmarks/bench_memory.py
echo "-- predict.py inference"; $PY benchmarks/bench_predict.py --iters 5
} 2>&1 | tee "$LOG"
