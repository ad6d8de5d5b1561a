"""Benchmark: activation memory of a training iteration, ours against the original's loop.

CPU (the default): in a fresh process per (step, crop), the peak resident memory (``ru_maxrss``)
of a few training iterations at two crop sizes; the growth from the small to the large crop is
the activation memory that the crop adds (weights, gradients, optimizer state and libraries
cancel out). By default allocations of 64 KiB and more are served by ``mmap``
(``MALLOC_MMAP_THRESHOLD_``), so memory leaves the resident set when it is freed and the peak
counts what is alive, as CUDA's ``max_memory_allocated`` does; ``--mmap_threshold 0`` keeps
glibc's default heap, whose freed-but-kept memory adds to the peak. CUDA (``--device cuda``):
one process, ``torch.cuda.max_memory_allocated`` per step, the statistics reset in between.

Steps, for phase 1 and phase 2:

* ``original``: the original's loop written out with this project's network, in its order:
  phase 1 back-propagates the source losses, then the target losses, then each of the four
  discriminator terms (six backward calls, ``requires_grad`` toggling of the discriminators);
  phase 2 back-propagates the source loss, then the target loss (pseudo labels warped at the
  full resolution as the original does).
* ``ours``: this project's training step (``Stage.step`` + ``Trainer.train_step``).
* ``ours --activation_checkpointing``: the same with the memory saver on.

Each step's first-iteration losses are checked against the original-style loop's (same weights
and inputs); seconds per iteration are those after the first.

    python benchmarks/bench_memory.py                      # phases 1 and 2, 192x96 -> 448x256, batch 2
    python benchmarks/bench_memory.py --mmap_threshold 0   # with glibc's default heap
    python benchmarks/bench_memory.py --device cuda --amp fp16 --small "" --large 896,512
"""

from __future__ import annotations

import argparse
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

from benchmarks.reference_rules import reference_update
from engine.optim import set_lr
from model import upsample
from stages.options import build_parser, finalize
from utils.distributed import DistEnv

CANDIDATES = ("original", "ours", "ours --activation_checkpointing")
TEMPERATURE = 1.8
IGNORE = 250


def make_args(phase: str, crop: tuple[int, int], batch: int, saver: bool, device: torch.device, amp: str):
    stage = "phase1" if phase == "1" else "phase2"
    argv = ["--amp", amp, "--rcrop", f"{crop[0]},{crop[1]}", "--batch-size", str(batch), "--resume", "",
            "--num-steps", "1000", "--num-steps-stop", "1000", "--quiet", "--snapshot-dir", "."]
    if device.type == "cpu":
        argv.append("--cpu")
    if saver:
        argv.append("--activation_checkpointing")
    args = finalize(build_parser(stage, "bench").parse_args(argv), stage)
    return args


def fake_batch(batch: int, crop: tuple[int, int], seed: int, phase2_target: bool = False) -> dict:
    """uint8 images and labels as the data loaders deliver them; for a phase-2 target batch also
    the whole image (twice the crop), its soft label at 1/8 and the augmentation record (the
    resize lands on the whole image's size, the crop is its top-left corner, flipped)."""
    w, h = crop
    g = torch.Generator().manual_seed(seed)
    out = {"img": torch.randint(0, 256, (batch, 3, h, w), dtype=torch.uint8, generator=g),
           "label": torch.randint(0, 19, (batch, h, w), dtype=torch.uint8, generator=g)}
    if phase2_target:
        fw, fh = 2 * w, 2 * h
        out["img_full"] = torch.randint(0, 256, (batch, 3, fh, fw), dtype=torch.uint8, generator=g)
        out["soft_label"] = 3 * torch.randn(batch, 19, (fh + 7) // 8, (fw + 7) // 8, generator=g)
        out["resized_hw"] = torch.tensor([[fh, fw]] * batch)
        out["crop_box"] = torch.tensor([[0, h, 0, w]] * batch)
        out["flip"] = torch.tensor([True] * batch)
    return out


def image(batch: dict, dev: torch.device, key: str = "img") -> torch.Tensor:
    return batch[key].to(dev).float().div(255.0)


def autocast(args, dev: torch.device):
    """The original's ``torch.cuda.amp.autocast()`` around every forward (fp16), or none."""
    dtype = torch.float16 if args.amp == "fp16" else torch.bfloat16
    return torch.autocast(dev.type, dtype=dtype, enabled=args.amp != "off")


# ---------------------------------------------------------------------------- ours
def ours_phase1(args, dev: torch.device):
    from engine.trainer import Trainer
    from stages.phase1 import Phase1Stage

    stage = Phase1Stage(args, DistEnv(device=dev))
    stage.resuming = True  # random weights: no weight file is read
    stage.build()
    return Trainer(stage, None, None)


def ours_phase2(args, dev: torch.device):
    """Phase2Stage with the network, objective and optimizer of ``Phase2Stage.build``, which
    would also read a soft-label folder and a thresholds file (here: fixed thresholds 0.5)."""
    from engine.trainer import Trainer
    from stages.phase2 import Phase2Objective, Phase2Stage

    stage = Phase2Stage(args, DistEnv(device=dev))
    stage.resuming = True  # random weights: no weight file is read
    stage.train_objective(Phase2Objective(stage.build_net(decoupled=False, aux=False), args))
    stage.thresholds = torch.full((args.num_classes,), 0.5, device=dev)
    return Trainer(stage, None, None)


def ours_step(phase: str, args, dev: torch.device, src: dict, tgt: dict):
    trainer = ours_phase1(args, dev) if phase == "1" else ours_phase2(args, dev)
    batches = itertools.repeat((src, tgt))
    it = iter(range(10**9))

    def step() -> dict[str, float]:
        return trainer.train_step(next(it), batches)

    return step


# ---------------------------------------------------------------------------- the original's loop
def original_phase1(args, dev: torch.device, src: dict, tgt: dict):
    """One iteration of the original ``train_phase1.py`` (iter_size 1, one process)."""
    from model import DecoupleNet, FCDiscriminator
    from model.decouplenet import STEM_CHANNELS

    discs: list[FCDiscriminator] = []
    # The original draws D1 and D2 between its ResNets and its heads (docs/METHOD.md section 2).
    net = DecoupleNet(num_classes=args.num_classes, layer=args.layer, hidden_dim=args.hidden_dim,
                      after_backbone=lambda: discs.extend([FCDiscriminator(STEM_CHANNELS[args.layer], ndf=32),
                                                           FCDiscriminator(args.num_classes, ndf=64)]))
    net = net.to(dev).train()
    d1, d2 = (d.to(dev).train() for d in discs)
    b1, b2, body, head, cls, aux = (net.source_stem, net.target_stem, net.body, net.head, net.classifier,
                                    net.aux_classifier)
    opt = torch.optim.SGD([{"params": net.backbone_parameters()},
                           {"params": net.head_parameters(), "lr": args.learning_rate * 10}],
                          lr=args.learning_rate, momentum=args.momentum, weight_decay=args.weight_decay)
    opt_d1 = torch.optim.Adam(d1.parameters(), lr=args.learning_rate_D, betas=(0.9, 0.99))
    opt_d2 = torch.optim.Adam(d2.parameters(), lr=args.learning_rate_D, betas=(0.9, 0.99))
    scaler = torch.amp.GradScaler(dev.type, enabled=args.amp == "fp16")
    mse, seg_loss = torch.nn.MSELoss(), torch.nn.CrossEntropyLoss(ignore_index=IGNORE)
    banks: dict[int, list[float]] = {c: [] for c in range(args.num_classes)}
    state = {"thr": np.zeros(args.num_classes, dtype=np.float32), "it": 0}

    def step() -> dict[str, float]:
        for o, base in ((opt, args.learning_rate), (opt_d1, args.learning_rate_D), (opt_d2, args.learning_rate_D)):
            o.zero_grad()
            set_lr(o, base, state["it"], args)
        for p in itertools.chain(d1.parameters(), d2.parameters()):
            p.requires_grad = False
        images, labels = image(src, dev), src["label"].to(dev).long()
        src_size = images.shape[-2:]
        with autocast(args, dev):
            feat_src = b1(images)
            pred = cls(head(body(feat_src)))
            pred = upsample(pred, labels.shape[-2:]).div(TEMPERATURE)
            loss_seg = seg_loss(pred, labels)
            d_out = d1(upsample(feat_src, src_size))
            loss_adv_src = args.lambda_adv_src * mse(d_out, torch.full_like(d_out, 1.0))
        scaler.scale(loss_seg + loss_adv_src).backward()

        images = image(tgt, dev)
        tgt_size = images.shape[-2:]
        with autocast(args, dev):
            feat_tgt = b2(images)
            feat_head = head(body(feat_tgt))
            pred_tgt = cls(feat_head)
            with torch.no_grad():
                conf, idx = F.softmax(pred_tgt.detach(), 1).max(1)
                state["thr"] = reference_update(banks, state["thr"], conf, idx, args.conf_p, args.conf_bank_length)
                idx[conf < torch.as_tensor(state["thr"], device=dev)[idx]] = IGNORE
            pred_tgt = upsample(pred_tgt, tgt_size).div(TEMPERATURE)
            loss_st = args.lambda_st * seg_loss(aux(feat_head), idx)
            d_out = d2(F.softmax(pred_tgt, 1))
            loss_adv_tgt = args.lambda_adv_tgt * mse(d_out, torch.full_like(d_out, 0.0))
        scaler.scale(loss_adv_tgt + loss_st).backward()

        d_losses = []
        for d, features, size, label in ((d1, feat_src, src_size, 0.0), (d1, feat_tgt, tgt_size, 1.0),
                                          (d2, pred, None, 0.0), (d2, pred_tgt, None, 1.0)):
            for p in d.parameters():
                p.requires_grad = True
            with autocast(args, dev):
                x = upsample(features.detach(), size) if size is not None else F.softmax(features.detach(), 1)
                out = d(x)
                loss = 0.5 * mse(out, torch.full_like(out, label))
            scaler.scale(loss).backward()
            d_losses.append(loss.detach())
            del x, out, loss
        for o in (opt, opt_d1, opt_d2):
            scaler.step(o)
        scaler.update()
        state["it"] += 1
        return {"loss_seg": loss_seg.item(), "loss_adv_src": loss_adv_src.item(), "loss_st": loss_st.item(),
                "loss_adv_tgt": loss_adv_tgt.item(), "loss_D1": (d_losses[0] + d_losses[1]).item(),
                "loss_D2": (d_losses[2] + d_losses[3]).item()}

    return step


def original_phase2(args, dev: torch.device, src: dict, tgt: dict):
    """One iteration of the original ``train_phase2.py`` (iter_size 1, one process): the soft
    label arrives warped to the crop at full resolution (the original's dataset does that), the
    online prediction on the whole image is warped on the device per sample."""
    from model import DecoupleNet

    net = DecoupleNet(num_classes=args.num_classes, layer=args.layer, hidden_dim=args.hidden_dim,
                      decoupled=False, aux=False).to(dev).train()
    opt = torch.optim.SGD([{"params": net.backbone_parameters()},
                           {"params": net.head_parameters(), "lr": args.learning_rate * 10}],
                          lr=args.learning_rate, momentum=args.momentum, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(dev.type, enabled=args.amp == "fp16")
    seg_loss = torch.nn.CrossEntropyLoss(ignore_index=IGNORE)
    thresholds = torch.full((args.num_classes,), 0.5, device=dev)
    w, h = args.rcrop
    lpsoft = upsample(tgt["soft_label"], tgt["img_full"].shape[-2:])[:, :, :h, :w].flip(3)  # the dataset's warp
    it = iter(range(10**9))

    def step() -> dict[str, float]:
        opt.zero_grad()
        set_lr(opt, args.learning_rate, next(it), args)
        images, labels = image(src, dev), src["label"].to(dev).long()
        with autocast(args, dev):
            pred = upsample(net(images), (h, w))
            loss_src = seg_loss(pred, labels)
        scaler.scale(args.src_loss_weight * loss_src).backward()
        del pred

        images = image(tgt, dev)
        with torch.no_grad():
            soft = F.softmax(lpsoft.to(dev), 1)
            with autocast(args, dev):
                pred_full = F.softmax(upsample(net(image(tgt, dev, "img_full")), (h, w)), 1)
                crops = []
                for b in range(pred_full.shape[0]):
                    rh, rw = (int(v) for v in tgt["resized_hw"][b])
                    ys, ye, xs, xe = (int(v) for v in tgt["crop_box"][b])
                    crop = upsample(pred_full[b:b + 1], (rh, rw))[0][:, ys:ye, xs:xe]
                    crops.append(torch.flip(crop, dims=(2,)) if bool(tgt["flip"][b]) else crop)
            pseudo = (torch.stack(crops, 0) + soft) / 2.0
        with autocast(args, dev):
            pred = upsample(net(images), (h, w))
            conf, pseudo = pseudo.max(1)
            pseudo[conf < thresholds[pseudo]] = IGNORE
            loss_seg = seg_loss(pred, pseudo)
        scaler.scale(loss_seg).backward()
        scaler.step(opt)
        scaler.update()
        return {"loss_src_seg": loss_src.item(), "loss_seg": loss_seg.item()}

    return step


# ---------------------------------------------------------------------------- one measurement
def peak_mib(dev: torch.device) -> float:
    """Peak resident memory of this process (CPU) or peak allocated CUDA memory, in MiB."""
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(phase: str, name: str, crop: tuple[int, int], a) -> dict:
    """Build step ``name`` and run ``a.iters`` iterations; the peak memory, the seconds per
    iteration after the first and the first iteration's losses."""
    dev = torch.device(a.device)
    torch.manual_seed(0)  # the same network weights for every step
    args = make_args(phase, crop, a.batch, "checkpointing" in name, dev, a.amp)
    src = fake_batch(a.batch, crop, seed=1)
    tgt = fake_batch(a.batch, crop, seed=2, phase2_target=phase == "2")
    if name == "original":
        step = (original_phase1 if phase == "1" else original_phase2)(args, dev, src, tgt)
    else:
        step = ours_step(phase, args, dev, src, tgt)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    losses = step()
    t0 = time.perf_counter()
    for _ in range(a.iters - 1):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    sec = (time.perf_counter() - t0) / (a.iters - 1) if a.iters > 1 else float("nan")
    return {"peak": peak_mib(dev), "sec": sec, "losses": losses}


def run_one(phase: str, name: str, crop: tuple[int, int], a) -> dict:
    """CPU: :func:`measure` in a fresh process (its own peak RSS). CUDA (and ``--in_process``): in
    this process, the peak statistics reset and the previous step's memory released first."""
    if a.device == "cuda" or a.in_process:
        gc.collect()
        if a.device == "cuda":
            torch.cuda.empty_cache()
        return measure(phase, name, crop, a)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps([phase, name, list(crop)]),
           "--batch", str(a.batch), "--iters", str(a.iters), "--threads", str(a.threads), "--amp", a.amp,
           "--device", a.device]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if a.mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(a.mmap_threshold)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def same_losses(a: dict, b: dict, keys: list[str], rtol: float = 1e-4) -> bool:
    return all(abs(a[k] - b[k]) <= rtol * max(abs(a[k]), abs(b[k]), 1e-12) for k in keys)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--phase", default="1,2", help="which phases: 1, 2 or 1,2")
    ap.add_argument("--small", default="192,96", help="small crop W,H; '' for none (then the peaks are compared)")
    ap.add_argument("--large", default="448,256", help="large crop W,H")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--amp", default="off", choices=["off", "fp16", "bf16"], help="fp16: CUDA only (the original's)")
    ap.add_argument("--iters", type=int, default=2, help="iterations per measurement (time: all after the first)")
    ap.add_argument("--rounds", type=int, default=1, help="measurements per (step, crop); the range is shown")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    ap.add_argument("--mmap_threshold", type=int, default=65536,
                    help="CPU: glibc serves allocations of at least this many bytes by mmap, so that freed memory "
                         "leaves the resident set at once (0: glibc's default heap, which keeps freed memory)")
    ap.add_argument("--in_process", action="store_true",
                    help="CPU smoke test: every step in this process (quick; the memory figures are then meaningless)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one measurement, JSON result
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.child is not None:
        phase, name, crop = json.loads(a.child)
        print("RESULT " + json.dumps(measure(phase, name, tuple(crop), a)))
        return
    large = tuple(int(v) for v in a.large.split(","))
    small = tuple(int(v) for v in a.small.split(",")) if a.small else None
    crops = [c for c in (small, large) if c is not None]
    what = "peak allocated CUDA memory" if a.device == "cuda" else \
        "in one process: a smoke test, not a measurement" if a.in_process else "peak RSS of a fresh process"
    if small:
        print(f"memory growth of a training iteration from a {small[0]}x{small[1]} to a {large[0]}x{large[1]} crop "
              f"({what})", end="; ")
    else:
        print(f"peak memory of a training iteration at a {large[0]}x{large[1]} crop ({what})", end="; ")
    print(f"{a.device}, amp {a.amp}, batch {a.batch}, adversarial terms on, {a.threads} thread(s), {a.rounds} round(s), "
          f"malloc mmap threshold {a.mmap_threshold or 'default'}, torch {torch.__version__}")
    for phase in a.phase.split(","):
        res: dict[tuple[str, tuple[int, int]], list[dict]] = {}
        for r in range(a.rounds):
            for name in (CANDIDATES if r % 2 == 0 else CANDIDATES[::-1]):
                for crop in crops:
                    res.setdefault((name, crop), []).append(run_one(phase, name, crop, a))
        if small:  # what the crop adds: weights, gradients, optimizer state and libraries cancel out
            growth = {n: [lg["peak"] - sm["peak"] for sm, lg in zip(res[n, small], res[n, large])] for n in CANDIDATES}
        else:
            growth = {n: [x["peak"] for x in res[n, large]] for n in CANDIDATES}
        base = float(np.mean(growth["original"]))
        keys = ["loss_seg", "loss_st", "loss_adv_src", "loss_adv_tgt", "loss_D1", "loss_D2"] if phase == "1" \
            else ["loss_src_seg"]
        rtol = 1e-4 if a.amp == "off" else 1e-2
        print(f"\nphase {phase}   (MiB; s/iter at {large[0]}x{large[1]})")
        print(f"{'step':34s} {'peak small':>10s} {'peak large':>10s} {'growth' if small else 'peak':>13s} "
              f"{'/ original':>10s} {'s/iter':>7s} {'losses = original':>18s}")
        for n in CANDIDATES:
            gs = growth[n]
            span = f"{min(gs):.0f}" if len(gs) == 1 else f"{min(gs):.0f}-{max(gs):.0f}"
            same = all(same_losses(x["losses"], y["losses"], keys, rtol)
                       for crop in crops for x, y in zip(res[n, crop], res["original", crop]))
            peak_small = f"{max(x['peak'] for x in res[n, small]):.0f}" if small else "-"
            secs = [x["sec"] for x in res[n, large]]
            print(f"{n:34s} {peak_small:>10s} {max(x['peak'] for x in res[n, large]):10.0f} {span:>13s} "
                  f"{np.mean(gs) / base:9.2f}x {np.median(secs):7.2f} {'yes' if same else 'NO':>18s}")
        print(f"phase{phase}: ours / original = {np.mean(growth['ours']) / base:.2f}x, with --activation_checkpointing "
              f"= {np.mean(growth['ours --activation_checkpointing']) / base:.2f}x", flush=True)


if __name__ == "__main__":
    main()
