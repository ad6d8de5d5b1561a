"""Phase-2 pseudo labels: carrying maps through the crop's augmentation, fusing (docs/METHOD.md section 6).

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
matrices on the map's device with PyTorch's own float32 interpolation weights and applies
them in float64, so only the crop is ever computed: no full-size intermediate
(19 x 1024 x 2048 and larger in the original). Results agree with the original's chain of
``F.interpolate`` calls to about 1e-6.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

HW = Sequence[int] | Tensor


def _resample_rows(base: Tensor, out_size: Tensor, pos: Tensor) -> Tensor:
    """Rows ``pos`` of "bilinear ``align_corners=True`` resampling to ``out_size``" applied to ``base``.

    ``base``: float64 ``[S, K]`` (``S`` = the size being resampled); ``out_size``: int64
    ``[N]``; ``pos``: int64 ``[N, R]`` output positions. Returns ``[N, R, K]``. The weights are
    computed in float32 exactly like PyTorch's upsampling kernels
    (``ratio = (S - 1) / (out - 1)``, ``src = ratio * pos``, ``i0 = floor(src)``,
    ``lambda1 = src - i0``, ``lambda0 = 1 - lambda1``; equal sizes give the identity).
    """
    size = base.shape[0]
    # A tensor-by-tensor division: ``scalar / tensor`` would compute ``reciprocal * scalar``.
    numerator = torch.full(out_size.shape, size - 1, dtype=torch.float32, device=out_size.device)
    ratio = torch.where(out_size > 1, numerator / (out_size - 1).clamp_min(1).to(torch.float32), 0.0)
    src = ratio.unsqueeze(1) * pos.to(torch.float32)
    i0 = torch.floor(src).to(torch.int64).clamp(0, size - 1)
    lam1 = (src - i0.to(torch.float32)).clamp(0.0, 1.0)
    lam0 = 1.0 - lam1
    i1 = i0 + (i0 < size - 1).to(torch.int64)
    return lam0.to(torch.float64).unsqueeze(-1) * base[i0] + lam1.to(torch.float64).unsqueeze(-1) * base[i1]


def _axis_matrix(
    in_size: int, via_size: int | None, resized: Tensor, start: Tensor, length: int, flip: Tensor | None
) -> Tensor:
    """``[N, length, in_size]`` float64: resize to ``via``, resize to ``resized``, crop, flip."""
    dev = resized.device
    base = torch.eye(in_size, dtype=torch.float64, device=dev)
    if via_size is not None:
        full = torch.full((1,), via_size, dtype=torch.int64, device=dev)
        base = _resample_rows(base, full, torch.arange(via_size, device=dev).unsqueeze(0))[0]
    pos = start.unsqueeze(1) + torch.arange(length, device=dev)
    mat = _resample_rows(base, resized, pos)
    if flip is not None:
        mat = torch.where(flip.view(-1, 1, 1), mat.flip(1), mat)
    return mat


def carry_to_crop(
    x: Tensor,
    via_hw: Sequence[int] | None,
    resized_hw: HW,
    crop_box: HW,
    flip: bool | Tensor,
    crop_hw: Sequence[int] | None = None,
) -> Tensor:
    """Carry a whole-image map through a crop's augmentation (docs/METHOD.md section 6).

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
        crop_hw: the crop size ``(ye - ys, xe - xs)``. When given, nothing is read back
            from the device (the parameters may live on the GPU); when omitted it is read
            from ``crop_box``. Parameters on the CPU are checked (the crop must fit in
            ``resized_hw``, all crops the same size).

    The result has ``x``'s dtype and device. The resampling matrices are built on
    ``x``'s device and applied in float64 with autocast off, so the caller's AMP / TF32
    settings do not change the numbers.
    """
    if x.dim() not in (3, 4):
        raise ValueError(f"x must be [C, h, w] or [N, C, h, w], got {tuple(x.shape)}")
    batched = x.dim() == 4
    xb = x if batched else x.unsqueeze(0)
    n, _, in_h, in_w = xb.shape
    sizes = torch.as_tensor(resized_hw).reshape(-1, 2).to(torch.int64)
    boxes = torch.as_tensor(crop_box).reshape(-1, 4).to(torch.int64)
    flips = torch.as_tensor(flip).reshape(-1).to(torch.bool)
    if not sizes.shape[0] == boxes.shape[0] == flips.shape[0] == n:
        raise ValueError(f"{n} maps but {sizes.shape[0]} sizes, {boxes.shape[0]} crop boxes, {flips.shape[0]} flips")
    if boxes.device.type == "cpu" and sizes.device.type == "cpu":
        _check_crops(sizes, boxes, crop_hw)
    if crop_hw is None:
        ys, ye, xs, xe = boxes[0].tolist()  # a host read when the boxes live on the GPU
        crop_hw = (ye - ys, xe - xs)
    dev = xb.device
    sizes, boxes, flips = sizes.to(dev), boxes.to(dev), flips.to(dev)
    via_h, via_w = (None, None) if via_hw is None else (int(via_hw[0]), int(via_hw[1]))
    ay = _axis_matrix(in_h, via_h, sizes[:, 0], boxes[:, 0], int(crop_hw[0]), None)  # [N, Hc, h]
    ax = _axis_matrix(in_w, via_w, sizes[:, 1], boxes[:, 2], int(crop_hw[1]), flips)  # [N, Wc, w]
    crop_h, crop_w = ay.shape[1], ax.shape[1]
    with torch.autocast(device_type=dev.type, enabled=False):
        x64 = xb.to(torch.float64)
        # out = Ay @ x @ Ax^T, in the cheaper order
        if crop_h * in_w * (in_h + crop_w) <= in_h * crop_w * (in_w + crop_h):
            out = torch.einsum("ncyw,nxw->ncyx", torch.einsum("nyh,nchw->ncyw", ay, x64), ax)
        else:
            out = torch.einsum("nyh,nchx->ncyx", ay, torch.einsum("nchw,nxw->nchx", x64, ax))
    out = out.to(x.dtype)
    return out if batched else out[0]


def _check_crops(sizes: Tensor, boxes: Tensor, crop_hw: Sequence[int] | None) -> None:
    """Every crop lies inside its resized image, all have the same size (= ``crop_hw``); host tensors."""
    for (h, w), (ys, ye, xs, xe) in zip(sizes.tolist(), boxes.tolist(), strict=True):
        if not (0 <= ys < ye <= h and 0 <= xs < xe <= w):
            raise ValueError(f"crop box {(ys, ye, xs, xe)} does not fit in the resized size {(h, w)}")
    extents = {(ye - ys, xe - xs) for ys, ye, xs, xe in boxes.tolist()}
    if len(extents) != 1:
        raise ValueError(f"all crops of a batch must have the same size, got {sorted(extents)}")
    if crop_hw is not None and extents != {(int(crop_hw[0]), int(crop_hw[1]))}:
        raise ValueError(f"crop_hw {tuple(crop_hw)} differs from the crop boxes' size {extents.pop()}")


def online_prediction_to_crop(
    logits_full: Tensor,
    crop_hw: Sequence[int],
    resized_hw: HW,
    crop_box: HW,
    flip: bool | Tensor,
) -> Tensor:
    """The online prediction ``P`` of docs/METHOD.md section 6 in the crop's frame.

    ``softmax(interp(logits_full, crop_hw))`` over classes, then resized to
    ``resized_hw``, cropped and flipped (all bilinear, ``align_corners=True``). This is the
    order that matches the original's numbers. ``logits_full``: ``[C, h, w]`` or
    ``[N, C, h, w]``; other arguments as :func:`carry_to_crop` (``crop_hw`` is both the
    upsampling size and the crop size, so nothing is read back from the device).

    Precision, as the original under autocast: the upsampling runs in ``logits_full``'s dtype
    (fp16/bf16 logits give half-precision upsampled logits), the softmax and everything after
    it in float32. Float32 logits give float32 throughout.
    """
    batched = logits_full.dim() == 4
    xb = logits_full if batched else logits_full.unsqueeze(0)
    size = (int(crop_hw[0]), int(crop_hw[1]))
    # .float() before the softmax: CUDA autocast runs softmax in fp32 anyway (the original's
    # case); CPU autocast would keep bf16, so the cast is explicit. A no-op for float32.
    prob = F.interpolate(xb, size=size, mode="bilinear", align_corners=True).float().softmax(dim=1)
    out = carry_to_crop(prob, None, resized_hw, crop_box, flip, crop_hw=size)
    return out if batched else out[0]


def fuse_pseudo_labels(
    pred_prob_crop: Tensor, soft_logits_crop: Tensor, thresholds: Tensor, ignore_label: int = 250
) -> Tensor:
    """Fused phase-2 pseudo label (docs/METHOD.md section 6).

    ``prob = (P + softmax(S)) / 2`` over the class dimension; ``conf, pl = max``;
    ``pl[conf < thresholds[pl]] = ignore_label``.

    Args:
        pred_prob_crop: online probabilities ``P``, ``[C, H, W]`` or ``[N, C, H, W]``.
        soft_logits_crop: carried soft-label logits ``S`` (before softmax), same shape.
        thresholds: per-class thresholds ``[C]`` (the file of docs/METHOD.md section 5).
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
