"""Validation: target-branch mIoU and validation loss over a loader, summed over ranks, and its
sample figure."""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from datasets.build import shard_loader, target_val_dataset
from datasets.labels import colorize
from datasets.loader import to_device_image, to_device_label, workers_per_rank
from engine.common import per_rank, progress
from engine.network import use_channels_last
from engine.optim import inference_autocast
from model import DecoupleNet, upsample
from utils import distributed as du
from utils.metrics import intersection_and_union, mean_iou
from utils.tta import TTAOps, combine_passes


@dataclass(frozen=True)
class EvalSettings:
    """What :func:`evaluate` reads of the options: the class count, the ignore label,
    ``--inference_amp``, ``--channels_last`` (applied on CUDA only) and ``--quiet``."""

    num_classes: int
    ignore_label: int
    inference_amp: str = "off"
    channels_last: bool = False
    quiet: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> EvalSettings:
        return cls(num_classes=args.num_classes, ignore_label=args.ignore_label, inference_amp=args.inference_amp,
                   channels_last=args.channels_last, quiet=args.quiet)


@dataclass
class Evaluation:
    """What one pass of :func:`evaluate` over a loader gives.

    Attributes:
        iou: per-class IoU (intersections / (unions + 1e-10), summed over the whole set).
        miou: their mean.
        loss: the validation cross entropy, the original's ``loss_val`` (docs/METHOD.md section 3,
            "Validation and checkpoints"): per batch, the mean cross entropy of the plain pass's
            logits (scale 1.0, not flipped, upsampled to the label) over the batch's pixels whose
            label is not ignored; averaged over the images, each batch weighted by its number of
            images, over all ranks. A batch whose pixels are all ignored is left out; NaN when no
            batch counts (or 1.0 is not among the scales).
        sample: the first image, label and prediction of rank 0 (for the sample figure).
    """

    iou: np.ndarray
    miou: float
    loss: float
    sample: dict


def _torch_rescale(x: Tensor, s: float) -> Tensor:
    return F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=True)


TORCH_TTA_OPS = TTAOps(rescale=_torch_rescale, upsample=lambda y, hw: upsample(y.float(), hw),
                       mirror=lambda t: torch.flip(t, dims=(3,)), softmax=lambda t: F.softmax(t, 1))


def tta_probabilities(net: torch.nn.Module, img: Tensor, out_hw: tuple[int, int] | torch.Size, inference_amp: str,
                      device: torch.device, scales: tuple[float, ...] = (1.0,), flip: bool = False,
                      plain: Callable[[Tensor], None] | None = None) -> Tensor:
    """The class scores whose argmax is the prediction of ``img`` (docs/METHOD.md section 7):
    :func:`utils.tta.combine_passes` (the passes over ``scales`` and ``flip``, their logits
    upsampled to ``out_hw`` in float32, ``plain``) with PyTorch's operations. ``--inference_amp``
    applies to the network's forward only.
    """

    def forward(x: Tensor) -> Tensor:
        with inference_autocast(inference_amp, device):
            return net(x)

    return combine_passes(img, tuple(out_hw), forward, TORCH_TTA_OPS, scales=scales, flip=flip, plain=plain)


def add_batch_loss(sums: Tensor, logits: Tensor, label: Tensor, ignore_index: int) -> None:
    """Add one batch to the validation loss: ``sums[0] += loss x images``, ``sums[1] += images``.

    The loss is the original's ``seg_loss`` (``CrossEntropyLoss(ignore_index)``): the mean over the
    batch's pixels whose label is not ``ignore_index``; its AverageMeter weights each batch by its
    number of images. A batch without a valid pixel is left out (the original's NaN would spoil
    the mean). No host synchronisation.
    """
    ce = F.cross_entropy(logits, label, ignore_index=ignore_index, reduction="sum")
    valid = (label != ignore_index).sum()
    counted = (valid > 0).double() * label.shape[0]
    sums[0] += (ce / valid.clamp(min=1)).double() * counted
    sums[1] += counted


@torch.no_grad()
def evaluate(net: DecoupleNet, loader: DataLoader, env: du.DistEnv, settings: EvalSettings, desc: str = "val",
             scales: tuple[float, ...] = (1.0,), flip: bool = False,
             on_batch: Callable[[dict, Tensor], None] | None = None) -> Evaluation:
    """Target-branch mIoU and validation loss over ``loader`` (docs/METHOD.md section 3), each
    image counted once.

    In float32 (no autocast), as the original validates, unless ``--inference_amp`` asks for
    half precision; the training flag ``--amp`` does not apply here. The prediction is the
    argmax of :func:`tta_probabilities`.

    The loader's sampler must shard without padding (``datasets.sampler.ShardSampler``);
    intersections, unions and the loss sums are summed over ranks.
    """
    was_training = net.training
    net.eval()
    num_classes, ignore_label = settings.num_classes, settings.ignore_label
    channels_last = use_channels_last(settings.channels_last, env.device)
    inter = torch.zeros(num_classes, dtype=torch.float64, device=env.device)
    union = torch.zeros_like(inter)
    loss_sums = torch.zeros(2, dtype=torch.float64, device=env.device)  # sum of batch loss x images, images
    sample: dict = {}
    for batch in progress(loader, desc=desc, env=env, quiet=settings.quiet):
        img = to_device_image(batch["img"], env.device, channels_last)
        label = to_device_label(batch["label"], env.device)
        add_loss = functools.partial(add_batch_loss, loss_sums, label=label, ignore_index=ignore_label)
        prob = tta_probabilities(net, img, label.shape[-2:], settings.inference_amp, env.device, scales, flip,
                                 plain=add_loss)
        pred = prob.argmax(1)
        i, u, _ = intersection_and_union(pred, label, num_classes, ignore_label)
        inter += i.to(inter)
        union += u.to(union)
        if on_batch is not None:
            on_batch(batch, pred)
        if not sample:
            sample = {"img": batch["img"][0], "label": batch["label"][0], "pred": pred[0].cpu()}
    du.all_reduce_sum(inter, env.device)
    du.all_reduce_sum(union, env.device)
    du.all_reduce_sum(loss_sums, env.device)
    iou, miou = mean_iou(inter.cpu().numpy(), union.cpu().numpy())
    total, images = loss_sums.tolist()
    net.train(was_training)
    return Evaluation(iou=iou, miou=miou, loss=total / images if images else float("nan"), sample=sample)


def compute_miou(net: DecoupleNet, loader: DataLoader, env: du.DistEnv, settings: EvalSettings, desc: str = "val",
                 scales: tuple[float, ...] = (1.0,), flip: bool = False,
                 on_batch: Callable[[dict, Tensor], None] | None = None) -> tuple[np.ndarray, float, dict]:
    """:func:`evaluate` as ``(iou_per_class, miou, sample)``."""
    result = evaluate(net, loader, env, settings, desc=desc, scales=scales, flip=flip, on_batch=on_batch)
    return result.iou, result.miou, result.sample


def sample_figure(sample: dict) -> np.ndarray:
    """image | ground truth | prediction, side by side (HxWx3 uint8)."""

    img = sample["img"].permute(1, 2, 0).numpy()
    h, w = img.shape[:2]
    label = colorize(sample["label"].numpy())
    pred = colorize(sample["pred"].numpy().astype(np.uint8))
    if label.shape[:2] != (h, w):
        import cv2

        label = cv2.resize(label, (w, h), interpolation=cv2.INTER_NEAREST)
        pred = cv2.resize(pred, (w, h), interpolation=cv2.INTER_NEAREST)
    return np.concatenate([img, label, pred], axis=1)


def val_loader(args: argparse.Namespace, env: du.DistEnv) -> DataLoader:
    """Cityscapes val (``--tgt_rootpath``, ``--tgt_img_size``), ``--batch_size_val`` sharded
    without padding over ranks."""

    return shard_loader(target_val_dataset(args), per_rank(args.batch_size_val, env, "--batch_size_val"), env,
                        min(2, workers_per_rank(args.num_workers, env)))
