#!/usr/bin/env bash
# One prepared GPU check for a lent machine (see README "Benchmarks"): phase-1 and phase-2 steps at
# the paper's per-GPU setting (896x512 crop, batch 2), fp16 and bf16, channels_last on/off; seconds
# per iteration, peak memory, TFLOP/s (torch.utils.flop_counter) and MFU against a measured bf16
# matmul peak; the online-threshold update on the GPU; peak GPU memory with and without
# --activation_checkpointing against the original's loop; --compile. Timeouts bound it to under 10 minutes,
# then benchmarks/gpu_ddp_check.sh (DDP kill-and-restart with NCCL) to under 14 in all.
#   bash benchmarks/gpu_check.sh            # writes ${OUT:-.}/gpu_check.txt too
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG=${OUT:-.}/gpu_check.txt
{
echo "== $(date -u +%F) $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null)"
$PY - <<'PYEOF'
import time, torch
n = 8192
a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16); b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
for _ in range(3): a @ b
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(10): a @ b
torch.cuda.synchronize(); dt = (time.perf_counter() - t) / 10
peak = 2 * n**3 / dt / 1e12
print(f"measured bf16 matmul peak: {peak:.0f} TFLOP/s")
open("/tmp/peak_tflops", "w").write(f"{peak:.1f}")
PYEOF
PEAK=$(cat /tmp/peak_tflops 2>/dev/null || echo 0)
for amp in bf16 fp16; do
  for cl in "" "--channels_last"; do
    timeout 75 $PY benchmarks/bench_step.py --device cuda --crop 896,512 --batch 2 --amp $amp $cl \
        --iters 5 --warmup 2 --flops --peak_tflops "$PEAK" --phase 1,2
  done
done
timeout 60 $PY benchmarks/bench_step.py --device cuda --crop 896,512 --batch 2 --amp fp16 --iters 3 --warmup 1 \
    --phase 1 --baseline --saver  # --saver: the time cost of --activation_checkpointing
timeout 30 $PY benchmarks/bench_thresholds_online.py --device cuda --repeats 5
# peak GPU memory (max_memory_allocated) at the paper's per-GPU setting, 896x512, batch 2, fp16, phase 1
# at --layer 1 (the default), then phase 2: the original's loop, ours, ours with --activation_checkpointing
# (one process, peak statistics reset before each step; the first iteration's losses checked against the original's)
timeout 120 $PY benchmarks/bench_memory.py --device cuda --amp fp16 --small "" --large 896,512 --batch 2 --iters 2 \
    --phase 1,2
# --compile last: its first iterations include compilation (bounded so the whole script stays < 8 min)
timeout 100 $PY benchmarks/bench_step.py --device cuda --crop 896,512 --batch 2 --amp bf16 --channels_last \
    --compile --iters 5 --warmup 3 --phase 1
} 2>&1 | tee "$LOG"
bash benchmarks/gpu_ddp_check.sh
