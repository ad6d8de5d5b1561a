"""Phase-2 pseudo labels: the crop warp and the fusion (docs/METHOD.md section 6)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.helpers import PARITY
from utils.pseudo_labels import (
    carry_to_crop,
    fuse_pseudo_labels,
    online_prediction_to_crop,
)

FULL_HW = (64, 128)
CROP_HW = (48, 96)


def _cases() -> list[dict[str, np.ndarray]]:
    with np.load(f"{PARITY}/phase2_warp_expected.npz") as data:
        return [
            {k[len(f"case{i}_") :]: data[k] for k in data.files if k.startswith(f"case{i}_")} for i in range(4)
        ]


def _reference_chain(x: torch.Tensor, via_hw: tuple[int, int], resized_hw, box, flip: bool) -> torch.Tensor:
    """The original's chain of F.interpolate calls."""
    out = F.interpolate(x[None], size=via_hw, mode="bilinear", align_corners=True)
    out = F.interpolate(out, size=tuple(int(v) for v in resized_hw), mode="bilinear", align_corners=True)[0]
    ys, ye, xs, xe = (int(v) for v in box)
    out = out[:, ys:ye, xs:xe]
    return out.flip(-1) if flip else out


@pytest.mark.parametrize("case", range(4))
def test_matches_original(case: int) -> None:
    d = _cases()[case]
    lpsoft_crop = carry_to_crop(torch.from_numpy(d["lpsoft"]), FULL_HW, d["resized_hw"], d["crop"], bool(d["flip"]))
    np.testing.assert_allclose(lpsoft_crop.numpy(), d["lpsoft_crop"], rtol=0, atol=1e-5)
    pred_crop = online_prediction_to_crop(
        torch.from_numpy(d["pred_full_logits"]), CROP_HW, d["resized_hw"], d["crop"], bool(d["flip"])
    )
    np.testing.assert_allclose(pred_crop.numpy(), d["pred_crop"], rtol=0, atol=1e-5)
    thresholds = torch.from_numpy(d["thresholds"])
    label = fuse_pseudo_labels(pred_crop, lpsoft_crop, thresholds)
    assert label.dtype == torch.int64 and label.shape == CROP_HW
    np.testing.assert_array_equal(label.numpy(), d["pseudo_label"])
    # from the original's own intermediate maps too
    label = fuse_pseudo_labels(torch.from_numpy(d["pred_crop"]), torch.from_numpy(d["lpsoft_crop"]), thresholds)
    np.testing.assert_array_equal(label.numpy(), d["pseudo_label"])


def test_online_order_is_softmax_before_warp() -> None:
    """Documented order: softmax right after upsampling to the crop size, then the warp.

    The two other orders are far from the original's numbers.
    """
    for d in _cases():
        logits, expected = torch.from_numpy(d["pred_full_logits"]), torch.from_numpy(d["pred_crop"])
        args = (d["resized_hw"], d["crop"], bool(d["flip"]))
        softmax_last = carry_to_crop(logits, CROP_HW, *args).softmax(0)
        softmax_at_low_res = carry_to_crop(logits.softmax(0), CROP_HW, *args)
        assert (softmax_last - expected).abs().max() > 1e-2
        assert (softmax_at_low_res - expected).abs().max() > 1e-1
        assert (online_prediction_to_crop(logits, CROP_HW, *args) - expected).abs().max() < 1e-6


def test_batched_equals_unbatched() -> None:
    cases = _cases()
    lpsoft = torch.stack([torch.from_numpy(d["lpsoft"]) for d in cases])
    logits = torch.stack([torch.from_numpy(d["pred_full_logits"]) for d in cases])
    sizes = torch.stack([torch.from_numpy(d["resized_hw"]) for d in cases])
    boxes = torch.stack([torch.from_numpy(d["crop"]) for d in cases])
    flips = torch.tensor([True, True, False, True])  # mixed flips (the parity cases are all flipped)
    soft = carry_to_crop(lpsoft, FULL_HW, sizes, boxes, flips)
    pred = online_prediction_to_crop(logits, CROP_HW, sizes, boxes, flips)
    thresholds = torch.from_numpy(cases[0]["thresholds"])
    labels = fuse_pseudo_labels(pred, soft, thresholds)
    assert soft.shape == (4, 19, *CROP_HW) and labels.shape == (4, *CROP_HW)
    for i in range(4):
        args = (sizes[i], boxes[i], bool(flips[i]))
        one_soft = carry_to_crop(lpsoft[i], FULL_HW, *args)
        one_pred = online_prediction_to_crop(logits[i], CROP_HW, *args)
        assert torch.equal(soft[i], one_soft)
        assert torch.equal(pred[i], one_pred)
        assert torch.equal(labels[i], fuse_pseudo_labels(one_pred, one_soft, thresholds))


@pytest.mark.parametrize(
    ("resized_hw", "box", "flip"),
    [((550, 1100), (13, 141, 200, 424), True), ((1650, 3300), (1000, 1128, 2000, 2224), False), ((256, 512), (0, 256, 0, 512), True)],
)
def test_realistic_sizes_match_interpolate_chain(resized_hw, box, flip) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 128, 256, generator=gen) * 4
    ours = carry_to_crop(x, (1024, 2048), resized_hw, box, flip)
    ref = _reference_chain(x, (1024, 2048), resized_hw, box, flip)
    assert ours.dtype == torch.float32
    assert (ours - ref).abs().max() < 1e-5


def test_autocast_does_not_lower_precision() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 16, 32, generator=gen)
    sizes, boxes = torch.tensor([[40, 80], [30, 60]]), torch.tensor([[2, 26, 3, 51], [0, 24, 12, 60]])
    flips = torch.tensor([True, False])
    plain = carry_to_crop(x, (32, 64), sizes, boxes, flips)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = carry_to_crop(x, (32, 64), sizes, boxes, flips)
    assert torch.equal(plain, mixed)


def test_fusion_rule() -> None:
    pred = torch.tensor([[[0.9, 0.2]], [[0.1, 0.8]]])  # [C=2, H=1, W=2]
    soft = torch.zeros(2, 1, 2)  # softmax = 0.5 everywhere
    # fused: pixel 0 -> class 0 with 0.7, pixel 1 -> class 1 with 0.65
    assert fuse_pseudo_labels(pred, soft, torch.tensor([0.7, 0.66])).tolist() == [[0, 250]]
    assert fuse_pseudo_labels(pred, soft, torch.tensor([0.71, 0.6]), ignore_label=7).tolist() == [[7, 1]]


def test_crop_hw_given_or_read_from_boxes() -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 8, 16, generator=gen)
    sizes, boxes = torch.tensor([[20, 40], [24, 48]]), torch.tensor([[1, 13, 2, 26], [5, 17, 20, 44]])
    flips = torch.tensor([False, True])
    read = carry_to_crop(x, (16, 32), sizes, boxes, flips)
    given = carry_to_crop(x, (16, 32), sizes, boxes, flips, crop_hw=(12, 24))
    assert torch.equal(read, given) and read.shape == (2, 5, 12, 24)
    with pytest.raises(ValueError, match="crop_hw"):
        carry_to_crop(x, (16, 32), sizes, boxes, flips, crop_hw=(12, 25))


def test_bad_arguments() -> None:
    x = torch.zeros(2, 4, 8)
    with pytest.raises(ValueError, match="does not fit"):
        carry_to_crop(x, None, (4, 8), (0, 5, 0, 8), False)
    with pytest.raises(ValueError, match="same size"):
        carry_to_crop(torch.zeros(2, 2, 4, 8), None, [[4, 8], [4, 8]], [[0, 2, 0, 8], [0, 3, 0, 8]], [False, False])
    with pytest.raises(ValueError):
        carry_to_crop(torch.zeros(2, 2, 4, 8), None, [[4, 8]], [[0, 2, 0, 8]], [False])
    with pytest.raises(ValueError):
        fuse_pseudo_labels(torch.zeros(2, 3, 3), torch.zeros(2, 3, 4), torch.zeros(2))


def test_phase2_online_prediction_upsamples_in_the_autocast_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under autocast the original computes ``softmax(interp(logits))`` on the half-precision
    classifier output: the upsampled logits are rounded to that dtype, the softmax runs in fp32.
    Phase 2's whole-image pass must do the same (checked here on the CPU under bf16)."""
    from types import SimpleNamespace

    from stages import phase2

    torch.manual_seed(0)
    net = torch.nn.Conv2d(3, 19, 8, stride=8)  # logits at output stride 8, like the network
    with torch.no_grad():
        net.weight.mul_(20.0)  # logits of a few units: bf16 rounding is visible in the probabilities
    objective = phase2.Phase2Objective(net, SimpleNamespace(ignore_label=250))
    img_full = torch.rand(2, 3, 64, 128)
    x_t = torch.rand(2, 3, *CROP_HW)
    soft = torch.randn(2, 19, 8, 16)
    resized_hw = torch.tensor([[80, 160], [64, 128]])
    crop_box = torch.tensor([[10, 58, 30, 126], [16, 64, 0, 96]])
    flip = torch.tensor([True, False])
    seen = []

    def spy(logits, *args):
        seen.append((logits, online_prediction_to_crop(logits, *args)))
        return seen[-1][1]

    monkeypatch.setattr(phase2, "online_prediction_to_crop", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        objective.target(x_t, img_full, soft, resized_hw, crop_box, flip, torch.full((19,), 0.5))
        logits = net(img_full)
    passed, got = seen[0]  # what phase 2 handed over and the prediction it fused
    assert logits.dtype == torch.bfloat16 and passed.dtype == torch.bfloat16  # no cast before the upsampling
    assert got.dtype == torch.float32
    # independently: the original's softmax(interp(logits)) in bf16 then fp32, resize, crop, flip
    up = F.interpolate(logits, size=CROP_HW, mode="bilinear", align_corners=True)
    assert up.dtype == torch.bfloat16
    prob = up.float().softmax(1)
    for b in range(2):
        ys, ye, xs, xe = crop_box[b].tolist()
        ref = F.interpolate(prob[b : b + 1], size=tuple(resized_hw[b].tolist()), mode="bilinear",
                            align_corners=True)[0, :, ys:ye, xs:xe]
        ref = ref.flip(-1) if flip[b] else ref
        torch.testing.assert_close(got[b], ref, rtol=0, atol=2e-6)
    # the float32 upsampling (logits cast first) is measurably different
    cast_first = online_prediction_to_crop(logits.float(), CROP_HW, resized_hw, crop_box, flip)
    assert (cast_first - got).abs().max() > 1e-3
