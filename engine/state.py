"""The training state (``latest.pth``): what each rank keeps for itself, and finding the state to
resume from. The :class:`engine.trainer.Trainer` writes and restores it."""

from __future__ import annotations

import argparse
import os
import random
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from engine.common import LOG, RunError
from utils import distributed as du

LATEST = "latest.pth"


def rng_state(device: torch.device | None = None) -> dict:
    """This process's random generators. ``cuda``: the state of the rank's own GPU (``device``)
    only, ``None`` off CUDA: a state of every visible GPU would not fit a node with fewer."""
    np_state = np.random.get_state()
    own_gpu = device is not None and device.type == "cuda" and torch.cuda.is_available()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if own_gpu else None,
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "python": random.getstate(),
    }


def _restore_cuda_rng(saved: Any, device: torch.device) -> None:
    """Set the rank's own GPU's generator from ``saved``: one state (ours) or, in states written
    before, the list of every visible GPU's state, of which the entry of ``device``'s index is
    taken. Without a usable entry (saved on the CPU, or on a node with fewer GPUs) the rank keeps
    its fresh seed and says so in one line."""
    if isinstance(saved, (list, tuple)):  # torch.cuda.get_rng_state_all() of the saving rank
        index = 0 if device.index is None else device.index
        saved = saved[index] if index < len(saved) else None
    if not isinstance(saved, Tensor):
        LOG.warning("the training state holds no CUDA random state for %s; it keeps this run's seed", device)
        return
    try:
        torch.cuda.set_rng_state(saved, device)
    except RuntimeError as exc:  # a state of another generator layout
        LOG.warning("CUDA random state for %s not restored (%s); it keeps this run's seed", device,
                    (str(exc).strip().splitlines() or [type(exc).__name__])[0])


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    """Restore :func:`rng_state`; the CUDA generator only of the rank's own GPU (``device``)."""
    torch.set_rng_state(state["torch"])
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        _restore_cuda_rng(state.get("cuda"), device)
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


def local_state(modules: dict[str, nn.Module], stage_state: dict, rank: int,
                device: torch.device | None = None) -> dict:
    """What this rank keeps for itself and DDP does not synchronise, on the CPU.

    * ``rng``: the Python, NumPy and torch generators (each rank is seeded ``seed + rank``),
      on CUDA that of the rank's own GPU ``device``;
    * ``stage_state``: phase 1's class banks (each rank fills its own from its own pixels; only
      the thresholds are averaged over ranks);
    * ``buffers``: every module buffer, e.g. BatchNorm running statistics: DDP runs with
      ``broadcast_buffers=False`` and, without SyncBatchNorm (CPU/gloo, ``--freeze_bn`` off),
      each rank's statistics follow its own batches.
    """
    return {
        "rank": rank,
        "rng": rng_state(device),
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
        set_rng_state(mine["rng"], env.device)
    if saved == world:
        return ""
    fresh = f"; ranks {saved}..{world - 1} keep their own random seeds" if world > saved else ""
    return (f"holds the per-rank state of {saved} rank(s), this run has {world}: weights, optimizers, "
            f"iteration and thresholds are exact; rank r takes the class banks, BatchNorm statistics "
            f"and random state of saved rank r mod {saved}{fresh}. The run continues, but not "
            f"bit-identically to an uninterrupted one")


def plain_args(args: argparse.Namespace, world_size: int) -> dict:
    """Arguments as plain values (loadable with ``weights_only=True``), with the run's world
    size (the "args" entry of ``latest.pth`` has always held it)."""
    out = {}
    for k, v in vars(args).items():
        if isinstance(v, (tuple, list)):
            v = list(v)
        if v is None or isinstance(v, (bool, int, float, str, list)):
            out[k] = v
    out["world_size"] = world_size
    return out


def find_latest(folder: str) -> str | None:
    path = os.path.join(folder, LATEST)
    return path if os.path.isfile(path) else None


def resolve_resume_from(args: argparse.Namespace) -> str | None:
    """``--resume_from auto`` -> ``<snapshot>/latest.pth`` if present; an explicit path must exist."""
    if not args.resume_from:
        return None
    if args.resume_from == "auto":
        return find_latest(args.snapshot_dir)
    if not os.path.isfile(args.resume_from):
        raise RunError(f"--resume_from {args.resume_from}: file not found")
    return args.resume_from
