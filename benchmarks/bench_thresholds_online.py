"""Benchmark: one phase-1 confidence-bank update, ours vs the original's rule (docs/METHOD.md section 3).

Setting of the paper's training: 19 classes, banks of 100,000 values per class (already
full), 14,336 new pixels (batch 2 per GPU at 1/8 of a 512x896 crop: 2 x 64 x 112). Both
implementations get the same banks and inputs; their thresholds are compared after every
update.

    python benchmarks/bench_thresholds_online.py [--device cuda] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import numpy as np
import torch


def _timed(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    """Seconds taken by ``fn()`` (``sync`` waits for the device)."""
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def main() -> None:
    """Run the benchmark and print a table (docs/METHOD.md section 3)."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks.reference_rules import reference_update
    from utils.thresholds import OnlineClassThresholds

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (ours only; the reference is host code)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--bank-length", type=int, default=100000)
    parser.add_argument("--pixels", type=int, default=14336)
    parser.add_argument("--p", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    c, length = args.classes, args.bank_length

    gen = torch.Generator().manual_seed(args.seed)
    fill = torch.rand(c, length, generator=gen)
    ours = OnlineClassThresholds(c, args.p, length, device=device)
    ours.update(fill.reshape(-1).to(device), torch.arange(c).repeat_interleave(length).to(device))
    ref_bank = {k: fill[k].tolist() for k in range(c)}
    ref_thr = np.zeros(c, dtype=np.float32)
    reference_update(ref_bank, ref_thr, torch.empty(0), torch.empty(0, dtype=torch.int64), args.p, length)
    ref_thr[:] = ours.thresholds.cpu().numpy()

    inputs = [
        (torch.rand(args.pixels, generator=gen), torch.randint(0, c, (args.pixels,), generator=gen))
        for _ in range(args.repeats + 1)
    ]
    t_ours, t_ref = [], []
    for i, (conf, pred) in enumerate(inputs):
        conf_d, pred_d = conf.to(device), pred.to(device)
        dt_ours = _timed(lambda conf_d=conf_d, pred_d=pred_d: ours.update(conf_d, pred_d), sync)
        dt_ref = _timed(lambda conf=conf, pred=pred: reference_update(ref_bank, ref_thr, conf, pred, args.p, length), sync)
        if not np.array_equal(ours.thresholds.cpu().numpy(), ref_thr):
            raise SystemExit(f"MISMATCH at update {i}: {ours.thresholds.cpu().numpy()} vs {ref_thr}")
        if i > 0:  # the first update is a warm-up
            t_ours.append(dt_ours)
            t_ref.append(dt_ref)

    mean_ours, mean_ref = float(np.mean(t_ours)), float(np.mean(t_ref))
    print(f"classes {c}, bank {length} (full), new pixels {args.pixels}, p {args.p}, repeats {args.repeats}")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {device}")
    print(f"{'implementation':<38} {'mean s/update':>14} {'speed-up':>9}")
    print(f"{'original rule (lists + sorted), host':<38} {mean_ref:14.5f} {1.0:9.1f}")
    print(f"{'OnlineClassThresholds, ' + str(device):<38} {mean_ours:14.5f} {mean_ref / mean_ours:9.1f}")
    print("thresholds identical after every update: yes")


if __name__ == "__main__":
    main()
