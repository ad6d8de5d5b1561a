"""Benchmark: what the per-iteration agreement on a stop request costs (docs/BENCHMARKS.md).

Every iteration the ranks must learn whether any of them got SIGUSR1 / SIGTERM, so that all stop
after the same iteration (docs/RELIABILITY.md, "Signals, preemption, SLURM"). The trainer puts
the flag into the iteration's existing all-reduce of the losses (one more float64 element,
:meth:`engine.trainer.Trainer.train_step`). This benchmark runs the real phase-1 iteration under
``torchrun`` on generated data and times, interleaved iteration by iteration on the same ranks
and data stream:

* ``folded``: the trainer as it is (the flag in the losses' all-reduce);
* ``off``: without the flag (``Trainer.agree_on_stop = False``, for benchmarks only);
* ``separate``: without it, plus what the plain design would add: a one-element all-reduce of
  its own and its read on the host, after the iteration;

and, alone and repeated, that one-element all-reduce and its read, and the iteration's own
all-reduce (the float64 tensor of losses and pseudo-label counts, with its read) without and with
the flag's element, interleaved: the fold's own cost, free of the iterations' noise. Rank 0
prints the medians (and appends one JSON line to ``--out``).

    python -m torch.distributed.run --nproc_per_node 2 benchmarks/bench_stop_agreement.py --crop 256,128
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from datasets.synthetic import generate
from engine.launch import seed_everything
from engine.trainer import Trainer
from stages.options import parse_args
from stages.phase1 import Phase1Stage
from tests.helpers import filled_sourceonly_checkpoint
from utils import distributed as du

VARIANTS = ("folded", "off", "separate")


def separate_agreement(device: torch.device) -> None:
    """A one-element all-reduce of its own and its read on the host (the plain design)."""
    flag = torch.zeros(1, dtype=torch.float64, device=device)
    du.all_reduce_sum(flag, device)
    float(flag.item())


def quartiles(values: list[float]) -> list[float]:
    """The 25th and 75th percentiles (the median of one value for a single one)."""
    if len(values) < 2:
        return [values[0], values[0]]
    q = statistics.quantiles(values, n=4)
    return [q[0], q[2]]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--crop", default="256,128", help="training crop W,H (the images are generated at twice it)")
    p.add_argument("--batch", type=int, default=0, help="total batch (default: 1 per rank)")
    p.add_argument("--iters", type=int, default=15, help="timed iterations per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first")
    p.add_argument("--collectives", type=int, default=300, help="repetitions of the collective alone")
    p.add_argument("--cpu", action="store_true", help="gloo on the CPU even where CUDA is there")
    p.add_argument("--out", default="", help="append a JSON line with the figures")
    opts = p.parse_args()
    w, h = (int(v) for v in opts.crop.split(","))
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    work = tempfile.mkdtemp(prefix=f"bench_stop_{rank}_")  # each rank its own copy of the data
    data = generate(os.path.join(work, "data"), seed=0, size=(2 * w, 2 * h), num_source=8, num_target_train=8,
                    num_target_val=2)
    ckpt = os.path.join(work, "start.pth")
    torch.save(filled_sourceonly_checkpoint(1), ckpt)
    os.makedirs(os.path.join(work, "snap"))
    device = ["--cpu"] if opts.cpu or not du.cuda_usable() else ["--amp", "off"]
    args = parse_args("phase1", "bench", [
        *device, "--quiet", "--src_rootpath", data["gta5"], "--tgt_rootpath", data["cityscapes"],
        "--src_img_size", f"{2 * w},{2 * h}", "--tgt_img_size", f"{2 * w},{2 * h}", "--resize", str(2 * w),
        "--rcrop", f"{w},{h}", "--batch-size", str(opts.batch or world), "--num-workers", "0", "--resume", ckpt,
        "--snapshot-dir", os.path.join(work, "snap"), "--num-steps", "100000"])
    env = du.init_distributed(-1, args)
    try:
        seed_everything(args.random_seed, env.rank)
        stage = Phase1Stage(args, env)
        stage.build()
        trainer = Trainer(stage, None, None)
        batches = stage.batches(0)
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        losses = 0
        for it in range(opts.warmup + opts.iters * len(VARIANTS)):
            variant = VARIANTS[it % len(VARIANTS)]
            trainer.agree_on_stop = variant == "folded"
            du.barrier(env.device)
            start = time.perf_counter()
            losses = len(trainer.train_step(it, batches))
            if variant == "separate":
                separate_agreement(env.device)
            elapsed = time.perf_counter() - start
            if it >= opts.warmup:
                times[variant].append(elapsed)
        du.barrier(env.device)
        alone = []
        for _ in range(opts.collectives):
            start = time.perf_counter()
            separate_agreement(env.device)
            alone.append(time.perf_counter() - start)
        size = losses + (stage.pseudo_monitor.size if stage.pseudo_monitor is not None else 0)
        reduce_times: dict[int, list[float]] = {size: [], size + 1: []}
        for i in range(2 * opts.collectives):
            n = size + i % 2
            tensor = torch.ones(n, dtype=torch.float64, device=env.device)
            start = time.perf_counter()
            du.all_reduce_sum(tensor, env.device).cpu()
            reduce_times[n].append(time.perf_counter() - start)
    finally:
        du.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    if env.is_main:
        med = {v: statistics.median(t) for v, t in times.items()}
        quart = {v: quartiles(t) for v, t in times.items()}
        row = {"world_size": env.world_size, "device": str(env.device), "crop": [w, h], "batch": args.batch_size,
               "iters_per_variant": opts.iters, **{f"{v}_s_per_iter": med[v] for v in VARIANTS},
               **{f"{v}_quartiles": quart[v] for v in VARIANTS},
               "collective_alone_ms": 1e3 * statistics.median(alone), "reduced_elements": size,
               "iteration_reduce_ms": 1e3 * statistics.median(reduce_times[size]),
               "iteration_reduce_with_flag_ms": 1e3 * statistics.median(reduce_times[size + 1])}
        print(f"phase-1 iteration, {env.world_size} rank(s) on {env.device}, crop {w}x{h}, batch {args.batch_size}, "
              f"median (quartiles) of {opts.iters} iterations per variant, interleaved")
        for v in VARIANTS:
            print(f"  {v:9s} {med[v]:8.4f} s/iter ({quart[v][0]:.4f}-{quart[v][1]:.4f})  "
                  f"{100 * (med[v] / med['off'] - 1):+.2f}% vs off")
        print(f"  one-element all-reduce + host read alone: {row['collective_alone_ms']:.3f} ms "
              f"({100 * row['collective_alone_ms'] / 1e3 / med['off']:.3f}% of an iteration), median of "
              f"{opts.collectives}")
        print(f"  the iteration's all-reduce + read alone: {row['iteration_reduce_ms']:.3f} ms for {size} float64, "
              f"{row['iteration_reduce_with_flag_ms']:.3f} ms with the flag ({size + 1}), medians of "
              f"{opts.collectives} each, interleaved")
        if opts.out:
            with open(opts.out, "a", encoding="utf-8") as f:  # a log of runs, appended
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
