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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils.files import atomic_write  # after the sys.path line above


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
    options = ap.parse_args()
    if options.n <= 0 or options.repeats <= 0:
        print("error: --n and --repeats must be positive", file=sys.stderr)
        return 2
    device = torch.device(options.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device", file=sys.stderr)
        return 2
    peak = measure(device, options.n, options.repeats)
    print(f"measured bf16 matmul peak: {peak:.1f} TFLOP/s ({options.n}x{options.n}, {device})", flush=True)
    if options.out:  # atomically: the next command reads a whole number or none
        atomic_write(options.out, lambda f: f.write(f"{peak:.3f}\n".encode()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
