"""Per-class intersection / union and mIoU (docs/METHOD.md section 3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datasets.labels import CLASS_NAMES_19
from tests.helpers import PARITY
from utils.metrics import (
    format_iou_table,
    intersection_and_union,
    mean_iou,
    miou_subsets,
)


def _parity() -> dict[str, np.ndarray]:
    with np.load(f"{PARITY}/miou_expected.npz") as data:
        return {k: data[k] for k in data.files}


def test_matches_original() -> None:
    data = _parity()
    inter, union, target = intersection_and_union(
        torch.from_numpy(data["pred"]), torch.from_numpy(data["target"]), 19
    )
    assert inter.dtype == union.dtype == target.dtype == torch.int64
    iou, miou = mean_iou(inter, union)
    assert iou.dtype == np.float64
    np.testing.assert_array_equal(iou, data["iou"])
    assert miou == float(data["miou"])


def test_accumulated_over_images_equals_whole_set() -> None:
    data = _parity()
    pred, target = torch.from_numpy(data["pred"]), torch.from_numpy(data["target"])
    sums = [torch.zeros(19, dtype=torch.int64) for _ in range(3)]
    for i in range(pred.shape[0]):
        for s, v in zip(sums, intersection_and_union(pred[i], target[i], 19), strict=True):
            s += v
    whole = intersection_and_union(pred, target, 19)
    for s, v in zip(sums, whole, strict=True):
        assert torch.equal(s, v)


def test_against_bruteforce() -> None:
    gen = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 5, (4, 9, 11), generator=gen)
    target = torch.randint(0, 6, (4, 9, 11), generator=gen)
    target[target == 5] = 250
    pred[0, 0, :3] = torch.tensor([250, 7, -1])  # out-of-range predictions are never counted
    inter, union, area = intersection_and_union(pred, target, 5)
    valid = target != 250
    for c in range(5):
        p, t = (pred == c) & valid, (target == c) & valid
        assert inter[c] == (p & t).sum()
        assert union[c] == (p | t).sum()
        assert area[c] == t.sum()


def test_ignored_pixels_do_not_count() -> None:
    pred = torch.tensor([0, 1, 1])
    target = torch.tensor([0, 250, 250])
    inter, union, _ = intersection_and_union(pred, target, 2)
    assert inter.tolist() == [1, 0] and union.tolist() == [1, 0]


def test_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="shape"):
        intersection_and_union(torch.zeros(3), torch.zeros(4), 2)


def test_mean_iou_numpy_input_and_empty_classes() -> None:
    iou, miou = mean_iou(np.array([1, 0, 2]), np.array([2, 0, 4]))
    np.testing.assert_allclose(iou, [0.5, 0.0, 0.5])
    assert miou == pytest.approx(1.0 / 3.0)


def test_miou_subsets() -> None:
    iou16 = np.arange(16, dtype=np.float64) / 16
    m16, m13 = miou_subsets(iou16, 16)
    assert m16 == pytest.approx(iou16.mean())
    assert m13 == pytest.approx(np.delete(iou16, [3, 4, 5]).mean())
    iou19 = np.zeros(19)
    iou19[[0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18]] = iou16
    iou19[[9, 14, 16]] = 99.0  # terrain, truck, train are not SYNTHIA classes
    assert miou_subsets(iou19, 19) == pytest.approx((m16, m13))
    with pytest.raises(ValueError):
        miou_subsets(iou16, 19)


def test_format_iou_table() -> None:
    iou = np.linspace(0, 1, 19)
    table = format_iou_table(iou, CLASS_NAMES_19, float(iou.mean()))
    lines = table.splitlines()
    assert any(line.startswith("traffic_light") for line in lines)
    assert lines[-1].split() == ["mIoU", "50.00"]
    assert "100.00" in table
    with pytest.raises(ValueError):
        format_iou_table(iou[:3], CLASS_NAMES_19, 0.0)
