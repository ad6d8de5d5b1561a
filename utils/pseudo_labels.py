"""Phase-2 pseudo labels: carrying maps through the crop's augmentation, fusing (SPEC section 6).

Phase 2 needs, for every target crop, two class maps in the crop's frame:

* the **soft label** ``S``: the saved logits of the whole image (at output stride 8),
  upsampled to the full image size, resized to the crop's recorded ``(h, w)``, cropped and
  flipped, then ``softmax``;
* the **online prediction** ``P``: the logits of the whole image upsampled to the *crop*
  size, ``softmax``, then resized to ``(h, w)``, cropped and flipped.

All resampling is bilinear with ``align_corners=True``. The order of ``P`` was checked
against the original's numbers (``tests/data/parity/phase2_warp_expected.npz``):
``softmax`` is applied right after the upsampling to the crop size, *before* the resize /
crop / flip (softmax after the warp, or before the upsampling, does not match).

Bilinear resampling with ``align_corners=True`` is separable and linear, so "resize to A,
then resize to B, then crop, then flip" equals ``Ay @ x @ Ax^T`` with small matrices
``Ay = crop(R_B,h) @ R_A,h`` (likewise for the width). :func:`carry_to_crop` builds those
matrices with PyTorch's own float32 interpolation weights and applies them in float64,
so only the crop is ever computed: no full-size intermediate (19 x 1024 x 2048 and larger
in the original). Results agree with the original's chain of ``F.interpolate`` calls to
about 1e-6.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

HW = Sequence[int] | Tensor


def _interp_matrix(in_size: int, out_size: int, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Rows ``start:stop`` of the ``[out, in]`` matrix of bilinear ``align_corners=True`` resampling.

    Weights are computed in float32 exactly like PyTorch's upsampling kernels
    (``ratio = (in - 1) / (out - 1)``, ``src = ratio * i``, ``i0 = floor(src)``,
    ``lambda1 = src - i0``, ``lambda0 = 1 - lambda1``; equal sizes copy).
    """
    rows = np.arange(start, out_size if stop is None else stop)
    mat = np.zeros((len(rows), in_size), dtype=np.float64)
    if out_size == in_size:
        mat[np.arange(len(rows)), rows] = 1.0
        return mat
    ratio = np.float32(in_size - 1) / np.float32(out_size - 1) if out_size > 1 else np.float32(0.0)
    src = (ratio * rows.astype(np.float32)).astype(np.float32)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    lam1 = np.clip(src - i0.astype(np.float32), np.float32(0.0), np.float32(1.0)).astype(np.float32)
    lam0 = (np.float32(1.0) - lam1).astype(np.float32)
    i1 = i0 + (i0 < in_size - 1)
    index = np.arange(len(rows))
    np.add.at(mat, (index, i0), lam0.astype(np.float64))
    np.add.at(mat, (index, i1), lam1.astype(np.float64))
    return mat


def _axis_matrix(
    in_size: int, via_size: int | None, resized: int, start: int, stop: int, flip: bool
) -> np.ndarray:
    """Composed matrix for one axis: resize to ``via``, resize to ``resized``, crop, flip."""
    if not 0 <= start < stop <= resized:
        raise ValueError(f"crop [{start}:{stop}] does not fit in the resized size {resized}")
    mat = _interp_matrix(via_size if via_size is not None else in_size, resized, start, stop)
    if via_size is not None:
        mat = mat @ _interp_matrix(in_size, via_size)
    return mat[::-1] if flip else mat


def _as_rows(value: HW | bool, width: int | None) -> list:
    """Per-sample parameters as a list of Python values (rows of ``width`` or scalars)."""
    rows = torch.as_tensor(value).cpu()  # parameters come from the DataLoader: host data
    if width is None:
        return [bool(v) for v in rows.reshape(-1).tolist()]
    return [list(map(int, r)) for r in rows.reshape(-1, width).tolist()]


def carry_to_crop(
    x: Tensor,
    via_hw: Sequence[int] | None,
    resized_hw: HW,
    crop_box: HW,
    flip: bool | Tensor,
) -> Tensor:
    """Carry a whole-image map through a crop's augmentation (SPEC section 6).

    Equivalent to: bilinear (``align_corners=True``) resize of ``x`` to ``via_hw``, then
    to ``resized_hw``, then ``[ys:ye, xs:xe]`` with ``crop_box = (ys, ye, xs, xe)``, then a
    flip of the last dimension if ``flip``. ``via_hw=None`` skips the first resize.

    Args:
        x: ``[C, h, w]`` or ``[N, C, h, w]`` maps (e.g. logits or probabilities).
        via_hw: the shared intermediate size ``(H, W)`` (the full image size for the
            saved soft labels) or None.
        resized_hw: ``(h, w)`` for one sample, ``[N, 2]`` when batched.
        crop_box: ``(ys, ye, xs, xe)`` for one sample, ``[N, 4]`` when batched (all crops
            the same size).
        flip: bool for one sample, ``[N]`` bools when batched.

    The parameters are read on the host (pass the DataLoader's CPU tensors or tuples).
    The map stays on its device; the result has ``x``'s dtype and device.
    """
    batched = x.dim() == 4
    if x.dim() not in (3, 4):
        raise ValueError(f"x must be [C, h, w] or [N, C, h, w], got {tuple(x.shape)}")
    xb = x if batched else x.unsqueeze(0)
    n, _, in_h, in_w = xb.shape
    sizes, boxes, flips = _as_rows(resized_hw, 2), _as_rows(crop_box, 4), _as_rows(flip, None)
    if not len(sizes) == len(boxes) == len(flips) == n:
        raise ValueError(f"{n} maps but {len(sizes)} sizes, {len(boxes)} crop boxes, {len(flips)} flips")
    via_h, via_w = (None, None) if via_hw is None else (int(via_hw[0]), int(via_hw[1]))
    mats_y, mats_x = [], []
    for (h, w), (ys, ye, xs, xe), f in zip(sizes, boxes, flips, strict=True):
        mats_y.append(_axis_matrix(in_h, via_h, h, ys, ye, False))
        mats_x.append(_axis_matrix(in_w, via_w, w, xs, xe, f))
    if len({m.shape for m in mats_y}) != 1 or len({m.shape for m in mats_x}) != 1:
        raise ValueError("all crops of a batch must have the same size")
    # float64 with autocast off: exact enough whatever the caller's AMP / TF32 settings.
    ay = torch.from_numpy(np.stack(mats_y)).to(xb.device).unsqueeze(1)  # [N, 1, Hc, h]
    axt = torch.from_numpy(np.stack(mats_x)).to(xb.device).unsqueeze(1).transpose(-1, -2)  # [N, 1, w, Wc]
    crop_h, crop_w = ay.shape[-2], axt.shape[-1]
    with torch.autocast(device_type=xb.device.type, enabled=False):
        x64 = xb.to(torch.float64)
        if crop_h * in_w * (in_h + crop_w) <= in_h * crop_w * (in_w + crop_h):
            out = (ay @ x64) @ axt
        else:
            out = ay @ (x64 @ axt)
    out = out.to(x.dtype)
    return out if batched else out[0]


def online_prediction_to_crop(
    logits_full: Tensor,
    crop_hw: Sequence[int],
    resized_hw: HW,
    crop_box: HW,
    flip: bool | Tensor,
) -> Tensor:
    """The online prediction ``P`` of SPEC section 6 in the crop's frame.

    ``softmax(interp(logits_full, crop_hw))`` over classes, then resized to
    ``resized_hw``, cropped and flipped (all bilinear, ``align_corners=True``). This is the
    order that matches the original's numbers. ``logits_full``: ``[C, h, w]`` or
    ``[N, C, h, w]``; other arguments as :func:`carry_to_crop`.
    """
    batched = logits_full.dim() == 4
    xb = logits_full if batched else logits_full.unsqueeze(0)
    size = (int(crop_hw[0]), int(crop_hw[1]))
    prob = F.interpolate(xb, size=size, mode="bilinear", align_corners=True).softmax(dim=1)
    out = carry_to_crop(prob, None, resized_hw, crop_box, flip)
    return out if batched else out[0]


def fuse_pseudo_labels(
    pred_prob_crop: Tensor, soft_logits_crop: Tensor, thresholds: Tensor, ignore_label: int = 250
) -> Tensor:
    """Fused phase-2 pseudo label (SPEC section 6).

    ``prob = (P + softmax(S)) / 2`` over the class dimension; ``conf, pl = max``;
    ``pl[conf < thresholds[pl]] = ignore_label``.

    Args:
        pred_prob_crop: online probabilities ``P``, ``[C, H, W]`` or ``[N, C, H, W]``.
        soft_logits_crop: carried soft-label logits ``S`` (before softmax), same shape.
        thresholds: per-class thresholds ``[C]`` (the file of SPEC section 5).
        ignore_label: value of rejected pixels (250).

    Returns:
        int64 labels ``[H, W]`` or ``[N, H, W]``.
    """
    if pred_prob_crop.shape != soft_logits_crop.shape:
        raise ValueError(
            f"prediction {tuple(pred_prob_crop.shape)} and soft label {tuple(soft_logits_crop.shape)} differ"
        )
    dim = -3
    prob = (pred_prob_crop + soft_logits_crop.softmax(dim=dim)) / 2
    conf, label = prob.max(dim=dim)
    thr = torch.as_tensor(thresholds).to(device=prob.device, dtype=conf.dtype)
    return torch.where(conf < thr[label], torch.full_like(label, ignore_label), label)
