#!/usr/bin/env bash
# The prepared GPU check (README "Benchmarks", docs/BENCHMARKS.md "GPU"): ONE command of at most
# 6 minutes all in. The time limits of its commands (the numbers after `limit`) add up to at most
# BUDGET_S (tests/test_benchmarks.py checks it); every figure is printed and saved into OUTDIR the
# moment it is measured: OUTDIR/gpu_check.txt (everything printed), OUTDIR/peak_tflops.txt,
# OUTDIR/bench_step.jsonl (one JSON line per measured step).
#
#   bash benchmarks/gpu_check.sh OUTDIR
#   GPU_CHECK_TINY=1 bash benchmarks/gpu_check.sh OUTDIR   # every command at tiny sizes on the CPU (tests)
#
# In order, each with its limit in seconds:
#   the interpreter's version and include folder (5); the GPU (nvidia-smi, 5); a bf16 matmul peak
#     for MFU (15);
#   a C compiler and the Python headers for --compile's Triton kernels, installed with apt-get when
#     missing and root (30; the --compile run is skipped, with one line, if they stay missing);
#   phase-1 and phase-2 steps at the paper's per-GPU setting (896x512, batch 2): fp16 (the
#     original's precision), fp16 + channels_last, bf16 + channels_last, fp16 + --cudnn_benchmark,
#     fp16 + --fused_optimizers off (the default fuses on CUDA: one host sync per iteration
#     instead of four); first-iteration and steady-state seconds, peak memory, TFLOP/s, MFU (100);
#   float32 (--amp off) phase-1 steps: PyTorch's TF32 default, --tf32 on, --tf32 off (25);
#   a phase-1 fp16 step without and with --deterministic (15);
#   predict.py's inference at 1024x512 (benchmarks/bench_predict.py): PyTorch float32, bf16 autocast,
#     onnxruntime when its CUDA provider is installed (onnxruntime-gpu; the CPU run measures its CPU
#     provider) (15);
#   the online class-threshold update on the GPU (10);
#   peak memory of the original's loop, ours, ours + --activation_checkpointing, fp16, phases 1-2 (45);
#   --compile (bf16 + channels_last, phase 1): compile time apart from the steady state (95).
# In tiny mode (GPU_CHECK_TINY=1: CPU, 64x32 crops, one timed iteration, the eager compile backend)
# every limit is multiplied by GPU_CHECK_SCALE (default 4), a shared 2-core CPU being far slower.
# BUDGET_S=360
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-}
if [ -z "$OUTDIR" ]; then
  echo "error: usage: bash benchmarks/gpu_check.sh OUTDIR (the folder the figures are saved into)" >&2
  exit 2
fi
mkdir -p "$OUTDIR" || { echo "error: OUTDIR $OUTDIR: cannot create the folder" >&2; exit 2; }
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if [ "${GPU_CHECK_TINY:-0}" = 1 ]; then  # the same commands, sizes for a 2-core CPU
  DEV=cpu CROP=64,32 BATCH=1 HALF=bf16 ITERS=1 WARMUP=1 TF32_ITERS=1 BACKEND=eager MATMUL_N=256
  PRED=(--size 64,32 --iters 1 --warmup 0 --bf16 on --onnx off)  # as on a GPU: bf16, no onnxruntime CUDA provider
  THR=(--bank-length 2000 --pixels 500 --repeats 1) MEM=(--in_process) INPROC=(--in_process)
  SCALE=${GPU_CHECK_SCALE:-4}
else
  DEV=cuda CROP=896,512 BATCH=2 HALF=fp16 ITERS=4 WARMUP=2 TF32_ITERS=2 BACKEND=inductor MATMUL_N=8192
  PRED=(--size 1024,512 --iters 5 --warmup 2 --onnx auto)
  THR=(--repeats 5) MEM=() INPROC=() SCALE=1
fi
exec > >(tee -a "$OUTDIR/gpu_check.txt") 2>&1
TEE=$!

. benchmarks/gpu_limit.sh  # limit SECONDS COMMAND...
build_tools() {  # what Triton compiles its kernels with (the inductor backend only)
  [ "$BACKEND" != inductor ] || { command -v cc >/dev/null 2>&1 && [ -f "${PYINC:-}/Python.h" ]; }
}

echo "== gpu_check $(date -u +%FT%TZ), device $DEV, crop $CROP, batch $BATCH, into $OUTDIR"
read -r PYV PYINC < <(limit 5 $PY -c 'import sys, sysconfig
print("%d.%d" % sys.version_info[:2], sysconfig.get_paths()["include"])')
if command -v nvidia-smi >/dev/null 2>&1; then
  limit 5 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
else
  echo "(no nvidia-smi)"
fi
limit 15 $PY benchmarks/matmul_peak.py --device "$DEV" --n "$MATMUL_N" --out "$OUTDIR/peak_tflops.txt"
PEAK=$(cat "$OUTDIR/peak_tflops.txt" 2>/dev/null || echo 0)
if build_tools; then
  echo "-- --compile build tools: present (backend $BACKEND)"
elif [ "$DEV" = cuda ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "-- --compile build tools missing: apt-get install gcc python${PYV:-3}-dev"
  limit 30 env DEBIAN_FRONTEND=noninteractive bash -c \
    "apt-get update -qq && apt-get install -y -qq gcc python${PYV:-3}-dev >/dev/null"
else
  echo "-- --compile build tools missing and not installable here (not root or no apt-get)"
fi
STEP=(benchmarks/bench_step.py --device "$DEV" --crop "$CROP" --batch "$BATCH" --out "$OUTDIR/bench_step.jsonl"
      ${INPROC[@]+"${INPROC[@]}"})
echo "-- training steps: precision, channels_last, cuDNN autotuning (--cudnn_benchmark), unfused optimizers"
limit 100 $PY "${STEP[@]}" --phase 1,2 --iters "$ITERS" --warmup "$WARMUP" --flops --peak_tflops "$PEAK" \
  --configs "$HALF,$HALF+channels_last,bf16+channels_last,$HALF+cudnn_benchmark,$HALF+fused_off"
echo "-- TF32 in float32 steps: PyTorch's default (convolutions TF32, matmuls float32), --tf32 on, --tf32 off"
limit 25 $PY "${STEP[@]}" --phase 1 --iters "$TF32_ITERS" --warmup 1 --configs off,off+tf32_on,off+tf32_off
echo "-- --deterministic (cuDNN deterministic, torch.use_deterministic_algorithms, cuBLAS workspace): its cost"
limit 15 $PY "${STEP[@]}" --phase 1 --iters "$TF32_ITERS" --warmup 1 --configs "$HALF,$HALF+deterministic"
echo "-- predict.py inference: PyTorch float32, --inference_amp bf16, onnxruntime (CUDA provider only)"
limit 15 $PY benchmarks/bench_predict.py --device "$DEV" "${PRED[@]}"
echo "-- online class thresholds"
limit 10 $PY benchmarks/bench_thresholds_online.py --device "$DEV" ${THR[@]+"${THR[@]}"}
echo "-- peak memory: the original's loop, ours, ours --activation_checkpointing"
limit 45 $PY benchmarks/bench_memory.py --device "$DEV" --amp "$HALF" --small "" --large "$CROP" --batch "$BATCH" \
  --iters 2 --phase 1,2 ${MEM[@]+"${MEM[@]}"}
if build_tools; then
  echo "-- --compile: compile time (first iteration minus a steady one) and steady state"
  limit 95 $PY "${STEP[@]}" --phase 1 --iters 3 --warmup 1 --configs bf16+channels_last+compile \
    --compile_backend "$BACKEND"
else
  echo "-- --compile: skipped (no C compiler, or no Python.h in ${PYINC:-?}, for Triton)"
fi
echo "== gpu_check done in ${SECONDS}s; figures in $OUTDIR"
exec >&- 2>&-
wait "$TEE"  # the saved copy is complete when this script returns
