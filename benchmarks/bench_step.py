"""Benchmark: seconds per phase-1 / phase-2 iteration, peak memory, optionally FLOP/s.

Runs the project's real training step (``stages.phase1.Phase1Stage`` / ``stages.phase2``
objective, one DDP-free process) on random uint8 inputs of the given crop, and, with
``--baseline``, a straightforward re-implementation of the original's step in the same run
(separate backward per loss, ``requires_grad`` toggling of the discriminators, confidence
banks in Python lists with a full sort). Prints a table.

    python benchmarks/bench_step.py --device cpu --crop 128,64 --batch 1 --iters 3 --baseline
    python benchmarks/bench_step.py --device cuda --crop 896,512 --batch 2 --amp bf16 --channels_last --flops
    python benchmarks/bench_step.py --device cuda --crop 896,512 --batch 2 --amp fp16 --fused_optimizers off
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.reference_rules import reference_update
from engine.options import build_parser, finalize
from model import upsample
from utils.distributed import DistEnv


def make_args(device: str, crop: tuple[int, int], batch: int, amp: str, channels_last: bool, compile_: bool,
              fused: str = "auto"):
    argv = ["--rcrop", f"{crop[0]},{crop[1]}", "--batch-size", str(batch), "--amp", amp, "--resume", "",
            "--num-steps", "1000", "--num-steps-stop", "1000", "--quiet", "--fused_optimizers", fused]
    if device == "cpu":
        argv.append("--cpu")
    if channels_last:
        argv.append("--channels_last")
    if compile_:
        argv.append("--compile")
    return finalize(build_parser("phase1", "bench").parse_args(argv), "phase1")


def fake_batch(batch: int, crop: tuple[int, int], full: tuple[int, int] | None = None, soft: bool = False) -> dict:
    w, h = crop
    g = torch.Generator().manual_seed(0)
    out = {"img": torch.randint(0, 256, (batch, 3, h, w), dtype=torch.uint8, generator=g),
           "label": torch.randint(0, 19, (batch, h, w), dtype=torch.uint8, generator=g)}
    if full is not None:
        fw, fh = full
        out["img_full"] = torch.randint(0, 256, (batch, 3, fh, fw), dtype=torch.uint8, generator=g)
        out["resized_hw"] = torch.tensor([[fh, fw]] * batch)
        out["crop_box"] = torch.tensor([[0, h, 0, w]] * batch)
        out["flip"] = torch.tensor([True] * batch)
        if soft:
            out["soft_label"] = torch.randn(batch, 19, (fh + 7) // 8, (fw + 7) // 8, generator=g)
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_steps(step, iters: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    sync(device)
    return (time.perf_counter() - t0) / iters


def phase1_ours(args, env: DistEnv):
    from engine.trainer import Trainer
    from stages.phase1 import Phase1Stage

    stage = Phase1Stage(args, env)
    stage.resuming = True  # no weight files: random init is fine for timing
    stage.build()
    trainer = Trainer(stage, None, None)
    batches = itertools.repeat((fake_batch(stage.batch, args.rcrop), fake_batch(stage.batch, args.rcrop)))
    it = itertools.count()

    def step() -> None:
        trainer.train_step(next(it), batches)  # the engine's iteration (reads the losses once)

    return step, stage


def phase1_straightforward(args, env: DistEnv):
    """The original's step: six backward calls, requires_grad toggling, Python-list banks."""
    from model import DecoupleNet, FCDiscriminator

    dev = env.device
    net = DecoupleNet(layer=args.layer).to(dev).train()
    d1 = FCDiscriminator(net.stem_channels, 32).to(dev)
    d2 = FCDiscriminator(19, 64).to(dev)
    opt = torch.optim.SGD([{"params": net.backbone_parameters()}, {"params": net.head_parameters()}],
                          lr=args.learning_rate, momentum=0.9, weight_decay=5e-4)
    opt_d1 = torch.optim.Adam(d1.parameters(), lr=1e-4, betas=(0.9, 0.99))
    opt_d2 = torch.optim.Adam(d2.parameters(), lr=1e-4, betas=(0.9, 0.99))
    b = args.batch_size
    src, tgt = fake_batch(b, args.rcrop), fake_batch(b, args.rcrop)
    banks: dict[int, list[float]] = {c: [] for c in range(19)}
    thr = np.zeros(19, dtype=np.float32)
    mse = torch.nn.MSELoss()
    amp = args.amp != "off"
    dtype = torch.float16 if args.amp == "fp16" else torch.bfloat16

    def step() -> None:
        nonlocal thr
        for o in (opt, opt_d1, opt_d2):
            o.zero_grad()
        for p in list(d1.parameters()) + list(d2.parameters()):
            p.requires_grad = False
        x_s = src["img"].to(dev).double().div(255).float()  # the original's float64 conversion
        y_s = src["label"].to(dev).long()
        with torch.autocast(dev.type, dtype=dtype, enabled=amp):
            f_s = net.stem(x_s, "source")
            p_s = upsample(net.classifier(net.decode(f_s)), y_s.shape[-2:]) / 1.8
            out = d1(upsample(f_s, x_s.shape[-2:])).float()
            loss = F.cross_entropy(p_s.float(), y_s, ignore_index=250) + 0.1 * mse(out, torch.ones_like(out))
        loss.backward()
        x_t = tgt["img"].to(dev).double().div(255).float()
        with torch.autocast(dev.type, dtype=dtype, enabled=amp):
            f_t = net.stem(x_t, "target")
            h_t = net.decode(f_t)
            q = net.classifier(h_t)
            conf, pred = F.softmax(q.detach().float(), 1).max(1)
            thr = reference_update(banks, thr, conf.cpu(), pred.cpu(), 0.8, 100000)
            t = torch.as_tensor(thr, device=dev)
            pl = pred.clone()
            pl[conf < t[pred]] = 250
            p_t = upsample(q, x_t.shape[-2:]) / 1.8
            out = d2(F.softmax(p_t, 1)).float()
            loss = 0.1 * F.cross_entropy(net.aux_classifier(h_t).float(), pl, ignore_index=250) + 0.01 * mse(
                out, torch.zeros_like(out))
        loss.backward()
        for p in list(d1.parameters()) + list(d2.parameters()):
            p.requires_grad = True
        for d, a, lab in ((d1, upsample(f_s.detach(), x_s.shape[-2:]), 0.0), (d1, upsample(f_t.detach(), x_t.shape[-2:]), 1.0),
                          (d2, F.softmax(p_s.detach(), 1), 0.0), (d2, F.softmax(p_t.detach(), 1), 1.0)):
            with torch.autocast(dev.type, dtype=dtype, enabled=amp):
                out = d(a)
            (0.5 * mse(out.float(), torch.full_like(out.float(), lab))).backward()
        for o in (opt, opt_d1, opt_d2):
            o.step()

    return step


def phase2_ours(args, env: DistEnv):
    """The engine's phase-2 iteration; the network, objective and optimizer of
    ``Phase2Stage.build`` (which would also read soft labels and a thresholds file)."""
    from engine.trainer import Trainer
    from stages.phase2 import Phase2Objective, Phase2Stage

    args.src_loss_weight = 1.0
    stage = Phase2Stage(args, env)
    stage.resuming = True  # random weights: no weight file is read
    stage.train_objective(Phase2Objective(stage.build_net(decoupled=False, aux=False), args))
    stage.thresholds = torch.full((19,), 0.5, device=env.device)
    trainer = Trainer(stage, None, None)
    w, h = args.rcrop
    full = (w * 2, h * 2)
    batches = itertools.repeat((fake_batch(stage.batch, args.rcrop),
                                fake_batch(stage.batch, args.rcrop, full=full, soft=True)))
    it = itertools.count()

    def step() -> None:
        trainer.train_step(next(it), batches)

    return step


def count_flops(step) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


SAVER = " + checkpointing"  # candidate name suffix: the step with --activation_checkpointing


def candidate_names(phase: str, baseline: bool, saver: bool = False) -> list[str]:
    """The steps timed for ``phase`` ("1" or "2")."""
    names = [f"phase{phase} ours"] + ([f"phase{phase} ours{SAVER}"] if saver else [])
    return names + (["phase1 straightforward"] if baseline and phase == "1" else [])


def build_step(name: str, args, env: DistEnv):
    """The step function of candidate ``name`` (see :func:`candidate_names`)."""
    args = copy.copy(args)
    args.activation_checkpointing = name.endswith(SAVER)
    if name.startswith("phase1 ours"):
        return phase1_ours(args, env)[0]
    if name == "phase1 straightforward":
        return phase1_straightforward(args, env)
    return phase2_ours(args, env)


def measure(name: str, fn, a, device: torch.device) -> tuple[str, float, float, float]:
    sec = time_steps(fn, a.iters, a.warmup, device)
    flops = count_flops(fn) if a.flops else 0.0
    return name, sec, peak_memory_mb(device), flops


def in_child(name: str, argv: list[str]) -> tuple[float, float, float]:
    """Measure one candidate in a fresh process: its own peak RSS, no state left by another."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--only", name], check=True,
                         capture_output=True, text=True).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("RESULT "))
    r = json.loads(line[len("RESULT "):])
    return r["sec"], r["mem"], r["flops"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--phase", default="1,2", help="which phases: 1, 2 or 1,2")
    ap.add_argument("--crop", default="128,64", help="crop W,H")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--amp", default="off", choices=["off", "fp16", "bf16"])
    ap.add_argument("--channels_last", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--fused_optimizers", default="auto", choices=["auto", "on", "off"],
                    help="our steps' optimizer kernels, as the training flag (auto: fused on CUDA only)")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--baseline", action="store_true", help="also time the straightforward original-style step")
    ap.add_argument("--saver", action="store_true", help="also time our steps with --activation_checkpointing")
    ap.add_argument("--rounds", type=int, default=2,
                    help="CPU: each candidate runs in its own process this many times, in alternating order; "
                         "the median time is reported")
    ap.add_argument("--flops", action="store_true", help="count FLOPs of one step (torch.utils.flop_counter)")
    ap.add_argument("--peak_tflops", type=float, default=0.0, help="device peak for MFU (0: not shown)")
    ap.add_argument("--only", default=None, help=argparse.SUPPRESS)  # internal: one candidate, JSON result
    a = ap.parse_args()
    crop = tuple(int(v) for v in a.crop.split(","))
    device = torch.device(a.device)
    env = DistEnv(device=device)
    torch.manual_seed(0)
    if a.only is not None:
        args = make_args(a.device, crop, a.batch, a.amp, a.channels_last, a.compile, a.fused_optimizers)
        _, sec, mem, flops = measure(a.only, build_step(a.only, args, env), a, device)
        print("RESULT " + json.dumps({"sec": sec, "mem": mem, "flops": flops}))
        return
    rows = []
    for phase in a.phase.split(","):
        names = candidate_names(phase, a.baseline, a.saver)
        if device.type == "cpu":
            # Fresh processes: ru_maxrss cannot be reset, and alternation evens out drift.
            argv = list(sys.argv[1:])
            results: dict[str, list[tuple[float, float, float]]] = {n: [] for n in names}
            for r in range(a.rounds):
                for n in (names if r % 2 == 0 else names[::-1]):
                    results[n].append(in_child(n, argv))
            for n in names:
                secs = sorted(x[0] for x in results[n])
                rows.append((n, secs[len(secs) // 2], max(x[1] for x in results[n]), results[n][0][2]))
        else:
            args = make_args(a.device, crop, a.batch, a.amp, a.channels_last, a.compile, a.fused_optimizers)
            candidates = [(n, build_step(n, args, env)) for n in names]
            for name, fn in candidates:
                rows.append(measure(name, fn, a, device))
    print(f"device={device} crop={crop[0]}x{crop[1]} batch={a.batch} amp={a.amp} channels_last={a.channels_last} "
          f"compile={a.compile} fused_optimizers={a.fused_optimizers} torch={torch.__version__} threads={torch.get_num_threads()}")
    mem_name = "peak RSS MB" if device.type == "cpu" else "peak MB"
    print(f"{'step':26s} {'s/iter':>9s} {mem_name:>11s} {'TFLOP/iter':>11s} {'TFLOP/s':>8s} {'MFU':>6s}")
    for name, sec, mem, flops in rows:
        tf = flops / 1e12
        mfu = f"{100 * tf / sec / a.peak_tflops:5.1f}%" if a.peak_tflops and flops else "  -"
        print(f"{name:26s} {sec:9.3f} {mem:11.0f} {tf:11.3f} {tf / sec:8.2f} {mfu:>6s}")
    base = {r[0].split()[0]: r[1] for r in rows if "straightforward" in r[0]}
    ours = {r[0].split()[0]: r[1] for r in rows if r[0].endswith(" ours")}
    for name, sec, _, _ in rows:
        ph = name.split()[0]
        if name.endswith(" ours") and ph in base:
            print(f"{ph}: straightforward / ours = {base[ph] / sec:.2f}x")
        if name.endswith(SAVER):
            print(f"{ph}: time with --activation_checkpointing / without = {sec / ours[ph]:.2f}x")


if __name__ == "__main__":
    main()
