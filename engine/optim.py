"""The optimiser side of a run: SGD with the head at 10x lr, the poly schedule, and the training
and inference precisions."""

from __future__ import annotations

import argparse
import contextlib

import torch

from model import DecoupleNet


def poly_lr(base: float, it: int, max_it: int, power: float) -> float:
    """``base * (1 - it / max_it) ** power`` (docs/METHOD.md section 3)."""
    return base * ((1 - float(it) / max_it) ** power)


def set_lr(optimizer: torch.optim.Optimizer, base: float, it: int, args: argparse.Namespace) -> float:
    """Poly lr (``--num-steps``, ``--power``) on group 0 and ``10x`` on group 1 (the head group), as the original."""
    lr = poly_lr(base, it, args.num_steps, args.power)
    optimizer.param_groups[0]["lr"] = lr
    if len(optimizer.param_groups) > 1:
        optimizer.param_groups[1]["lr"] = lr * 10
    return lr


def sgd_for(net: DecoupleNet, args: argparse.Namespace, device: torch.device) -> torch.optim.SGD:
    """SGD with stems+body at ``--learning-rate`` and head+classifiers at 10x (docs/METHOD.md
    section 3), ``--momentum``, ``--weight-decay``, kernels of ``--fused_optimizers``."""
    groups = [
        {"params": [p for p in net.backbone_parameters() if p.requires_grad]},
        {"params": [p for p in net.head_parameters() if p.requires_grad], "lr": args.learning_rate * 10},
    ]
    return torch.optim.SGD(groups, lr=args.learning_rate, momentum=args.momentum,
                           weight_decay=args.weight_decay, **optimizer_kernels(args.fused_optimizers, device))


def use_fused(mode: str, device: torch.device) -> bool:
    """``--fused_optimizers`` ``mode``: ``auto`` (the default) fuses on CUDA only, ``on`` everywhere, ``off`` never."""
    return mode == "on" or (mode == "auto" and device.type == "cuda")


def optimizer_kernels(mode: str, device: torch.device) -> dict[str, bool]:
    """The implementation keyword of every optimizer of a run (SGD and phase 1's Adams).

    Fused kernels (:func:`use_fused`) apply the same update rule as PyTorch's default foreach
    kernels on CUDA, one kernel per optimizer, and take the grad scaler's inf check on the device:
    ``GradScaler.step`` then no longer reads ``found_inf`` back to the host before each optimizer
    (3 host syncs per fp16 phase-1 iteration). Otherwise foreach on CUDA, and on the CPU PyTorch's
    default (the per-parameter loop), numerically as before.
    """
    if use_fused(mode, device):
        return {"fused": True}
    return {"foreach": True} if device.type == "cuda" else {}


def grad_scaler(amp: str, device: torch.device) -> torch.amp.GradScaler:
    """The run's loss scaler: enabled with ``--amp fp16`` (the original's ``GradScaler``), a no-op otherwise."""
    return torch.amp.GradScaler(device.type, enabled=amp == "fp16")


def _autocast(mode: str, device: torch.device):
    if mode == "off":
        return contextlib.nullcontext()
    dtype = torch.float16 if mode == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def autocast(args: argparse.Namespace, device: torch.device):
    """The training steps' precision (``--amp``)."""
    return _autocast(args.amp, device)


def inference_autocast(inference_amp: str, device: torch.device):
    """The precision of validation, soft labels and evaluation (``--inference_amp``, default off:
    float32 without autocast, as the original). ``--amp`` does not reach inference."""
    return _autocast(inference_amp, device)
