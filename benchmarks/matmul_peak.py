"""A measured bf16 matmul peak (TFLOP/s), the reference for MFU in ``bench_step.py``.

Times ``--n`` x ``--n`` bf16 matmuls on the device after a warm-up, prints the figure and
writes it (one number) to ``--out``, so the next command can read it.

    python benchmarks/matmul_peak.py --device cuda --n 8192 --out OUTDIR/peak_tflops.txt
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch


def measure(device: torch.device, n: int, repeats: int) -> float:
    """TFLOP/s of ``repeats`` bf16 matmuls of size ``n`` (2 n^3 FLOPs each)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync()
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e12


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--n", type=int, default=8192, help="matrix size")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default="", help="write the figure (TFLOP/s) to this file")
    a = ap.parse_args()
    if a.n <= 0 or a.repeats <= 0:
        print("error: --n and --repeats must be positive", file=sys.stderr)
        return 2
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device", file=sys.stderr)
        return 2
    peak = measure(device, a.n, a.repeats)
    print(f"measured bf16 matmul peak: {peak:.1f} TFLOP/s ({a.n}x{a.n}, {device})", flush=True)
    if a.out:
        tmp = f"{a.out}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(f"{peak:.3f}\n")
        os.replace(tmp, a.out)  # the next command reads a whole number or none
    return 0


if __name__ == "__main__":
    sys.exit(main())
