"""The loop pieces every script shares: run set-up, data loaders, lr schedule, training loop,
validation, checkpoints, logging.

A training script supplies a :class:`Stage` (what one iteration computes, which optimizers
exist, the official checkpoint layout) and calls :func:`run_stage`; everything else lives here.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import json
import logging
import math
import os
import random
import re
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from datasets.errors import DatasetError
from model import CheckpointError, DecoupleNet
from utils import distributed as du
from utils.checkpoint import atomic_save, atomic_write, injected_fault, remove_stale_temp_files, safe_load
from utils.metrics import format_iou_table, intersection_and_union, mean_iou
from utils.options import OptionError

LOG = logging.getLogger("decouplenet")
LATEST = "latest.pth"
METRICS = "metrics.jsonl"


class NonFiniteLossError(RuntimeError):
    """A loss became NaN/inf in a precision where that is not expected (fp32 / bf16)."""


class RunError(RuntimeError):
    """A problem with the run's set-up (folders, files); the message names it."""


USER_ERRORS = (DatasetError, CheckpointError, OptionError, NonFiniteLossError, RunError, FileNotFoundError)


# ---------------------------------------------------------------------------- entry point
def _user_message(text: str) -> str | None:
    """The last ``<UserErrorType>: message`` line of ``text`` (a traceback quoted in a message).

    A user error raised in a DataLoader worker comes back re-raised with the worker's whole
    traceback as its message; one raised in an ``mp.spawn`` rank comes back inside the rank's
    traceback. In both the original message is the last such line.
    """
    names = "|".join(e.__name__ for e in USER_ERRORS)
    found = re.findall(rf"^(?:[\w.]+\.)?(?:{names}): (.+)$", text, re.MULTILINE)
    return found[-1].strip() if found else None


def resume_command(argv: list[str] | None = None) -> str:
    """The command line of this process with ``--resume_from auto`` (replacing any ``--resume_from``)."""
    import shlex

    if argv is None:
        argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--resume_from":
            skip = True
        elif not arg.startswith("--resume_from="):
            out.append(arg)
    return shlex.join([*out, "--resume_from", "auto"])


def _continue_hint() -> str:
    if du.under_torchrun():
        return "continue with the same torchrun command and --resume_from auto"
    return f"continue with: {resume_command()}"


def main_entry(worker: Callable[[int, Any], None], args: Any) -> int:
    """Launch ``worker`` (see :func:`utils.distributed.launch`) turning failures into one line.

    Returns the process exit code: 0; 2 for a user error; 1 when a rank died or lost its peers
    (the line names the rank, the signal and the command that continues the run). No traceback
    unless ``--debug``.
    Files named on the command line that every rank needs (``--resume``) are checked first, before
    anything is written.
    """
    debug = getattr(args, "debug", False)
    try:
        check_start_files(args)
        du.launch(worker, args)
    except USER_ERRORS as exc:
        if debug:
            raise
        text = str(exc)
        if "Original Traceback" in text:  # raised in a DataLoader worker
            text = _user_message(text) or text.strip().splitlines()[0]
        print(f"error: {text}", file=sys.stderr)
        return 2
    except du.RankFailure as exc:  # a spawned rank (--dist) failed
        if debug:
            for rank, tb in enumerate(exc.tracebacks):
                if tb:
                    print(f"-- rank {rank}:\n{tb}", file=sys.stderr)
            raise
        for tb in [exc.traceback, *exc.tracebacks]:  # a user error in any rank: its one line
            message = _user_message(tb) if tb else None
            if message:
                print(f"error: {message}", file=sys.stderr)
                return 2
        if exc.traceback:  # a bug in that rank: its traceback, as if it had run here
            print(f"{exc.traceback.rstrip()}\nerror: {exc}", file=sys.stderr)
            return 1
        print(f"error: {exc.describe()}; {_continue_hint()}", file=sys.stderr)
        return 1
    except du.PeerLost as exc:  # this rank (torchrun) lost the other ranks
        rank = os.environ.get("RANK", "?")
        print(f"error: rank {rank} lost contact with the other ranks, one of them probably died ({exc}); "
              f"{_continue_hint()}", file=sys.stderr)
        return 1
    return 0


def _run_guarded(fn: Callable[[du.DistEnv, Any], None], spawn_rank: int, args: Any) -> None:
    env = du.init_distributed(spawn_rank, args)
    try:
        args.world_size = env.world_size
        fn(env, args)
    except RuntimeError as exc:
        lost = du.peer_failure(exc)
        if lost is None:
            raise
        du.abandon()  # the peers are gone: do not wait for them
        if getattr(args, "debug", False):
            raise
        if spawn_rank >= 0:  # a victim of another rank's failure: the launcher names the culprit
            sys.exit(du.EXIT_PEER_LOST)
        raise lost from None
    finally:
        du.cleanup()


def training_worker(fn: Callable[[du.DistEnv, Any], None]) -> Callable[[int, Any], None]:
    """Wrap ``fn(env, args)`` as a per-process worker: init distributed, run, always tear down.

    A ``functools.partial`` of module-level functions, so ``mp.spawn`` can pickle it.
    """
    return functools.partial(_run_guarded, fn)


# ---------------------------------------------------------------------------- run set-up
TRAINING_STAGES = ("phase1", "phase2", "source_only")


def require_resume_file(args: Any) -> None:
    """A non-empty ``--resume`` (given or the script's default) must be a file: one line naming
    the flag and the path otherwise. An empty ``--resume`` is left to the caller."""
    path = getattr(args, "resume", "")
    if path and not os.path.isfile(path):
        raise RunError(f"--resume {path}: file not found (pass the checkpoint to start from with --resume PATH)")


def check_start_files(args: Any) -> None:
    """Start-up checks before any process is spawned or any file written.

    ``--resume`` is needed unless a training stage continues from a training state
    (``--resume_from``), which supplies every weight.
    """
    if getattr(args, "stage", None) in TRAINING_STAGES and getattr(args, "resume_from", "") and \
            resolve_resume_from(args) is not None:
        return
    require_resume_file(args)


def seed_everything(seed: int, rank: int = 0) -> None:
    """Per-rank seeds for ``random``, NumPy and torch (data randomness is keyed separately)."""
    s = seed + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def setup_run(args: Any, env: du.DistEnv, name: str) -> Any:
    """Create the snapshot folder, the rank-0 log file and the tensorboard writer.

    Returns the tensorboardX writer (or ``None``). Resolved arguments go to ``args.json``.
    """
    folder = args.snapshot_dir
    stale: list[str] = []
    if env.is_main:
        try:
            os.makedirs(folder, exist_ok=True)
            probe = os.path.join(folder, ".write_test")
            with open(probe, "w") as f:
                f.write("ok")
            os.unlink(probe)
        except OSError as exc:
            raise RunError(f"--snapshot-dir {folder}: not writable ({exc.strerror})") from None
        stale = remove_stale_temp_files(folder)  # left by a run killed while writing a file
    du.barrier()
    LOG.handlers.clear()
    LOG.propagate = False
    LOG.setLevel(logging.INFO if env.is_main else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%y-%m-%d %H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    LOG.addHandler(console)
    writer = None
    if env.is_main:
        fh = logging.FileHandler(os.path.join(folder, f"{name}.log"), encoding="utf-8")
        fh.setFormatter(fmt)
        LOG.addHandler(fh)
        record = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}
        atomic_write(os.path.join(folder, f"{name}_args.json"),
                     lambda f: f.write(json.dumps(record, indent=2, sort_keys=True, default=str)), mode="w")
        if getattr(args, "tensorboard", False):
            from tensorboardX import SummaryWriter

            writer = SummaryWriter(folder)
    LOG.info("%s: rank %d/%d on %s, amp=%s (training), inference_amp=%s", name, env.rank, env.world_size,
             env.device, getattr(args, "amp", "off"), getattr(args, "inference_amp", "off"))
    for path in stale:
        LOG.info("removed stale temporary file %s", path)
    return writer


def per_rank(total: int, env: du.DistEnv, flag: str) -> int:
    """Split a total batch over ranks; ``flag`` names the option in the error."""
    if total % env.world_size != 0:
        raise OptionError(f"{flag} {total} is not divisible by the world size {env.world_size}")
    return total // env.world_size


def progress(iterable=None, total: int | None = None, initial: int = 0, desc: str = "",
             env: du.DistEnv | None = None, quiet: bool = False):
    """tqdm on rank 0 unless ``--quiet``; a plain iterator otherwise."""
    from tqdm import tqdm

    disable = quiet or (env is not None and not env.is_main)
    return tqdm(iterable, total=total, initial=initial, desc=desc, disable=disable, dynamic_ncols=True,
                file=sys.stdout)


# ---------------------------------------------------------------------------- data
def make_loader(dataset, sampler, batch_size: int, num_workers: int, env: du.DistEnv,
                drop_last: bool = False) -> DataLoader:
    """A DataLoader with pinned memory on CUDA and persistent workers."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=env.device.type == "cuda",
        persistent_workers=num_workers > 0,
        drop_last=drop_last,
        prefetch_factor=2 if num_workers > 0 else None,
        worker_init_fn=du.die_with_parent if num_workers > 0 else None,
        # The loader draws its workers' base seed when an iterator starts; from a generator of its
        # own, so starting the streams after a resume leaves the global RNG as an uninterrupted run
        # has it (samples are seeded by their keys, not by this seed).
        generator=torch.Generator(),
    )


def to_device_image(img: Tensor, device: torch.device, channels_last: bool = False) -> Tensor:
    """uint8 ``[N,3,H,W]`` -> float ``/255`` on ``device`` (SPEC section 1: no mean/std)."""
    x = img.to(device, non_blocking=True).float().div_(255.0)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def to_device_label(label: Tensor, device: torch.device) -> Tensor:
    return label.to(device, non_blocking=True).long()


def workers_per_rank(args: Any, env: du.DistEnv) -> int:
    return max(0, args.num_workers // env.world_size)


# ---------------------------------------------------------------------------- lr schedule
def poly_lr(base: float, it: int, max_it: int, power: float) -> float:
    """``base * (1 - it / max_it) ** power`` (SPEC section 3)."""
    return base * ((1 - float(it) / max_it) ** power)


def set_lr(optimizer: torch.optim.Optimizer, base: float, it: int, args: Any) -> float:
    """Poly lr on group 0 and ``10x`` on group 1 (the head group), as the original."""
    lr = poly_lr(base, it, args.num_steps, args.power)
    optimizer.param_groups[0]["lr"] = lr
    if len(optimizer.param_groups) > 1:
        optimizer.param_groups[1]["lr"] = lr * 10
    return lr


def sgd_for(net: DecoupleNet, args: Any, device: torch.device) -> torch.optim.SGD:
    """SGD with stems+body at ``lr`` and head+classifiers at ``10 lr`` (SPEC section 3)."""
    groups = [
        {"params": [p for p in net.backbone_parameters() if p.requires_grad]},
        {"params": [p for p in net.head_parameters() if p.requires_grad], "lr": args.learning_rate * 10},
    ]
    kw = {"foreach": True} if device.type == "cuda" else {}
    return torch.optim.SGD(groups, lr=args.learning_rate, momentum=args.momentum,
                           weight_decay=args.weight_decay, **kw)


def _autocast(mode: str, device: torch.device):
    if mode == "off":
        return contextlib.nullcontext()
    dtype = torch.float16 if mode == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def autocast(args: Any, device: torch.device):
    """The training steps' precision (``--amp``)."""
    return _autocast(args.amp, device)


def inference_autocast(args: Any, device: torch.device):
    """The precision of validation, soft labels and evaluation (``--inference_amp``, default off:
    float32 without autocast, as the original). ``--amp`` does not reach inference."""
    return _autocast(getattr(args, "inference_amp", "off"), device)


def cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = 250) -> Tensor:
    """Mean cross entropy over non-ignored pixels; 0 (with a graph) when every pixel is ignored.

    Same value as ``nn.CrossEntropyLoss(ignore_index=...)`` whenever one pixel is valid, without
    the NaN the original gets on an all-ignored batch, and without a host synchronisation.
    """
    total = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum")
    valid = (target != ignore_index).sum()
    return total / valid.clamp(min=1)


# ---------------------------------------------------------------------------- network building
def build_network(args: Any, decoupled: bool, aux: bool, skip_weights: bool = False,
                  checkpoint_hook: Callable[[dict], None] | None = None) -> DecoupleNet:
    """A DecoupleNet with weights from ``--resume`` (any official layout) or the ImageNet file.

    ``skip_weights``: a training state (``--resume_from``) will supply every weight, so neither
    ``--resume`` nor the ImageNet file is read. A ``--resume`` file that does not exist is a
    :class:`RunError` naming the flag. With ``--resume ''`` the stems and body come from the
    ImageNet file and the ASPP head, classifier and aux classifier keep their fresh
    initialisation (the original without ``--resume``).
    ``checkpoint_hook``: called with the loaded ``--resume`` dict after the network took its
    groups (phase 1 takes ``D1``/``D2`` from it).
    """
    net = DecoupleNet(num_classes=args.num_classes, layer=args.layer, hidden_dim=args.hidden_dim,
                      decoupled=decoupled, aux=aux, freeze_bn=args.freeze_bn)
    if skip_weights:
        LOG.info("weights come from the training state (--resume_from)")
    elif args.resume:
        require_resume_file(args)
        ckpt = safe_load(args.resume)
        layout = net.load_official(ckpt, origin=args.resume)
        LOG.info("weights from %s (%s layout)", args.resume, layout)
        if checkpoint_hook is not None:
            checkpoint_hook(ckpt)
    else:
        net.load_imagenet(args.imagenet)
        LOG.info("--resume is empty: backbone from ImageNet weights %s; ASPP head and classifier(s) "
                 "freshly initialised", args.imagenet)
    return net


def compile_network(net: DecoupleNet, backend: str = "inductor") -> list[str]:
    """``nn.Module.compile`` (in place) on the network's convolutional parts: stems, body, head.

    In place, so parameter names and checkpoints are unchanged (``torch.compile(module)``
    would add an ``_orig_mod.`` prefix). The loss, the online thresholds and the pseudo
    labels stay eager: they are data-dependent and cheap. Returns the compiled part names.
    """
    names = [n for n in ("source_stem", "target_stem", "body", "head") if getattr(net, n, None) is not None]
    for name in names:
        getattr(net, name).compile(backend=backend)
    return names


def prepare_for_training(module: nn.Module, env: du.DistEnv, args: Any,
                         find_unused_parameters: bool = False) -> nn.Module:
    """Move to the device, SyncBatchNorm + one DDP wrapper under CUDA DDP, channels_last,
    ``--compile``, ``--activation_checkpointing``; on CUDA also cuDNN autotuning (training crops
    have one fixed size).

    ``find_unused_parameters``: the iteration's last pass (the one whose backward DDP all-reduces,
    see :meth:`Trainer.accumulate_gradients`) does not reach every parameter; DDP then finds the
    others in that pass's graph and all-reduces the gradients they accumulated in the earlier
    passes.
    """
    module = module.to(env.device)
    if env.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.channels_last and env.device.type == "cuda":
        module = module.to(memory_format=torch.channels_last)
    if env.world_size > 1 and env.device.type == "cuda" and not args.freeze_bn:
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    nets = [m for m in module.modules() if isinstance(m, DecoupleNet)]
    if getattr(args, "activation_checkpointing", False):
        for net in nets:
            LOG.info("activation checkpointing: %s", ", ".join(net.set_activation_checkpointing(True)))
    if getattr(args, "compile", False):
        for net in nets:
            LOG.info("torch.compile: %s", ", ".join(compile_network(net)))
    if env.world_size > 1:
        ids = [env.device.index] if env.device.type == "cuda" else None
        with warnings.catch_warnings():  # its replacement would sync buffers at init; we keep them per rank
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
            module = nn.parallel.DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False,
                                                         find_unused_parameters=find_unused_parameters)
    return module


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


# ---------------------------------------------------------------------------- validation
@torch.no_grad()
def evaluate(net: DecoupleNet, loader: DataLoader, env: du.DistEnv, args: Any, desc: str = "val",
             scales: tuple[float, ...] = (1.0,), flip: bool = False,
             on_batch: Callable[[dict, Tensor], None] | None = None) -> tuple[np.ndarray, float, dict]:
    """Target-branch mIoU over ``loader`` (SPEC section 3), each image counted once.

    In float32 (no autocast), as the original validates, unless ``--inference_amp`` asks for
    half precision; the training flag ``--amp`` does not apply here.

    The loader's sampler must shard without padding (``datasets.sampler.ShardSampler``);
    intersections and unions are summed over ranks. Returns ``(iou_per_class, miou, sample)``
    where ``sample`` holds the first image, label and prediction of rank 0 for visualisation.
    """
    was_training = net.training
    net.eval()
    inter = torch.zeros(args.num_classes, dtype=torch.float64, device=env.device)
    union = torch.zeros_like(inter)
    sample: dict = {}
    for batch in progress(loader, desc=desc, env=env, quiet=args.quiet):
        img = to_device_image(batch["img"], env.device, args.channels_last and env.device.type == "cuda")
        label = to_device_label(batch["label"], env.device)
        prob = None
        for s in scales:
            x = img if s == 1.0 else F.interpolate(img, scale_factor=s, mode="bilinear", align_corners=True)
            for flipped in (False, True) if flip else (False,):
                xi = torch.flip(x, dims=(3,)) if flipped else x
                with inference_autocast(args, env.device):
                    logits = net(xi)
                logits = F.interpolate(logits.float(), size=label.shape[-2:], mode="bilinear",
                                       align_corners=True)
                if flipped:
                    logits = torch.flip(logits, dims=(3,))
                p = F.softmax(logits, 1) if len(scales) > 1 or flip else logits
                prob = p if prob is None else prob + p
        pred = prob.argmax(1)
        i, u, _ = intersection_and_union(pred, label, args.num_classes, args.ignore_label)
        inter += i.to(inter)
        union += u.to(union)
        if on_batch is not None:
            on_batch(batch, pred)
        if not sample:
            sample = {"img": batch["img"][0], "label": batch["label"][0], "pred": pred[0].cpu()}
    du.all_reduce_sum(inter)
    du.all_reduce_sum(union)
    iou, miou = mean_iou(inter.cpu().numpy(), union.cpu().numpy())
    net.train(was_training)
    return iou, miou, sample


def sample_figure(sample: dict) -> np.ndarray:
    """image | ground truth | prediction, side by side (HxWx3 uint8)."""
    from datasets.labels import colorize

    img = sample["img"].permute(1, 2, 0).numpy()
    h, w = img.shape[:2]
    label = colorize(sample["label"].numpy())
    pred = colorize(sample["pred"].numpy().astype(np.uint8))
    if label.shape[:2] != (h, w):
        import cv2

        label = cv2.resize(label, (w, h), interpolation=cv2.INTER_NEAREST)
        pred = cv2.resize(pred, (w, h), interpolation=cv2.INTER_NEAREST)
    return np.concatenate([img, label, pred], axis=1)


# ---------------------------------------------------------------------------- checkpoints
def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state.get("cuda"):
        with contextlib.suppress(RuntimeError):
            torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


STATE_FORMAT = "decouplenet-training-state/2"  # /2: per-rank parts in "ranks"
STATE_FORMAT_V1 = "decouplenet-training-state/1"  # rank 0's parts only; still loadable


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def local_state(modules: dict[str, nn.Module], stage_state: dict, rank: int) -> dict:
    """What this rank keeps for itself and DDP does not synchronise, on the CPU.

    * ``rng``: the Python, NumPy and torch generators (each rank is seeded ``seed + rank``);
    * ``stage_state``: phase 1's class banks (each rank fills its own from its own pixels; only
      the thresholds are averaged over ranks);
    * ``buffers``: every module buffer, e.g. BatchNorm running statistics: DDP runs with
      ``broadcast_buffers=False`` and, without SyncBatchNorm (CPU/gloo, ``--freeze_bn`` off),
      each rank's statistics follow its own batches.
    """
    return {
        "rank": rank,
        "rng": rng_state(),
        "stage_state": _to_cpu(stage_state),
        "buffers": {name: {k: b.detach().cpu() for k, b in m.named_buffers()} for name, m in modules.items()},
    }


def load_buffers(modules: dict[str, nn.Module], saved: dict) -> None:
    """Copy the ``buffers`` part of :func:`local_state` into ``modules`` (names and shapes must match)."""
    for name, module in modules.items():
        own = dict(module.named_buffers())
        values = saved[name]
        missing = sorted(set(own) ^ set(values))
        if missing:
            raise KeyError(f"buffers of {name} differ: {', '.join(missing[:3])}")
        with torch.no_grad():
            for k, value in values.items():
                if own[k].shape != value.shape:
                    raise ValueError(f"buffer {name}/{k}: shape {tuple(value.shape)}, expected {tuple(own[k].shape)}")
                own[k].copy_(value)


def restore_local_state(state: dict, stage: Any, modules: dict[str, nn.Module], env: du.DistEnv) -> str:
    """Give this rank its own part of a training state (see :func:`local_state`).

    With the world size of the run that saved ``state``, rank ``r`` gets saved rank ``r``'s
    part: the run continues bit-identically. With another world size rank ``r`` takes the class
    banks and buffers of saved rank ``r mod saved`` and ranks beyond the saved ones keep their
    fresh seeds; the returned sentence says so (empty when exact).
    """
    ranks = state.get("ranks") or [{"rng": state["rng"], "stage_state": state["stage_state"]}]
    saved, world, rank = len(ranks), env.world_size, env.rank
    mine = ranks[rank % saved]
    stage.load_extra_state(mine["stage_state"])
    if "buffers" in mine:
        load_buffers(modules, mine["buffers"])
    if rank < saved:
        set_rng_state(mine["rng"])
    if saved == world:
        return ""
    fresh = f"; ranks {saved}..{world - 1} keep their own random seeds" if world > saved else ""
    return (f"holds the per-rank state of {saved} rank(s), this run has {world}: weights, optimizers, "
            f"iteration and thresholds are exact; rank r takes the class banks, BatchNorm statistics "
            f"and random state of saved rank r mod {saved}{fresh}. The run continues, but not "
            f"bit-identically to an uninterrupted one")


def plain_args(args: Any) -> dict:
    """Arguments as plain values (loadable with ``weights_only=True``)."""
    out = {}
    for k, v in vars(args).items():
        if isinstance(v, (tuple, list)):
            v = list(v)
        if v is None or isinstance(v, (bool, int, float, str, list)):
            out[k] = v
    return out


def find_latest(folder: str) -> str | None:
    path = os.path.join(folder, LATEST)
    return path if os.path.isfile(path) else None


def resolve_resume_from(args: Any) -> str | None:
    """``--resume_from auto`` -> ``<snapshot>/latest.pth`` if present; an explicit path must exist."""
    if not args.resume_from:
        return None
    if args.resume_from == "auto":
        return find_latest(args.snapshot_dir)
    if not os.path.isfile(args.resume_from):
        raise RunError(f"--resume_from {args.resume_from}: file not found")
    return args.resume_from


# ---------------------------------------------------------------------------- the stage protocol
class Stage:
    """What differs between training scripts. Subclasses set the attributes in :meth:`build`.

    Attributes:
        net: the :class:`DecoupleNet` (unwrapped).
        model: the module run each iteration (DDP-wrapped when distributed).
        optimizers: name -> (optimizer, base lr); the first is the SGD of the network.
        official_phase: 1 or 2, the checkpoint layout written for best/final checkpoints.
        source_loader / target_loader: infinite iterators of batches.
    """

    name = "stage"
    official_phase = 1
    checkpoint_prefix = "GTA5"
    pseudo_monitor: Any = None  # utils.pseudo_quality.PseudoLabelMonitor when target ground truth exists

    def __init__(self, args: Any, env: du.DistEnv) -> None:
        self.args = args
        self.env = env
        self.net: DecoupleNet
        self.model: nn.Module
        self.optimizers: dict[str, tuple[torch.optim.Optimizer, float]] = {}
        self.extra_modules: dict[str, nn.Module] = {}
        self.resuming = False  # set by run_stage when a training state will be restored
        self.batch = per_rank(args.batch_size, env, "--batch-size")  # this rank's share of the batch

    def build(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def batches(self, start_iter: int) -> Iterator[tuple]:  # pragma: no cover - abstract
        raise NotImplementedError

    def step(self, it: int, batch: tuple) -> list[Callable[[], dict[str, Tensor]]]:  # pragma: no cover
        """The passes of one micro-batch, in order. Each pass runs a forward and returns its losses;
        the trainer back-propagates a pass's ``total`` before it calls the next pass, so only one
        pass's activations are alive at a time. Passes hand on what later ones need (detached)."""
        raise NotImplementedError

    def official_state(self) -> dict:
        """What best/final checkpoints hold (the official layout of ``official_phase``)."""
        return self.net.official_state(phase=self.official_phase)

    def tensorboard_extra(self, writer: Any, it: int) -> None:
        """Per-stage scalars (thresholds, pseudo-label coverage)."""

    def extra_state(self) -> dict:
        return {}

    def image(self, batch: dict, key: str = "img") -> Tensor:
        """A uint8 image batch on the training device as ``float / 255`` (channels_last on CUDA)."""
        dev = self.env.device
        return to_device_image(batch[key], dev, self.args.channels_last and dev.type == "cuda")

    def domain_batches(self, start_iter: int, *datasets) -> Iterator[tuple]:
        """Endless tuples with one batch of each dataset, from iteration ``start_iter`` on.

        The data workers of this rank are split between the datasets; every sample is a
        function of its key, so the batches do not depend on the number of workers.
        """
        from datasets.build import stream

        args, env = self.args, self.env
        workers = max(0, workers_per_rank(args, env) // len(datasets))
        streams = [stream(d, self.batch, env, args, start_iter * args.iter_size, workers) for d in datasets]
        while True:
            yield tuple(next(s) for s in streams)

    def load_extra_state(self, state: dict) -> None:
        pass


class Trainer:
    """The iteration loop shared by source-only, phase 1 and phase 2 training."""

    def __init__(self, stage: Stage, writer: Any, val_loader: DataLoader | None) -> None:
        self.stage = stage
        self.args = stage.args
        self.env = stage.env
        self.writer = writer
        self.val_loader = val_loader
        self.scaler = torch.amp.GradScaler(self.env.device.type, enabled=self.args.amp == "fp16")
        self.start_iter = 0
        self.best_miou = 0.0
        self.best_path: str | None = None
        self.nan_at: int | None = None  # tests only: the iteration whose losses become NaN

    # ------------------------------------------------------------------ state
    def stage_modules(self) -> dict[str, nn.Module]:
        """The network and the stage's extra modules, by their names in the training state."""
        return {"model": self.stage.net, **self.stage.extra_modules}

    def training_state(self, next_iter: int) -> dict | None:
        """The full training state on rank 0 (``None`` on the other ranks); a collective.

        Everything DDP keeps equal over ranks (weights, optimizers, scaler, the averaged
        thresholds) is taken from rank 0; what each rank keeps for itself (:func:`local_state`)
        is gathered from every rank into ``ranks``. ``stage_state`` and ``rng`` repeat rank 0's.
        """
        ranks = du.gather_to_main(local_state(self.stage_modules(), self.stage.extra_state(), self.env.rank))
        if ranks is None:
            return None
        s = self.stage
        return {
            "format": STATE_FORMAT,
            "stage": s.name,
            "iteration": next_iter,
            "model": {k: v for k, v in s.net.state_dict().items()},
            "extra_modules": {k: m.state_dict() for k, m in s.extra_modules.items()},
            "optimizers": {k: opt.state_dict() for k, (opt, _) in s.optimizers.items()},
            "scaler": self.scaler.state_dict(),
            "best_miou": self.best_miou,
            "best_path": self.best_path or "",
            "stage_state": ranks[0]["stage_state"],
            "rng": ranks[0]["rng"],
            "world_size": len(ranks),
            "ranks": ranks,
            "args": plain_args(self.args),
        }

    def restore(self, path: str) -> None:
        state = safe_load(path)
        if not isinstance(state, dict) or state.get("format") not in (STATE_FORMAT, STATE_FORMAT_V1):
            raise CheckpointError(f"{path}: not a training state written by this project (latest.pth)")
        s = self.stage
        if state["stage"] != s.name:
            raise CheckpointError(f"{path}: training state of stage {state['stage']!r}, not {s.name!r}")
        try:
            s.net.load_state_dict(state["model"])
            for k, m in s.extra_modules.items():
                m.load_state_dict(state["extra_modules"][k])
            for k, (opt, _) in s.optimizers.items():
                opt.load_state_dict(state["optimizers"][k])
            approximated = restore_local_state(state, s, self.stage_modules(), self.env)
        except (RuntimeError, KeyError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0]
            raise CheckpointError(f"{path}: does not fit this network/options ({first})") from None
        self.scaler.load_state_dict(state["scaler"])
        self.start_iter = int(state["iteration"])
        self.best_miou = float(state["best_miou"])
        self.best_path = state["best_path"] or None
        if approximated and self.env.is_main:
            LOG.warning("%s: %s", path, approximated)
        LOG.info("resumed from %s at iteration %d (best mIoU so far %.4f)", path, self.start_iter,
                 self.best_miou)

    @staticmethod
    def save_file(obj: Any, path: str) -> None:
        """``atomic_save``; a failed write (disk full, permissions) is a one-line error naming the file."""
        try:
            atomic_save(obj, path)
        except OSError as exc:
            raise RunError(f"{path}: cannot write checkpoint ({exc.strerror or exc})") from None

    def save_latest(self, next_iter: int) -> None:
        """Every rank's state of ``next_iter`` in one ``latest.pth``, written by rank 0 (all ranks call).

        One file renamed into place at once: a kill at any moment leaves either the complete
        state of this iteration (every rank's part) or the previous complete one.
        """
        state = self.training_state(next_iter)
        if state is not None:
            self.save_file(state, os.path.join(self.args.snapshot_dir, LATEST))

    def save_official(self, filename: str) -> str:
        path = os.path.join(self.args.snapshot_dir, filename)
        self.save_file(self.stage.official_state(), path)
        LOG.info("saved %s", path)
        return path

    # ------------------------------------------------------------------ validation
    def validate(self, it: int) -> float:
        iou, miou, sample = evaluate(self.stage.net, self.val_loader, self.env, self.args)
        if self.env.is_main:
            from datasets.labels import class_names

            LOG.info("iter %d validation:\n%s", it, format_iou_table(iou, class_names(self.args.num_classes), miou))
            fig = sample_figure(sample) if sample else None
            if fig is not None:
                import cv2

                cv2.imwrite(os.path.join(self.args.snapshot_dir, "val_sample.png"), fig[:, :, ::-1])
            if self.writer is not None:
                self.writer.add_scalar("val/miou", miou, it)
                for name, v in zip(class_names(self.args.num_classes), iou):
                    self.writer.add_scalar(f"val_iou/{name}", float(v), it)
                if fig is not None:
                    self.writer.add_image("val/sample", fig, it, dataformats="HWC")
        return miou

    def maybe_save_best(self, it: int, miou: float) -> None:
        """Write the new best checkpoint first, then remove the previous one (never zero copies)."""
        if not self.env.is_main or miou <= self.best_miou:
            return
        old = self.best_path
        self.best_miou = miou
        self.best_path = self.save_official(f"{self.stage.checkpoint_prefix}_{it}_{miou}.pth")
        if old and old != self.best_path and os.path.exists(old):
            os.remove(old)

    # ------------------------------------------------------------------ the loop
    def append_metrics(self, it: int, logged: dict[str, float]) -> None:
        """One JSON line per iteration in ``<snapshot>/metrics.jsonl``: the losses at full precision
        (the log rounds them). Appended, so a resumed run continues the same file."""
        path = os.path.join(self.args.snapshot_dir, METRICS)
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"iter": it, **logged}) + "\n")
        except OSError as exc:
            raise RunError(f"{path}: cannot append ({exc.strerror or exc})") from None

    def check_finite(self, values: Tensor, names: list[str], it: int) -> None:
        if self.args.amp == "fp16":  # the grad scaler skips such steps, as in the original
            return
        if not torch.isfinite(values).all():
            bad = [n for n, v in zip(names, values.tolist()) if not math.isfinite(v)]
            raise NonFiniteLossError(
                f"non-finite loss at iteration {it} ({', '.join(bad)}); stopping. The last good "
                f"training state is {os.path.join(self.args.snapshot_dir, LATEST)}"
            )

    def gradient_sync(self, sync: bool):
        """Context of one forward + backward: DDP all-reduces the gradients only when ``sync``;
        otherwise they accumulate locally (``no_sync``)."""
        model = self.stage.model
        if sync or not isinstance(model, nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return model.no_sync()

    def accumulate_gradients(self, it: int, batches: Iterator[tuple]) -> dict[str, Tensor]:
        """Forward and backward of one iteration's ``--iter-size`` micro-batches.

        Every micro-batch runs the stage's passes in order (:meth:`Stage.step`; phase 1: source,
        target, discriminators), each back-propagated before the next starts, as the original
        does: the gradients are the same sums as one backward of all losses, and only one pass's
        activations are alive at a time. Under DDP only the iteration's last backward all-reduces
        the gradients. Returns the losses of this rank, averaged over the micro-batches.
        """
        args = self.args
        sums: dict[str, Tensor] = {}
        for sub in range(args.iter_size):
            passes = self.stage.step(it, next(batches))
            for k, run_pass in enumerate(passes):
                with self.gradient_sync(sub == args.iter_size - 1 and k == len(passes) - 1):
                    losses = run_pass()
                    if it == self.nan_at:
                        losses["total"] = losses["total"] * float("nan")
                    self.scaler.scale(losses["total"] / args.iter_size).backward()
                for name, v in losses.items():
                    sums[name] = sums.get(name, 0) + v.detach().float() / args.iter_size
        return sums

    def train_step(self, it: int, batches: Iterator[tuple]) -> dict[str, float]:
        """One iteration: learning rates, gradients (:meth:`accumulate_gradients`), the NaN check,
        the optimizer steps. Returns the losses averaged over micro-batches and ranks."""
        args, stage = self.args, self.stage
        for opt, base in stage.optimizers.values():
            opt.zero_grad(set_to_none=True)
            set_lr(opt, base, it, args)
        sums = self.accumulate_gradients(it, batches)
        names = sorted(sums)
        values = torch.stack([sums[k] for k in names])
        du.all_reduce_sum(values)
        values = (values / self.env.world_size).cpu()
        self.check_finite(values, names, it)
        for opt, _ in stage.optimizers.values():
            self.scaler.step(opt)
        self.scaler.update()
        return dict(zip(names, values.tolist()))

    def train(self) -> None:
        args, env, stage = self.args, self.env, self.stage
        stop = args.num_steps_stop
        batches = stage.batches(self.start_iter)
        monitor = stage.pseudo_monitor  # set by batches()/build() when the target ground truth exists
        bar = progress(total=stop, initial=self.start_iter, desc=stage.name, env=env, quiet=args.quiet)
        t0 = time.time()
        fault = injected_fault()  # tests only ($DECOUPLENET_FAULT, see utils.checkpoint)
        kill_at = int(fault[1]) if fault and fault[0] == "kill_at_iter" else None
        self.nan_at = int(fault[1]) if fault and fault[0] == "nan_at_iter" else None
        for it in range(self.start_iter, stop):
            if it == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            logged = self.train_step(it, batches)
            quality = monitor.collect() if monitor is not None else {}  # pseudo_acc (ground truth: monitoring only)
            bar.update(1)
            if env.is_main:
                mem = peak_memory_mib(env.device)  # CUDA only: the key is left out on the CPU
                self.append_metrics(it, {**logged, **quality, **({} if mem is None else {"max_mem_mib": mem})})
                if self.writer is not None and it % 10 == 0:
                    for k, v in logged.items():
                        self.writer.add_scalar(f"train/{k}", v, it)
                    for k, (opt, _) in stage.optimizers.items():
                        self.writer.add_scalar(f"lr/{k}", opt.param_groups[0]["lr"], it)
                    stage.tensorboard_extra(self.writer, it)
                    if monitor is not None:
                        monitor.tensorboard(self.writer, it)
                if it % args.print_every == 0:
                    text = ", ".join(f"{k} = {v:.5f}" for k, v in logged.items() if k != "total")
                    if monitor is not None:
                        text += ", " + monitor.console_text()
                    bar.set_postfix_str(text[:80])
                    LOG.info("iter = %8d/%8d, %s (%.2fs/it%s)", it, args.num_steps, text,
                             (time.time() - t0) / max(1, it - self.start_iter + 1), peak_memory_text(env.device))
            if it >= stop - 1:
                if env.is_main:
                    self.save_official(f"{stage.checkpoint_prefix}_{stop}.pth")
                self.save_latest(it + 1)
                break
            if it % args.save_pred_every == 0 and it != 0 and self.val_loader is not None:
                miou = self.validate(it)
                self.maybe_save_best(it, miou)
            if (it + 1) % args.save_latest_every == 0:
                self.save_latest(it + 1)
        bar.close()
        du.barrier()
        if self.writer is not None:
            self.writer.close()


def peak_memory_mib(device: torch.device) -> float | None:
    """Peak GPU memory of this process so far (``torch.cuda.max_memory_allocated``) in MiB on
    CUDA; ``None`` elsewhere (the CPU has no such counter)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def peak_memory_text(device: torch.device) -> str:
    """``", peak GPU memory N MiB"`` (:func:`peak_memory_mib`) on CUDA, ``""`` elsewhere."""
    mib = peak_memory_mib(device)
    return "" if mib is None else f", peak GPU memory {mib:.0f} MiB"


def val_loader(args: Any, env: du.DistEnv) -> DataLoader:
    """Cityscapes val, sharded without padding over ranks."""
    from datasets.build import shard_loader, target_val_dataset

    return shard_loader(target_val_dataset(args), per_rank(args.batch_size_val, env, "--batch_size_val"), env,
                        min(2, workers_per_rank(args, env)))


def run_stage(stage: Stage, writer: Any, with_validation: bool = True) -> Trainer:
    """Build the stage, restore ``--resume_from`` if given, and train."""
    path = resolve_resume_from(stage.args)
    stage.resuming = path is not None
    stage.build()
    trainer = Trainer(stage, writer, val_loader(stage.args, stage.env) if with_validation else None)
    if path:
        trainer.restore(path)
    elif stage.args.resume_from == "auto":
        LOG.info("--resume_from auto: no %s in %s, starting fresh", LATEST, stage.args.snapshot_dir)
    if trainer.start_iter >= stage.args.num_steps_stop:
        LOG.info("nothing to do: the training state is already at iteration %d", trainer.start_iter)
        return trainer
    trainer.train()
    return trainer


def glob_sorted(pattern: str) -> list[str]:
    return sorted(glob.glob(pattern))
