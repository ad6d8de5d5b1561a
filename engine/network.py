"""Building the network for a run: weights from ``--resume`` or ImageNet, device, SyncBatchNorm,
``--compile``, the DDP wrapper; it applies the CUDA backend switches of :mod:`engine.backends`."""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable

import torch
from torch import nn

from engine.backends import configure_backends
from engine.common import LOG
from engine.launch import require_resume_file
from model import DecoupleNet
from utils import distributed as du
from utils.checkpoint import safe_load


def build_network(args: argparse.Namespace, decoupled: bool, aux: bool, skip_weights: bool = False,
                  checkpoint_hook: Callable[[dict], None] | None = None,
                  after_backbone: Callable[[], object] | None = None) -> DecoupleNet:
    """A DecoupleNet (``--num-classes``, ``--layer``, ``--hidden_dim``, ``--freeze_bn``) with
    weights from ``--resume`` (any official layout) or the ImageNet file (``--imagenet``).

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
        require_resume_file(args.resume)
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


# The torch.compile backend of --compile. Not a flag: benchmarks and tests may set it for the
# process (e.g. "eager", dynamo's capture without code generation, quick on the CPU).
COMPILE_BACKEND = "inductor"


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


def use_channels_last(requested: bool, device: torch.device) -> bool:
    """Whether ``--channels_last`` (``requested``) applies on ``device``: CUDA only (network and input images)."""
    return bool(requested) and device.type == "cuda"


def prepare_for_training(module: nn.Module, env: du.DistEnv, args: argparse.Namespace,
                         find_unused_parameters: bool = False) -> nn.Module:
    """Move to the device; on CUDA the backend switches (:func:`configure_backends`: cuDNN
    autotuning only with ``--cudnn_benchmark``, as the original leaves it off), channels_last and,
    with a process group, SyncBatchNorm; ``--activation_checkpointing``, ``--compile``; one DDP
    wrapper whenever a process group exists (also for a single rank under ``torchrun`` or
    ``--dist``, so those runs take the DDP and collective paths of a multi-rank run).

    ``find_unused_parameters``: the iteration's last pass (the one whose backward DDP all-reduces,
    see :meth:`engine.trainer.Trainer.accumulate_gradients`) does not reach every parameter; DDP then finds the
    others in that pass's graph and all-reduces the gradients they accumulated in the earlier
    passes.
    """
    module = module.to(env.device)
    described = configure_backends(args.tf32, args.cudnn_benchmark, env.device)
    if described:
        LOG.info("CUDA backends: %s", described)
    if use_channels_last(args.channels_last, env.device):
        module = module.to(memory_format=torch.channels_last)
    # One rank's SyncBatchNorm falls back to plain batch norm: the same numbers, the original's module.
    if env.group and env.device.type == "cuda" and not args.freeze_bn:
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    nets = [m for m in module.modules() if isinstance(m, DecoupleNet)]
    if args.activation_checkpointing:
        for net in nets:
            LOG.info("activation checkpointing: %s", ", ".join(net.set_activation_checkpointing(True)))
    if args.compile:
        for net in nets:
            LOG.info("torch.compile: %s", ", ".join(compile_network(net, COMPILE_BACKEND)))
    if env.group:
        ids = [env.device.index] if env.device.type == "cuda" else None
        with warnings.catch_warnings():  # its replacement would sync buffers at init; we keep them per rank
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
            module = nn.parallel.DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False,
                                                         find_unused_parameters=find_unused_parameters)
        LOG.info("DDP wrapper over %d rank(s), %s backend", env.world_size, torch.distributed.get_backend())
    return module


def prepare_for_inference(net: DecoupleNet, env: du.DistEnv, args: argparse.Namespace) -> DecoupleNet:
    """The network of ``evaluate.py`` and ``generate_soft_label.py``: on the device in eval mode,
    the CUDA backend switches (:func:`configure_backends`), channels_last weights with
    ``--channels_last`` on CUDA (the input images follow, :func:`use_channels_last`, so no
    convolution converts layouts) and ``--compile`` (:func:`compile_network`, in place)."""
    net = net.to(env.device).eval()
    described = configure_backends(args.tf32, args.cudnn_benchmark, env.device)
    if described:
        LOG.info("CUDA backends: %s", described)
    if use_channels_last(args.channels_last, env.device):
        net = net.to(memory_format=torch.channels_last)
    if args.compile:
        LOG.info("torch.compile (inference; the first batches include the compilation): %s",
                 ", ".join(compile_network(net, COMPILE_BACKEND)))
    return net


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module
