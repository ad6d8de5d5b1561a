"""Online class thresholds of phase 1 (docs/METHOD.md section 3)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from benchmarks.reference_rules import reference_update
from tests.helpers import PARITY
from utils.thresholds import OnlineClassThresholds


def test_matches_original() -> None:
    with np.load(f"{PARITY}/conf_bank_expected.npz") as data:
        p, length = float(data["p"]), int(data["bank_length"])
        conf, pred, expected = data["conf"], data["pred"], data["thresholds"]
    tracker = OnlineClassThresholds(19, p=p, bank_length=length)
    for step in range(conf.shape[0]):
        thr = tracker.update(torch.from_numpy(conf[step]), torch.from_numpy(pred[step]))
        assert thr.dtype == torch.float32 and thr.shape == (19,)
        np.testing.assert_array_equal(thr.numpy(), expected[step])


def _random_step(gen: torch.Generator, num_classes: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (int(torch.randint(1, 3, (1,), generator=gen)), int(torch.randint(1, 7, (1,), generator=gen)), 5)
    conf = torch.rand(shape, generator=gen)
    if step % 3 == 0:
        conf = (conf * 4).round() / 4  # many ties, zeros and ones
    # a skewed class distribution, so that some classes are often absent
    pred = (torch.rand(shape, generator=gen) ** 2 * num_classes).long().clamp_max(num_classes - 1)
    return conf, pred


@pytest.mark.parametrize("seed", range(12))
def test_property_equals_reference(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    num_classes = int(torch.randint(1, 7, (1,), generator=gen))
    length = int(torch.randint(1, 25, (1,), generator=gen))  # often fewer slots than new values
    p = float(torch.rand(1, generator=gen)) * 0.999
    tracker = OnlineClassThresholds(num_classes, p=p, bank_length=length)
    bank: dict[int, list[float]] = {}
    ref = np.zeros(num_classes, dtype=np.float32)
    for step in range(25):
        conf, pred = _random_step(gen, num_classes, step)
        out = tracker.update(conf, pred)
        reference_update(bank, ref, conf, pred, p, length)
        np.testing.assert_array_equal(out.numpy(), ref)
        for c, values in enumerate(tracker.banks()):
            assert values.tolist() == bank.get(c, [])


def test_more_new_values_than_slots() -> None:
    tracker = OnlineClassThresholds(2, p=0.5, bank_length=3)
    conf = torch.tensor([0.9, 0.1, 0.8, 0.2, 0.7, 0.3])
    pred = torch.zeros(6, dtype=torch.int64)
    thr = tracker.update(conf, pred)
    # threshold over all six values: sorted desc [.9 .8 .7 .3 .2 .1][int(6 * .5)] = .3
    assert thr[0].item() == pytest.approx(0.3) and thr[1].item() == 0.0
    assert tracker.banks()[0].tolist() == pytest.approx([0.2, 0.7, 0.3])


def test_empty_and_absent_classes_keep_thresholds() -> None:
    tracker = OnlineClassThresholds(3, p=0.0, bank_length=10)
    tracker.update(torch.tensor([0.5, 0.25]), torch.tensor([0, 2]))
    assert tracker.thresholds.tolist() == [0.5, 0.0, 0.25]
    tracker.update(torch.empty(0), torch.empty(0, dtype=torch.int64))
    tracker.update(torch.tensor([0.75]), torch.tensor([0]))
    assert tracker.thresholds.tolist() == [0.75, 0.0, 0.25]


def test_thresholds_setter_for_all_reduce() -> None:
    tracker = OnlineClassThresholds(3, p=0.0, bank_length=10)
    tracker.update(torch.tensor([0.5, 0.25]), torch.tensor([0, 2]))
    tracker.thresholds = tracker.thresholds * 0 + torch.tensor([0.125, 0.5, 1.0])
    tracker.update(torch.tensor([0.375]), torch.tensor([1]))
    assert tracker.thresholds.tolist() == [0.125, 0.375, 1.0]
    with pytest.raises(ValueError):
        tracker.thresholds = torch.zeros(4)


def test_state_dict_round_trip() -> None:
    gen = torch.Generator().manual_seed(3)
    a = OnlineClassThresholds(4, p=0.7, bank_length=8)
    for step in range(10):
        a.update(*_random_step(gen, 4, step))
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    b = OnlineClassThresholds(4, p=0.7, bank_length=8)
    b.load_state_dict(state)
    assert torch.equal(a.thresholds, b.thresholds)
    for step in range(10, 20):
        conf, pred = _random_step(gen, 4, step)
        assert torch.equal(a.update(conf, pred), b.update(conf, pred))
        assert [t.tolist() for t in a.banks()] == [t.tolist() for t in b.banks()]
    with pytest.raises(ValueError, match="bank"):
        OnlineClassThresholds(4, p=0.7, bank_length=9).load_state_dict(state)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        OnlineClassThresholds(19, p=1.0)
    with pytest.raises(ValueError):
        OnlineClassThresholds(19, bank_length=0)
    with pytest.raises(ValueError, match="shape"):
        OnlineClassThresholds(19).update(torch.zeros(3), torch.zeros(4, dtype=torch.int64))


def test_update_never_reads_back_to_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    tracker = OnlineClassThresholds(5, p=0.8, bank_length=6)
    gen = torch.Generator().manual_seed(0)
    inputs = [_random_step(gen, 5, step) for step in range(6)]

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("host synchronisation in update()")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    for conf, pred in inputs:
        tracker.update(conf, pred)
    monkeypatch.undo()
    assert tracker.thresholds.shape == (5,)


def test_float16_confidences() -> None:
    conf = torch.tensor([0.5, 0.25, 0.125], dtype=torch.float16)
    tracker = OnlineClassThresholds(1, p=0.5, bank_length=10)
    assert tracker.update(conf, torch.zeros(3, dtype=torch.int64)).tolist() == [0.25]


def test_conf_p_zero_matches_original() -> None:
    """``--conf_p 0``: the original's own lines on the inputs of conf_bank_expected.npz
    (conf_bank_p0_expected.npz): each threshold is the highest confidence of its bank."""
    with np.load(f"{PARITY}/conf_bank_expected.npz") as data:
        conf, pred = data["conf"], data["pred"]
    with np.load(f"{PARITY}/conf_bank_p0_expected.npz") as data:
        assert float(data["p"]) == 0.0
        length, expected = int(data["bank_length"]), data["thresholds"]
    tracker = OnlineClassThresholds(19, p=0.0, bank_length=length)
    for step in range(conf.shape[0]):
        np.testing.assert_array_equal(tracker.update(torch.from_numpy(conf[step]), torch.from_numpy(pred[step])).numpy(),
                                      expected[step])
