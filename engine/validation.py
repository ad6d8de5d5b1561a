"""Validation: target-branch mIoU over a loader, summed over ranks, and its sample figure."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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
from model import DecoupleNet
from utils import distributed as du
from utils.metrics import intersection_and_union, mean_iou


@torch.no_grad()
def compute_miou(net: DecoupleNet, loader: DataLoader, env: du.DistEnv, args: Any, desc: str = "val",
                 scales: tuple[float, ...] = (1.0,), flip: bool = False,
                 on_batch: Callable[[dict, Tensor], None] | None = None) -> tuple[np.ndarray, float, dict]:
    """Target-branch mIoU over ``loader`` (docs/METHOD.md section 3), each image counted once.

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
        img = to_device_image(batch["img"], env.device, use_channels_last(args, env.device))
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
    du.all_reduce_sum(inter, env.device)
    du.all_reduce_sum(union, env.device)
    iou, miou = mean_iou(inter.cpu().numpy(), union.cpu().numpy())
    net.train(was_training)
    return iou, miou, sample


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


def val_loader(args: Any, env: du.DistEnv) -> DataLoader:
    """Cityscapes val, sharded without padding over ranks."""

    return shard_loader(target_val_dataset(args), per_rank(args.batch_size_val, env, "--batch_size_val"), env,
                        min(2, workers_per_rank(args, env)))
