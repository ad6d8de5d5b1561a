"""Benchmark: seconds per phase-1 / phase-2 iteration, peak memory, optionally FLOP/s.

Runs the project's real training step (``stages.phase1.Phase1Stage`` / ``stages.phase2``
objective, one DDP-free process) on random uint8 inputs of the given crop, and, with
``--baseline``, a straightforward re-implementation of the original's step in the same run
(separate backward per loss, ``requires_grad`` toggling of the discriminators, confidence
banks in Python lists with a full sort).

``--configs`` lists configurations (precision and switches: channels_last, cuDNN autotuning,
TF32, ``--compile``, ``--deterministic``); every (step, configuration) is a candidate. On CUDA (and on the CPU with
``--in_process``) the candidates are built, measured and freed one after the other in this
process, the peak-memory statistics reset in between, so each peak is that candidate's own; on
the CPU each candidate otherwise runs in a fresh process (``--rounds``). Each row is printed the
moment it is measured (and appended to ``--out`` as a JSON line), with the first iteration's
time apart ("first s": compilation, cuDNN autotuning, lazy initialisation) from the steady
state; for ``+compile`` the compile time is the difference.

    python benchmarks/bench_step.py --device cpu --crop 128,64 --batch 1 --iters 3 --baseline
    python benchmarks/bench_step.py --device cuda --crop 896,512 --batch 2 --flops \
        --configs fp16,fp16+channels_last,bf16+channels_last,fp16+cudnn_benchmark
"""

from __future__ import annotations

import argparse
import copy
import gc
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

import engine.network
from benchmarks.reference_rules import reference_update
from engine.backends import configure_backends, deterministic_environment, set_deterministic
from model import upsample
from stages.options import build_parser, finalize
from utils.distributed import DistEnv


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
MODIFIERS = ("channels_last", "cudnn_benchmark", "tf32_on", "tf32_off", "compile", "fused_on", "fused_off",
             "deterministic")


def candidate_names(phase: str, baseline: bool, saver: bool = False) -> list[str]:
    """The steps timed for ``phase`` ("1" or "2")."""
    names = [f"phase{phase} ours"] + ([f"phase{phase} ours{SAVER}"] if saver else [])
    return names + (["phase1 straightforward"] if baseline and phase == "1" else [])


def parse_config(text: str) -> dict:
    """``AMP[+MODIFIER...]``, e.g. ``fp16+channels_last+cudnn_benchmark``: the precision of the
    step (off, fp16, bf16) and the switches of :data:`MODIFIERS` (``tf32_on`` / ``tf32_off``:
    ``--tf32 on|off``; without either, PyTorch's TF32 default)."""
    amp, *mods = text.split("+")
    if amp not in ("off", "fp16", "bf16"):
        raise SystemExit(f"error: --configs {text!r}: precision must be off, fp16 or bf16, got {amp!r}")
    bad = [m for m in mods if m not in MODIFIERS]
    if bad or ("tf32_on" in mods and "tf32_off" in mods) or ("fused_on" in mods and "fused_off" in mods):
        raise SystemExit(f"error: --configs {text!r}: unknown or conflicting modifier(s) {bad or mods}; "
                         f"choose from {', '.join(MODIFIERS)}")
    return {"amp": amp, "mods": set(mods)}


def make_args(device: str, crop: tuple[int, int], batch: int, config: str, compile_backend: str = "inductor"):
    """The phase-1 options of one configuration (see :func:`parse_config`)."""
    c = parse_config(config)
    argv = ["--rcrop", f"{crop[0]},{crop[1]}", "--batch-size", str(batch), "--amp", c["amp"], "--resume", "",
            "--num-steps", "1000", "--num-steps-stop", "1000", "--quiet"]
    if device == "cpu":
        argv.append("--cpu")
    for mod, flags in (("channels_last", ["--channels_last"]), ("compile", ["--compile"]),
                       ("cudnn_benchmark", ["--cudnn_benchmark"]), ("tf32_on", ["--tf32", "on"]),
                       ("tf32_off", ["--tf32", "off"]), ("fused_on", ["--fused_optimizers", "on"]),
                       ("fused_off", ["--fused_optimizers", "off"]), ("deterministic", ["--deterministic"])):
        if mod in c["mods"]:
            argv += flags
    args = finalize(build_parser("phase1", "bench").parse_args(argv), "phase1")
    engine.network.COMPILE_BACKEND = compile_backend  # this process's backend of --compile
    return args


def build_step(name: str, args, env: DistEnv):
    """The step function of candidate ``name`` (see :func:`candidate_names`)."""
    args = copy.copy(args)
    args.activation_checkpointing = name.endswith(SAVER)
    if name.startswith("phase1 ours"):
        return phase1_ours(args, env)[0]
    if name == "phase1 straightforward":
        configure_backends(args.tf32, args.cudnn_benchmark, env.device)  # what prepare_for_training does for ours
        return phase1_straightforward(args, env)
    return phase2_ours(args, env)


class BackendFlags:
    """The process-wide switches a configuration may set, restored before each candidate (a
    configuration without a switch then runs with PyTorch's default, not the last one's)."""

    def __init__(self) -> None:
        self.saved = self.read()
        self.saved_algorithms = (torch.are_deterministic_algorithms_enabled(),
                                 torch.is_deterministic_algorithms_warn_only_enabled())

    @staticmethod
    def read() -> tuple[bool, bool, bool, bool]:
        return (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
                torch.backends.cudnn.deterministic)

    def restore(self) -> None:
        (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.deterministic) = self.saved
        mode, warn_only = self.saved_algorithms
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)


def release(device: torch.device) -> None:
    """Free what the previous candidate left (its modules, gradients, optimizer state, graphs)."""
    gc.collect()  # the step closures, stages and trainers refer to one another: cycles
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def measure(name: str, config: str, a, crop: tuple[int, int], device: torch.device) -> dict:
    """Build candidate (``name``, ``config``), time it, count its FLOPs; the references to it die
    with this call, so the next candidate's peak memory does not include this one's."""
    env = DistEnv(device=device)
    torch.manual_seed(0)
    args = make_args(device.type, crop, a.batch, config, a.compile_backend)
    set_deterministic(args.deterministic)  # what every rank of a script does first (engine.launch)
    fn = build_step(name, args, env)
    t0 = time.perf_counter()
    fn()  # the first iteration: compilation (--compile), cuDNN autotuning, lazy initialisation
    sync(device)
    first = time.perf_counter() - t0
    sec = time_steps(fn, a.iters, max(a.warmup - 1, 0), device)
    mem = peak_memory_mb(device)
    flops = count_flops(fn) if a.flops and "compile" not in parse_config(config)["mods"] else 0.0
    return {"sec": sec, "first": first, "mem": mem, "flops": flops}


def dynamo_reset() -> None:
    import torch._dynamo

    torch._dynamo.reset()


def in_child(name: str, config: str, argv: list[str]) -> dict:
    """Measure one candidate in a fresh process: its own peak RSS, no state left by another."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--only", json.dumps([name, config])],
                         check=True, capture_output=True, text=True).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


class Report:
    """Prints each row the moment it is measured (and appends it to ``--out`` as a JSON line)."""

    def __init__(self, a, device: torch.device, crop: tuple[int, int]) -> None:
        self.a, self.device, self.rows = a, device, []
        print(f"device={device} crop={crop[0]}x{crop[1]} batch={a.batch} torch={torch.__version__} "
              f"threads={torch.get_num_threads()}" + (f" gpu={torch.cuda.get_device_name(device)}"
                                                      if device.type == "cuda" else ""))
        mem_name = "peak RSS MB" if device.type == "cpu" and not a.in_process else "peak MB"
        print(f"{'step':26s} {'config':34s} {'first s':>8s} {'s/iter':>9s} {mem_name:>11s} {'TFLOP/iter':>11s} "
              f"{'TFLOP/s':>8s} {'MFU':>6s}", flush=True)

    def row(self, name: str, config: str, r: dict) -> None:
        tf = r["flops"] / 1e12
        mfu = f"{100 * tf / r['sec'] / self.a.peak_tflops:5.1f}%" if self.a.peak_tflops and r["flops"] else "  -"
        tfs = f"{tf / r['sec']:8.2f}" if r["flops"] else f"{'-':>8s}"
        print(f"{name:26s} {config:34s} {r['first']:8.2f} {r['sec']:9.3f} {r['mem']:11.0f} {tf:11.3f} {tfs} {mfu:>6s}",
              flush=True)
        if "compile" in parse_config(config)["mods"]:
            print(f"  {name} {config}: compile time {r['first'] - r['sec']:.1f} s (first iteration minus a "
                  f"steady one), steady state {r['sec']:.3f} s/iter", flush=True)
        record = {"step": name, "config": config, "device": str(self.device), "crop": self.a.crop,
                  "batch": self.a.batch, **r, "compile_s": r["first"] - r["sec"] if "compile" in config else None}
        self.rows.append(record)
        if self.a.out:
            with open(self.a.out, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def ratios(self) -> None:
        """Each candidate against the same step without one of its modifiers, and the
        straightforward step against ours, where both were measured."""
        secs = {(r["step"], r["config"]): r["sec"] for r in self.rows}
        for (name, config), sec in secs.items():
            c = parse_config(config)
            for mod in sorted(c["mods"]):
                base = "+".join([c["amp"], *[m for m in config.split("+")[1:] if m != mod]])
                if (name, base) in secs:
                    print(f"{name} {config} / {base} = {sec / secs[name, base]:.2f}x time")
            if name.endswith(" ours") and ("phase1 straightforward", config) in secs and name.startswith("phase1"):
                print(f"phase1 {config}: straightforward / ours = {secs['phase1 straightforward', config] / sec:.2f}x")
            if name.endswith(SAVER) and (name[: -len(SAVER)], config) in secs:
                ph = name.split()[0]
                print(f"{ph} {config}: time with --activation_checkpointing / without = "
                      f"{sec / secs[name[: -len(SAVER)], config]:.2f}x")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--phase", default="1,2", help="which phases: 1, 2 or 1,2")
    ap.add_argument("--crop", default="128,64", help="crop W,H")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--amp", default="off", choices=["off", "fp16", "bf16"])
    ap.add_argument("--channels_last", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--configs", default="",
                    help="comma-separated configurations AMP[+MODIFIER...], each measured in turn, e.g. "
                         "fp16,fp16+channels_last,fp16+cudnn_benchmark,off+tf32_off; modifiers: "
                         + ", ".join(MODIFIERS) + " (default: the one given by --amp, --channels_last, --compile)")
    ap.add_argument("--compile_backend", default="inductor", help="torch.compile backend of +compile")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1,
                    help="iterations before the timed ones, the first included (at least the first is run; its "
                         "time is reported apart as 'first s': compilation, autotuning)")
    ap.add_argument("--baseline", action="store_true", help="also time the straightforward original-style step")
    ap.add_argument("--saver", action="store_true", help="also time our steps with --activation_checkpointing")
    ap.add_argument("--rounds", type=int, default=2,
                    help="CPU: each candidate runs in its own process this many times, in alternating order; "
                         "the median time is reported")
    ap.add_argument("--in_process", action="store_true",
                    help="CPU: every candidate in this process, one after the other, as on CUDA (a smoke test: "
                         "peak RSS then includes the earlier candidates)")
    ap.add_argument("--flops", action="store_true", help="count FLOPs of one step (torch.utils.flop_counter)")
    ap.add_argument("--peak_tflops", type=float, default=0.0, help="device peak for MFU (0: not shown)")
    ap.add_argument("--out", default="", help="append each row, as it is measured, to this JSON-lines file")
    ap.add_argument("--only", default=None, help=argparse.SUPPRESS)  # internal: one candidate, JSON result
    a = ap.parse_args()
    crop = tuple(int(v) for v in a.crop.split(","))
    device = torch.device(a.device)
    configs = list(dict.fromkeys(c for c in a.configs.split(",") if c)) or \
        ["+".join([a.amp, *(["channels_last"] if a.channels_last else []), *(["compile"] if a.compile else [])])]
    for c in configs:
        parse_config(c)
    # As main_entry: before CUDA initialises. cuBLAS then has this workspace for every candidate of
    # the run, so +deterministic is compared with the same workspace, the kernels' choice apart.
    deterministic_environment(any("deterministic" in parse_config(c)["mods"] for c in configs))
    if a.only is not None:
        name, config = json.loads(a.only)
        print("RESULT " + json.dumps(measure(name, config, a, crop, device)))
        return 0
    report = Report(a, device, crop)
    flags = BackendFlags()
    failed = 0
    for phase in a.phase.split(","):
        names = candidate_names(phase, a.baseline, a.saver)
        cands = [(n, c) for c in configs for n in names]
        if device.type == "cpu" and not a.in_process:
            # Fresh processes: ru_maxrss cannot be reset, and alternation evens out drift.
            argv = list(sys.argv[1:])
            results: dict[tuple[str, str], list[dict]] = {k: [] for k in cands}
            for r in range(a.rounds):
                for k in (cands if r % 2 == 0 else cands[::-1]):
                    results[k].append(in_child(*k, argv))
            for k in cands:
                rs = sorted(results[k], key=lambda x: x["sec"])
                med = dict(rs[len(rs) // 2], mem=max(x["mem"] for x in rs))
                report.row(*k, med)
        else:
            for name, config in cands:  # built, measured and freed one at a time
                flags.restore()
                release(device)
                try:
                    report.row(name, config, measure(name, config, a, crop, device))
                except Exception as exc:  # noqa: BLE001 - one failed candidate (out of memory...) must not stop the rest
                    failed += 1
                    first = (str(exc).strip().splitlines() or [""])[0][:300]
                    print(f"{name:26s} {config:34s} FAILED: {type(exc).__name__}: {first}", flush=True)
                if "compile" in config:
                    dynamo_reset()  # drop the compiled graphs before the next candidate
    flags.restore()
    report.ratios()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
