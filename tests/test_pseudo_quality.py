"""Pseudo-label accuracy against the target ground truth (stages/pseudo_quality.py), the wiring test
of phase 2's carried predictions, and the soft-label / threshold reports."""

from __future__ import annotations

import json
import os
import statistics
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stages.pseudo_quality import (
    PseudoLabelMonitor,
    ground_truth_at_logits,
    logit_positions,
    pseudo_label_counts,
    summarize,
)
from tests.conftest import run_script, tiny_args

pytestmark = pytest.mark.slow  # runs the scripts end to end or a training loop (tests/README.md)

IGNORE = 250


# ---------------------------------------------------------------------------- the counts
def test_logit_positions_follow_align_corners_upsampling() -> None:
    assert logit_positions(512, 64) == [round(i * 511 / 63 + 1e-9) for i in range(64)]
    assert logit_positions(512, 64)[:3] == [0, 8, 16] and logit_positions(512, 64)[-1] == 511
    assert logit_positions(7, 1) == [0] and logit_positions(5, 5) == list(range(5))
    assert logit_positions(5, 3) == [0, 2, 4] and logit_positions(4, 3) == [0, 2, 3]  # 1.5 rounds up
    for pixels, logits in ((64, 8), (48, 6), (33, 5), (1024, 128), (100, 13)):
        pos = logit_positions(pixels, logits)
        exact = [i * (pixels - 1) / (logits - 1) for i in range(logits)]
        assert all(abs(p - e) <= 0.5 for p, e in zip(pos, exact)), (pixels, logits)
        # the network's upsampling places logit i's value exactly where i * (N - 1) / (n - 1) is a pixel
        x = torch.randn(1, 1, 1, logits, dtype=torch.float64)
        up = F.interpolate(x, size=(1, pixels), mode="bilinear", align_corners=True)[0, 0, 0]
        for i, (p, e) in enumerate(zip(pos, exact)):
            if e == int(e):
                assert p == e and torch.isclose(up[p], x[0, 0, 0, i]), (pixels, logits, i)
    gt = torch.arange(64 * 128).reshape(1, 64, 128)
    sub = ground_truth_at_logits(gt, (8, 16))
    rows, cols = logit_positions(64, 8), logit_positions(128, 16)
    assert torch.equal(sub[0], gt[0][rows][:, cols])


def test_counts_match_a_pixel_loop() -> None:
    rng = np.random.default_rng(0)
    c = 5
    pseudo = rng.integers(0, c, (2, 9, 11))
    gt = rng.integers(0, c, (2, 9, 11))
    right = rng.random(gt.shape) < 0.7
    gt[right] = pseudo[right]  # mostly right
    pseudo[rng.random(pseudo.shape) < 0.2] = IGNORE
    gt[rng.random(gt.shape) < 0.1] = IGNORE
    counts = pseudo_label_counts(torch.from_numpy(pseudo), torch.from_numpy(gt).to(torch.uint8), c, IGNORE)
    s = summarize(counts.numpy(), c)
    scored = (pseudo != IGNORE) & (gt != IGNORE)
    assert s["scored"] == scored.sum()
    assert s["acc"] == pytest.approx((pseudo[scored] == gt[scored]).mean(), abs=0)
    for k in range(c):
        mine = scored & (pseudo == k)
        assert s["precision"][k] == pytest.approx((gt[mine] == k).mean())
        of_class = gt == k
        assert s["kept_fraction"][k] == pytest.approx((pseudo[of_class] != IGNORE).mean())
    # nothing scored -> no accuracy; a class never labelled -> NaN precision
    empty = summarize(pseudo_label_counts(torch.full((3,), IGNORE), torch.zeros(3), c, IGNORE).numpy(), c)
    assert empty["acc"] is None and empty["scored"] == 0 and np.isnan(empty["precision"]).all()
    with pytest.raises(ValueError, match="differ in shape"):
        pseudo_label_counts(torch.zeros(2, 3), torch.zeros(3, 2), c)


def test_monitor_pools_iterations_and_resets() -> None:
    m = PseudoLabelMonitor(3, IGNORE, torch.device("cpu"), ["a", "b", "c"])
    m.observe(torch.tensor([0, 1, IGNORE]), torch.tensor([0, 2, 1]))
    m.observe(torch.tensor([2, 2]), torch.tensor([2, IGNORE]))
    assert m.collect() == {"pseudo_acc": 2 / 3, "pseudo_acc_pixels": 3}
    m.observe(torch.tensor([1]), torch.tensor([1]))
    assert m.collect() == {"pseudo_acc": 1.0, "pseudo_acc_pixels": 1}
    assert m.collect() == {"pseudo_acc": None, "pseudo_acc_pixels": 0}
    assert m.console_text().startswith("pseudo_acc = 0.75000 ")  # 3 of 4 over the last three iterations
    assert "n/a" in m.console_text()


def _ddp_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=2, rank=rank)
    try:
        m = PseudoLabelMonitor(2, IGNORE, torch.device("cpu"), ["a", "b"])
        if rank == 0:  # 1 of 1 right
            m.observe(torch.tensor([1]), torch.tensor([1]))
        else:  # 0 of 9 right
            m.observe(torch.zeros(9, dtype=torch.int64), torch.ones(9, dtype=torch.int64))
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(m.collect(), f)
    finally:
        dist.destroy_process_group()


def test_ranks_sum_counts_not_fractions(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    from utils.distributed import find_free_port

    mp.spawn(_ddp_worker, args=(find_free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got == {"pseudo_acc": 0.1, "pseudo_acc_pixels": 10}  # (1 + 0) / (1 + 9), not (1 + 0) / 2


# ---------------------------------------------------------------------------- the wiring test
IMG_W, IMG_H = 128, 64
CROP = "96,48"  # random resize (base 128), crop 96x48 and flip 0.5: every crop meets the middle
ROAD_ID, VEGETATION_ID = 7, 21  # Cityscapes label ids -> train ids 0 and 8
LARGE = 60.0  # one-hot logit of the fake soft labels
WIRING_ITERATIONS = 6


def two_class_cityscapes(root: Path, n_train: int = 4, n_val: int = 2) -> Path:
    """Cityscapes layout; every image is road on its left half, vegetation on its right half."""
    rng = np.random.default_rng(1)
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            name = f"two_{i:06d}_000019"
            img = np.empty((IMG_H, IMG_W, 3), np.float32)
            img[:, : IMG_W // 2] = (110, 100, 105)
            img[:, IMG_W // 2:] = (60, 130, 55)
            img += rng.normal(0, 12, img.shape)
            ids = np.full((IMG_H, IMG_W), ROAD_ID, np.uint8)
            ids[:, IMG_W // 2:] = VEGETATION_ID
            for folder, file, arr in (("leftImg8bit", f"{name}_leftImg8bit.png", np.clip(img, 0, 255).astype(np.uint8)),
                                      ("gtFine", f"{name}_gtFine_labelIds.png", ids)):
                path = root / folder / split / "two" / file
                path.parent.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(path), arr[:, :, ::-1] if arr.ndim == 3 else arr)
    return root


def soft_labels_from_ground_truth(city: Path, out: Path) -> Path:
    """``LARGE`` one-hot logits at stride 8, the class of the ground truth at each logit position."""
    from datasets.cityscapes import CityscapesDataset, soft_label_name

    out.mkdir(parents=True, exist_ok=True)
    ds = CityscapesDataset(city, "train", img_size=(IMG_W, IMG_H), train_labels=True)
    assert ds.has_labels
    hw = (-(-IMG_H // 8), -(-IMG_W // 8))
    for i, path in enumerate(ds.files):
        gt = ground_truth_at_logits(ds[i]["label"].long(), hw)
        assert (gt != IGNORE).all()
        soft = np.zeros((19, *hw), np.float32)
        np.put_along_axis(soft, gt.numpy()[None], LARGE, axis=0)
        np.save(out / soft_label_name(path), soft)
    return out


@pytest.fixture(scope="module")
def wiring_data(synthetic_data, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("wiring")
    city = two_class_cityscapes(root / "cityscapes")
    soft = soft_labels_from_ground_truth(city, root / "soft")
    thresholds = root / "thresholds_zero.npy"
    np.save(thresholds, np.zeros(19))
    data = {"gta5": synthetic_data["gta5"], "cityscapes": city}
    flags = [*tiny_args(data), "--rcrop", CROP, "--soft_labels_folder", soft, "--thresholds_path", thresholds,
             "--num-workers", "0", "--batch-size", "2"]
    return {"flags": [str(f) for f in flags], "root": root}


def wiring_holds(accs: list[float]) -> bool:
    """The pass criterion of the wiring test: near 1 on every iteration."""
    return min(accs) >= 0.9 and statistics.mean(accs) >= 0.95


def test_phase2_wiring_through_the_command_line(wiring_data, sourceonly_ckpt, tmp_path) -> None:
    """Soft labels made from the ground truth, thresholds 0, random resize / crop / flip: the fused
    labels of every crop must match the crop's ground truth (the carried maps follow the crop)."""
    snap = tmp_path / "p2"
    n = WIRING_ITERATIONS
    proc = run_script(["train_phase2.py", *wiring_data["flags"], "--resume", sourceonly_ckpt, "--snapshot-dir", snap,
                       "--num-steps", n, "--num-steps-stop", n, "--print-every", 2, "--tensorboard"])
    lines = [json.loads(s) for s in (snap / "metrics.jsonl").read_text().splitlines()]
    assert [m["iter"] for m in lines] == list(range(n))
    accs = [m["pseudo_acc"] for m in lines]
    assert all(m["pseudo_acc_pixels"] > 0.9 * 2 * 96 * 48 for m in lines), lines  # thresholds 0: all kept
    print("pseudo_acc per iteration (command line):", accs)
    assert wiring_holds(accs), accs
    assert "it never reaches a loss" in proc.stdout and "pseudo_acc = " in proc.stdout
    tags = summary_tags(snap)
    assert {"pseudo/acc", "pseudo_precision/road", "pseudo_kept/vegetation", "pseudo/note/text_summary"} <= tags, tags


def summary_tags(folder: Path) -> set[str]:
    """Tags of the summaries in a folder's tensorboard event files (TFRecord framing)."""
    from tensorboardX.proto.event_pb2 import Event

    tags = set()
    for path in folder.glob("events.out.tfevents.*"):
        data, pos = path.read_bytes(), 0
        while pos + 12 <= len(data):
            (size,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + size])
            tags.update(v.tag for v in event.summary.value)
            pos += 12 + size + 4
    return tags


def broken(kind: str, fn):
    """``fn`` (carry_to_crop or online_prediction_to_crop) with the flip or the crop offset left out."""
    import inspect

    signature = inspect.signature(fn)

    def carry(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        if kind == "no_flip":
            bound.arguments["flip"] = torch.zeros_like(torch.as_tensor(bound.arguments["flip"]))
        else:  # the crop's size, but at offset 0
            box = torch.as_tensor(bound.arguments["crop_box"]).clone()
            box[..., 1] -= box[..., 0]
            box[..., 0] = 0
            box[..., 3] -= box[..., 2]
            box[..., 2] = 0
            bound.arguments["crop_box"] = box
        return fn(*bound.args, **bound.kwargs)

    return carry


def run_passes(stage, it: int, batch: tuple) -> dict[str, torch.Tensor]:
    """Every pass of ``stage.step`` in order, forward only (a stand-in for the trainer's
    ``ForwardBackward`` that back-propagates nothing); the losses of all passes, keyed
    ``<pass index>/<name>``."""
    from engine.optim import autocast

    losses: dict[str, torch.Tensor] = {}
    passes = 0

    def forward_only(objective_pass, *inputs, last: bool = False):
        nonlocal passes
        with autocast(stage.args, stage.env.device):
            pass_losses, handed_on = stage.model(objective_pass, *inputs)
        losses.update({f"{passes}/{name}": v for name, v in pass_losses.items()})
        passes += 1
        return handed_on

    stage.step(it, batch, forward_only)
    return losses


def in_process_accuracies(flags: list[str], resume: Path, snapshot: Path, iterations: int) -> list[float]:
    """Phase2Stage.step (forward only) on the wiring data: pseudo_acc of each iteration."""
    from stages.options import parse_args
    from stages.phase2 import Phase2Stage
    from utils.distributed import DistEnv

    args = parse_args("phase2", "test", [*flags, "--resume", str(resume), "--snapshot-dir", str(snapshot)])
    stage = Phase2Stage(args, DistEnv())
    stage.build()
    assert stage.pseudo_monitor is not None
    batches = stage.batches(0)
    accs = []
    with torch.no_grad():
        for it in range(iterations):
            run_passes(stage, it, next(batches))
            accs.append(stage.pseudo_monitor.collect()["pseudo_acc"])
    return accs


@pytest.mark.parametrize("kind", ["right", "no_flip", "no_crop_offset"])
def test_wiring_test_catches_a_miswired_carry(kind, wiring_data, sourceonly_ckpt, tmp_path, monkeypatch) -> None:
    """The same criterion holds with the real carry functions and fails far below when the flip or
    the crop offset is not applied to the carried soft label and prediction."""
    from stages import phase2

    if kind != "right":
        for name in ("carry_to_crop", "online_prediction_to_crop"):
            monkeypatch.setattr(phase2, name, broken(kind, getattr(phase2, name)))
    accs = in_process_accuracies(wiring_data["flags"], sourceonly_ckpt, tmp_path, WIRING_ITERATIONS)
    print(f"pseudo_acc per iteration ({kind}):", accs)
    if kind == "right":
        assert wiring_holds(accs), accs
    else:
        assert not wiring_holds(accs) and min(accs) < 0.7, accs  # far below the 0.9 floor


# ---------------------------------------------------------------------------- monitoring only
@pytest.mark.parametrize("script", ["phase1", "phase2"])
def test_ground_truth_never_reaches_a_loss(script, wiring_data, sourceonly_ckpt, tmp_path) -> None:
    """One iteration with and without --no_pseudo_eval: the same losses, bit for bit (forward only)."""
    from stages.options import parse_args
    from stages.phase1 import Phase1Stage
    from stages.phase2 import Phase2Stage
    from utils.distributed import DistEnv

    stage_class = Phase1Stage if script == "phase1" else Phase2Stage
    flags = wiring_data["flags"] if script == "phase2" else wiring_data["flags"][: wiring_data["flags"].index(
        "--soft_labels_folder")] + ["--num-workers", "0", "--batch-size", "2"]
    results = []
    for extra in ([], ["--no_pseudo_eval"]):
        (tmp_path / script).mkdir(exist_ok=True)
        args = parse_args(script, "test", [*flags, *extra, "--resume", str(sourceonly_ckpt), "--num-steps", "1",
                                           "--num-steps-stop", "1", "--snapshot-dir", str(tmp_path / script)])
        torch.manual_seed(0)
        stage = stage_class(args, DistEnv())
        stage.build()
        batches = stage.batches(0)
        batch = next(batches)
        with torch.no_grad():
            losses = run_passes(stage, 0, batch)
        results.append((losses, stage.pseudo_monitor, "label" in batch[1]))
    (with_gt, monitor, has_label), (without, no_monitor, no_label) = results
    assert monitor is not None and has_label and no_monitor is None and not no_label
    assert monitor.collect()["pseudo_acc_pixels"] > 0
    assert sorted(with_gt) == sorted(without)
    for key in with_gt:
        assert torch.equal(with_gt[key], without[key]), key


def test_ground_truth_is_all_or_nothing(wiring_data, tmp_path) -> None:
    import logging
    import shutil
    from types import SimpleNamespace

    from datasets.cityscapes import CityscapesDataset
    from datasets.transforms import JointAugment
    from stages.pseudo_quality import make_monitor
    from utils.distributed import DistEnv

    city = tmp_path / "cityscapes"
    shutil.copytree(wiring_data["root"] / "cityscapes", city)
    aug = JointAugment(resize=IMG_W, crop_wh=(96, 48))
    full = CityscapesDataset(city, "train", img_size=(IMG_W, IMG_H), augment=aug, train_labels=True)
    assert full.has_labels and full.labels_missing == 0
    sample = full[(0, 1)]
    # the label went through the image's resize, crop and flip: road left of the (moved) middle
    assert sample["label"].shape == (48, 96) and sample["label"].dtype == torch.uint8
    plain = CityscapesDataset(city, "train", img_size=(IMG_W, IMG_H), augment=aug)
    assert not plain.has_labels and "label" not in plain[(0, 1)]
    assert torch.equal(plain[(0, 1)]["img"], sample["img"])  # same draws with or without the label
    next(city.glob("gtFine/train/*/*.png")).unlink()
    partial = CityscapesDataset(city, "train", img_size=(IMG_W, IMG_H), augment=aug, train_labels=True)
    assert not partial.has_labels and partial.labels_missing == 1 and "label" not in partial[(0, 1)]
    messages = []
    log = SimpleNamespace(info=lambda msg, *a: messages.append(msg % a))
    assert make_monitor(partial, 19, IGNORE, DistEnv(), log) is None
    assert "1 of 4 train images have no gtFine label" in messages[-1]
    assert make_monitor(full, 19, IGNORE, DistEnv(), logging.getLogger("test")) is not None
    assert make_monitor(full, 19, IGNORE, DistEnv(), log, no_pseudo_eval=True) is None
    assert "--no_pseudo_eval" in messages[-1]


# ---------------------------------------------------------------------------- threshold report
def test_threshold_report_counts_kept_pixels(tmp_path: Path) -> None:
    from stages.offline_thresholds import _softmax_max, compute_thresholds, format_report

    rng = np.random.default_rng(3)
    arrays = []
    for i in range(4):
        logits = np.round(rng.standard_normal((19, 7, 9)) * 2).astype(np.float32)  # ties at the thresholds
        logits[5] = -50.0  # class 5 (pole) never wins
        logits[0, :2] = 40.0  # probability 1.0 for road on two rows: ties at 1.0
        np.save(tmp_path / f"f{i}.npy", logits)
        arrays.append(logits)
    report: dict = {}
    with pytest.warns(UserWarning, match="never predicted"):
        thr = compute_thresholds(str(tmp_path), 0.8, progress=False, report=report)
    pairs = [_softmax_max(a) for a in arrays]
    cls = np.concatenate([c.reshape(-1) for c, _ in pairs])
    prob = np.concatenate([p.reshape(-1).copy() for _, p in pairs])
    for c in range(19):
        assert report["pixels"][c] == (cls == c).sum()
        assert report["kept"][c] == ((cls == c) & (prob >= thr[c])).sum(), c
    assert report["pixels"][5] == 0 and report["kept"][5] == 0
    assert report["kept"][0] > 0.8 * report["pixels"][0] + 1  # the ties at 1.0 are all kept
    text = format_report(thr, report, 0.8)
    assert "0 (road)" in text and "5 (pole)" in text and text.splitlines()[-1].startswith("all")


def test_whole_image_prediction_follows_the_crop(wiring_data, sourceonly_ckpt, tmp_path, monkeypatch) -> None:
    """The phase-2 step hands the fusion the network's whole-image prediction in the crop's frame:
    upsampled to the crop size, softmax, resized to the drawn size, cropped with the drawn box and
    flipped when the sample was flipped, each written out here with ``F.interpolate`` and slicing.
    The soft-label wiring test cannot see this map (its large one-hot soft labels decide the fused
    label), so a flip or crop box missing at the call site would pass it; this test fails then."""
    from stages import phase2
    from stages.options import parse_args
    from utils.distributed import DistEnv

    seen: dict = {}
    real_carry, real_fuse = phase2.online_prediction_to_crop, phase2.fuse_pseudo_labels

    def carry(logits, *rest, **kw):
        seen["logits"] = logits.detach().clone()
        return real_carry(logits, *rest, **kw)

    def fuse(pred_crop, soft_crop, *rest, **kw):
        seen["pred_crop"] = pred_crop.detach().clone()
        return real_fuse(pred_crop, soft_crop, *rest, **kw)

    monkeypatch.setattr(phase2, "online_prediction_to_crop", carry)
    monkeypatch.setattr(phase2, "fuse_pseudo_labels", fuse)
    args = parse_args("phase2", "test", [*wiring_data["flags"], "--resume", str(sourceonly_ckpt),
                                         "--snapshot-dir", str(tmp_path)])
    stage = phase2.Phase2Stage(args, DistEnv())
    stage.build()
    batches = stage.batches(0)
    flips = 0
    with torch.no_grad():
        for it in range(4):
            batch = next(batches)
            run_passes(stage, it, batch)
            tgt = batch[1]
            crop_hw = tuple(tgt["img"].shape[-2:])
            for i in range(tgt["img"].shape[0]):
                h, w = (int(v) for v in tgt["resized_hw"][i])
                ys, ye, xs, xe = (int(v) for v in tgt["crop_box"][i])
                p = F.interpolate(seen["logits"][i:i + 1].float(), size=crop_hw, mode="bilinear",
                                  align_corners=True).softmax(1)
                p = F.interpolate(p, size=(h, w), mode="bilinear", align_corners=True)[..., ys:ye, xs:xe]
                if bool(tgt["flip"][i]):
                    p = torch.flip(p, dims=(3,))
                    flips += 1
                torch.testing.assert_close(seen["pred_crop"][i], p[0], rtol=0, atol=1e-5)
    assert flips > 0, "no flipped sample was drawn: the check of the flip did not run"
