"""Building the network for a run: weights from ``--resume`` or ImageNet, device, SyncBatchNorm,
``--compile``, the DDP wrapper."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from engine.common import LOG
from engine.launch import require_resume_file
from model import DecoupleNet
from utils import distributed as du
from utils.checkpoint import safe_load


def build_network(args: Any, decoupled: bool, aux: bool, skip_weights: bool = False,
                  checkpoint_hook: Callable[[dict], None] | None = None,
                  after_backbone: Callable[[], object] | None = None) -> DecoupleNet:
    """A DecoupleNet with weights from ``--resume`` (any official layout) or the ImageNet file.

    ``skip_weights``: a training state (``--resume_from``) will supply every weight, so neither
    ``--resume`` nor the ImageNet file is read. A ``--resume`` file that does not exist is a
    :class:`RunError` naming the flag. With ``--resume ''`` the stems and body come from the
    ImageNet file and the ASPP head, classifier and aux classifier keep their fresh
    initialisation (the original without ``--resume``).
    ``checkpoint_hook``: called with the loaded ``--resume`` dict after the network took its
    groups (phase 1 takes ``D1``/``D2`` from it).
    ``after_backbone``: passed to :class:`DecoupleNet`, called between the ResNet(s) and the head
    (phase 1 builds its discriminators there, in the original's order of draws).
    """
    net = DecoupleNet(num_classes=args.num_classes, layer=args.layer, hidden_dim=args.hidden_dim,
                      decoupled=decoupled, aux=aux, freeze_bn=args.freeze_bn, after_backbone=after_backbone)
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
    see :meth:`engine.trainer.Trainer.accumulate_gradients`) does not reach every parameter; DDP then finds the
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
