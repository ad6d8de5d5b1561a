"""Segmentation metrics: per-class intersection / union and mIoU (docs/METHOD.md section 3).

The validation of the original accumulates, per class, the intersection and the union of
prediction and label over the whole set, then ``IoU = inter / (union + 1e-10)`` and
``mIoU = mean over all classes``. For SYNTHIA (docs/METHOD.md section 1) papers report the
16-class mIoU and the 13-class mIoU* (the same 16-class model without wall, fence and
pole); :func:`miou_subsets` gives both.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

# Train ids (in the 16-class SYNTHIA order) left out of the 13-class mIoU*: wall, fence, pole.
_SYNTHIA16_NOT_IN_13 = (3, 4, 5)
# Positions of the 16 SYNTHIA classes inside the 19 Cityscapes classes (no terrain, truck, train).
_CITYSCAPES19_TO_16 = (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)


def _count(values: Tensor, size: int) -> Tensor:
    """Histogram of int64 ``values`` in ``[0, size]`` (``size`` = discarded), sync-free."""
    out = torch.zeros(size + 1, dtype=torch.int64, device=values.device)
    out.index_add_(0, values, torch.ones(1, dtype=torch.int64, device=values.device).expand(values.numel()))
    return out[:size]


def intersection_and_union(
    pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = 250
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-class intersection, union and target area of one prediction (docs/METHOD.md section 3).

    Args:
        pred: predicted class ids, any shape.
        target: label ids, same shape as ``pred``; pixels equal to ``ignore_index`` are
            left out entirely (their prediction does not count either).
        num_classes: number of classes ``K``; ids outside ``[0, K)`` are not counted.
        ignore_index: the ignore label (250).

    Returns:
        ``(intersection, union, target_area)``, each int64 ``[K]`` on ``pred``'s device.
        Works on CPU and CUDA without host synchronisation.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    pred = pred.reshape(-1).to(torch.int64)
    target = target.reshape(-1).to(device=pred.device, dtype=torch.int64)
    valid = target != ignore_index
    pred_ok = valid & (pred >= 0) & (pred < num_classes)
    target_ok = valid & (target >= 0) & (target < num_classes)
    area_pred = _count(torch.where(pred_ok, pred, num_classes), num_classes)
    area_target = _count(torch.where(target_ok, target, num_classes), num_classes)
    inter = _count(torch.where(pred_ok & (pred == target), pred, num_classes), num_classes)
    return inter, area_pred + area_target - inter, area_target


def mean_iou(inter_sum: Tensor | np.ndarray, union_sum: Tensor | np.ndarray) -> tuple[np.ndarray, float]:
    """IoU per class ``inter / (union + 1e-10)`` and their mean over all classes (docs/METHOD.md section 3).

    Classes that never occur (union 0) get IoU 0 and still count in the mean, as the
    original.
    """
    inter = torch.as_tensor(inter_sum).detach().cpu().numpy().astype(np.float64)
    union = torch.as_tensor(union_sum).detach().cpu().numpy().astype(np.float64)
    iou = inter / (union + 1e-10)
    return iou, float(np.mean(iou))


def miou_subsets(iou: Sequence[float] | np.ndarray, num_classes: int = 16) -> tuple[float, float]:
    """``(mIoU16, mIoU13)`` for SYNTHIA -> Cityscapes (docs/METHOD.md section 1).

    Args:
        iou: per-class IoU, either the 16 SYNTHIA classes (``num_classes=16``) or all 19
            Cityscapes classes (``num_classes=19``; terrain, truck and train are dropped).
        num_classes: 16 or 19, the length of ``iou``.

    Returns:
        mIoU16 (mean over the 16 classes) and mIoU13 (mean without wall, fence, pole).
    """
    values = np.asarray(iou, dtype=np.float64)
    if values.shape != (num_classes,):
        raise ValueError(f"iou has shape {values.shape}, expected ({num_classes},)")
    if num_classes == 19:
        values = values[list(_CITYSCAPES19_TO_16)]
    elif num_classes != 16:
        raise ValueError(f"num_classes must be 16 or 19, got {num_classes}")
    keep13 = [i for i in range(16) if i not in _SYNTHIA16_NOT_IN_13]
    return float(values.mean()), float(values[keep13].mean())


def format_iou_table(iou: Sequence[float] | np.ndarray, class_names: Sequence[str], miou: float) -> str:
    """A text table with one row per class (IoU in percent) and the mIoU (docs/METHOD.md section 3)."""
    values = np.asarray(iou, dtype=np.float64)
    if len(values) != len(class_names):
        raise ValueError(f"{len(values)} IoU values for {len(class_names)} class names")
    width = max([len("class"), len("mIoU"), *(len(n) for n in class_names)])
    rule = "-" * (width + 10)
    lines = [f"{'class':<{width}}  {'IoU (%)':>8}", rule]
    lines += [f"{name:<{width}}  {100.0 * v:8.2f}" for name, v in zip(class_names, values, strict=True)]
    lines += [rule, f"{'mIoU':<{width}}  {100.0 * miou:8.2f}"]
    return "\n".join(lines)
