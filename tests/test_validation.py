"""Validation and evaluation (docs/METHOD.md sections 3 and 7): test-time augmentation (scales and
flips) against an independent computation, the original's validation loss ``loss_val``, and the
cadence and tags of the training scalars in tensorboard."""

from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from engine.trainer import Stage, Trainer
from engine.validation import EvalSettings, compute_miou, evaluate, tta_probabilities
from stages.phase1 import Phase1Stage
from stages.phase2 import Phase2Stage
from tests.conftest import run_script
from tests.helpers import LABEL_ID_OF_TRAIN_ID, filled_phase1_checkpoint
from utils.distributed import DistEnv

IGNORE = 250


def small_net(seed: int = 0) -> nn.Module:
    """A small convolutional net with 19 output channels at a quarter of the input size: random
    (seeded) weights, so its output is not mirror-symmetric, and the last layer scaled up."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(4), nn.Conv2d(8, 19, 3, padding=1))
    with torch.no_grad():
        net[3].weight.mul_(30.0)  # logits of a few units: softmaxes far from uniform
    return net


def eval_args(**kw) -> EvalSettings:
    base = {"num_classes": 19, "ignore_label": IGNORE, "quiet": True, "channels_last": False, "inference_amp": "off"}
    return EvalSettings(**{**base, **kw})


def asymmetric_batch(n: int, hw: tuple[int, int] = (32, 64), seed: int = 1, ignored: tuple[float, ...] = ()) -> dict:
    """``n`` random uint8 images (left and right halves differ) with random labels; image ``i``
    has a fraction ``ignored[i]`` of its label pixels set to the ignore label."""
    g = np.random.default_rng(seed)
    img = g.integers(0, 256, (n, 3, *hw), dtype=np.uint8)
    img[..., : hw[1] // 2] //= 3  # darker left half: clearly not left-right symmetric
    label = g.integers(0, 19, (n, *hw)).astype(np.uint8)
    for i, frac in enumerate(ignored):
        label[i].reshape(-1)[: int(frac * hw[0] * hw[1])] = IGNORE
    return {"img": torch.from_numpy(img), "label": torch.from_numpy(label)}


def reference_scores(net: nn.Module, img: np.ndarray, out_hw: tuple[int, int], scales, flip: bool,
                     flip_back_axis: int | None = -1) -> np.ndarray:
    """The softmax average of docs/METHOD.md section 7, written out per image with NumPy flips:
    for each scale, the image resized by the factor (bilinear, align_corners) and, with ``flip``,
    its mirror (NumPy ``[..., ::-1]``); the logits upsampled to ``out_hw``; a mirrored pass's
    logits mirrored back along ``flip_back_axis`` (the width, -1; the other axes only to show
    that the test tells them apart; ``None``: not flipped back); the softmaxes summed.
    Returns ``[N, 19, H, W]`` float64."""
    net.eval()
    out = []
    for one in img.astype(np.float32) / 255.0:
        total = np.zeros((19, *out_hw))
        for s in scales:
            x = torch.from_numpy(one)[None]
            if s != 1.0:
                x = F.interpolate(x, size=(int(one.shape[1] * s), int(one.shape[2] * s)), mode="bilinear",
                                  align_corners=True)
            for mirrored in (False, True) if flip else (False,):
                xi = torch.from_numpy(np.ascontiguousarray(x.numpy()[..., ::-1])) if mirrored else x
                with torch.no_grad():
                    logits = F.interpolate(net(xi), size=out_hw, mode="bilinear", align_corners=True)[0].numpy()
                if mirrored and flip_back_axis is not None:
                    logits = np.flip(logits, axis=flip_back_axis)
                e = np.exp(logits.astype(np.float64) - logits.max(0, keepdims=True))
                total += e / e.sum(0, keepdims=True)
        out.append(total)
    return np.stack(out)


def miou_of(preds: np.ndarray, labels: np.ndarray) -> float:
    """The original's mIoU (sum of intersections / (sum of unions + 1e-10), mean of 19), by hand."""
    inter, union = np.zeros(19), np.zeros(19)
    valid = labels != IGNORE
    for c in range(19):
        inter[c] = np.sum((preds == c) & (labels == c) & valid)
        union[c] = np.sum(((preds == c) & valid) | (labels == c))
    return float(np.mean(inter / (union + 1e-10)))


def wrong_flips(net, img, out_hw, scales) -> dict[str, np.ndarray]:
    return {"no flip back": reference_scores(net, img, out_hw, scales, True, flip_back_axis=None),
            "flipped back along the height": reference_scores(net, img, out_hw, scales, True, flip_back_axis=-2)}


# ---------------------------------------------------------------------------- test-time augmentation
def test_tta_scores_are_the_softmax_average_over_scales_and_flips() -> None:
    net, scales = small_net(), (0.75, 1.0)
    batch = asymmetric_batch(2)
    img = batch["img"].numpy()
    assert not np.array_equal(img, img[..., ::-1])
    want = reference_scores(net, img, (32, 64), scales, flip=True)
    with torch.no_grad():
        got = tta_probabilities(net.eval(), batch["img"].float() / 255, (32, 64), "off", torch.device("cpu"),
                                scales=scales, flip=True)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=0, atol=1e-5)
    for name, wrong in wrong_flips(net, img, (32, 64), scales).items():  # the check tells them apart
        assert np.abs(wrong - want).max() > 1e-2, name
        assert (wrong.argmax(1) != want.argmax(1)).mean() > 0.05, name


def test_compute_miou_with_flip_and_scales_predicts_the_softmax_average() -> None:
    net, scales = small_net(), (0.75, 1.0)
    batches = [asymmetric_batch(2, seed=3), asymmetric_batch(1, seed=4)]
    seen: list[np.ndarray] = []
    _, miou, _ = compute_miou(net, batches, DistEnv(), eval_args(), scales=scales, flip=True,
                              on_batch=lambda _b, pred: seen.append(pred.numpy()))
    img = np.concatenate([b["img"].numpy() for b in batches])
    labels = np.concatenate([b["label"].numpy() for b in batches])
    want = reference_scores(net, img, (32, 64), scales, flip=True)
    margin = np.diff(np.sort(want, axis=1)[:, -2:], axis=1)[:, 0]
    preds = np.concatenate(seen)
    clear = margin > 1e-4  # leave out near-ties that float rounding may decide either way
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(preds[clear], want.argmax(1)[clear])
    assert miou == pytest.approx(miou_of(want.argmax(1), labels), abs=1e-6)
    for name, wrong in wrong_flips(net, img, (32, 64), scales).items():
        assert abs(miou_of(wrong.argmax(1), labels) - miou) > 1e-3, name


@pytest.mark.slow
def test_evaluate_py_flip_and_scales(tmp_path: Path) -> None:
    """``evaluate.py --flip --scales 0.75,1.0`` on generated Cityscapes val images: the saved
    predictions and the mIoU are those of the independent softmax average of the checkpoint's
    target branch."""
    from datasets.synthetic import generate
    from model import DecoupleNet

    size = (128, 64)
    roots = generate(tmp_path / "data", seed=5, size=size, num_source=2, num_target_train=1, num_target_val=3)
    root = Path(roots["cityscapes"])
    net = DecoupleNet(layer=1, decoupled=False, aux=False)
    ckpt = filled_phase1_checkpoint(DecoupleNet(layer=1))
    net.load_official(ckpt)
    path = tmp_path / "phase1.pth"
    torch.save(ckpt, path)
    results = tmp_path / "results.json"
    run_script(
        ["evaluate.py", "--cpu", "--quiet", "--resume", str(path), "--tgt_rootpath", str(root),
         "--tgt_img_size", f"{size[0]},{size[1]}", "--num-workers", "0", "--batch_size_val", "2",
         "--flip", "--scales", "0.75,1.0", "--snapshot-dir", str(tmp_path / "eval"),
         "--results_json", str(results), "--save_dir", str(tmp_path / "preds")],
    )
    result = json.loads(results.read_text())
    assert result["flip"] is True and result["scales"] == [0.75, 1.0]

    images = sorted((root / "leftImg8bit" / "val").rglob("*.png"))
    assert len(images) == 3
    img = np.stack([np.array(Image.open(p).convert("RGB")).transpose(2, 0, 1) for p in images])
    labels = []
    for p in images:
        rel = str(p.relative_to(root / "leftImg8bit" / "val")).replace("_leftImg8bit", "_gtFine_labelIds")
        ids = np.asarray(Image.open(root / "gtFine" / "val" / rel))
        train = np.full(ids.shape, IGNORE, dtype=np.int64)
        for train_id, label_id in enumerate(LABEL_ID_OF_TRAIN_ID):
            train[ids == label_id] = train_id
        labels.append(train)
    labels = np.stack(labels)
    want = reference_scores(net, img, labels.shape[-2:], (0.75, 1.0), flip=True)
    saved = np.stack([np.asarray(Image.open(tmp_path / "preds" / "trainid" / p.name)) for p in images])
    margin = np.diff(np.sort(want, axis=1)[:, -2:], axis=1)[:, 0]
    clear = margin > 1e-4
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(saved[clear], want.argmax(1)[clear])
    assert result["miou"] == pytest.approx(miou_of(want.argmax(1), labels), abs=1e-6)
    for name, wrong in wrong_flips(net, img, labels.shape[-2:], (0.75, 1.0)).items():  # the check tells them apart
        assert (wrong.argmax(1) != want.argmax(1))[clear].mean() > 0.01, name


# ---------------------------------------------------------------------------- the validation loss
def test_validation_loss_is_the_originals_average_over_images() -> None:
    """``loss_val``: the original's ``seg_loss`` (mean cross entropy over the batch's non-ignored
    pixels of the logits upsampled to the label) per batch, averaged with the batch sizes as
    weights (its AverageMeter); batches of 2 and 1 images with different ignored fractions, so
    that the weighting matters. A batch without a valid pixel is left out."""
    net = small_net(2)
    batches = [asymmetric_batch(2, seed=6, ignored=(0.1, 0.2)), asymmetric_batch(1, seed=7, ignored=(0.8,)),
               asymmetric_batch(1, seed=8, ignored=(1.0,))]
    net.eval()
    with torch.no_grad():  # the second batch's label: the net's own prediction (a much lower loss)
        pred = F.interpolate(net(batches[1]["img"].float() / 255), size=(32, 64), mode="bilinear",
                             align_corners=True).argmax(1)
    keep = batches[1]["label"] != IGNORE
    batches[1]["label"][keep] = pred[keep].to(torch.uint8)
    seg_loss = nn.CrossEntropyLoss(ignore_index=IGNORE)
    total, images, pixels_sum, pixels = 0.0, 0, 0.0, 0
    for b in batches[:2]:
        with torch.no_grad():
            out = F.interpolate(net(b["img"].float() / 255), size=(32, 64), mode="bilinear", align_corners=True)
        label = b["label"].long()
        loss = seg_loss(out, label)
        total += loss.item() * label.shape[0]
        images += label.shape[0]
        valid = int((label != IGNORE).sum())
        pixels_sum += loss.item() * valid
        pixels += valid
    want = total / images
    assert abs(want - pixels_sum / pixels) > 1e-3  # weighting by images, not by pixels, is what is checked
    result = evaluate(net, batches, DistEnv(), eval_args())
    assert result.loss == pytest.approx(want, rel=1e-6)
    assert np.isnan(evaluate(net, batches, DistEnv(), eval_args(), scales=(0.75,)).loss)  # no plain pass


# ---------------------------------------------------------------------------- tensorboard cadence and tags
class RecordingWriter:
    def __init__(self) -> None:
        self.scalars: dict[str, list[tuple[int, float]]] = {}

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.setdefault(tag, []).append((step, float(value)))


class _Bar:
    def set_postfix_str(self, _text: str) -> None:
        pass


@pytest.mark.parametrize("stage_cls, tags", [
    (Phase1Stage, ("loss_seg", "loss_adv_src", "loss_adv_tgt", "loss_D1", "loss_D2", "loss_st")),
    (Phase2Stage, ("loss_seg", "loss_src_seg")),
])
def test_training_scalars_every_10_iterations_under_the_original_tags(stage_cls, tags) -> None:
    """Iterations 0..24: the original's scalars (train_phase1.py / train_phase2.py ``scalar_info``)
    at steps 0, 10, 20 under its tags with the logged values, once each; our other logged values
    under ``train/``, the learning rates under ``lr/``."""
    class Minimal(Stage):  # the stage's tensorboard names, without building a network
        original_scalars = stage_cls.original_scalars

    args = Namespace(batch_size=1, amp="off", print_every=1000, num_steps=100)
    stage = Minimal(args, DistEnv())
    stage.optimizers = {"model": (torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), 0.1)}
    writer = RecordingWriter()
    trainer = Trainer(stage, writer, None)
    trainer.t0 = 0.0
    for it in range(25):
        logged = {name: float(it) + k / 10 for k, name in enumerate((*tags, "total", "pseudo_kept"))}
        record = trainer.log_iteration(it, logged, _Bar())
        assert record == logged
    expected = {name: [(s, s + k / 10) for s in (0, 10, 20)] for k, name in enumerate(tags)}
    expected["train/total"] = [(s, s + len(tags) / 10) for s in (0, 10, 20)]
    expected["train/pseudo_kept"] = [(s, s + (len(tags) + 1) / 10) for s in (0, 10, 20)]
    expected["lr/model"] = [(s, 0.1) for s in (0, 10, 20)]
    assert writer.scalars.keys() == expected.keys()
    for tag, want in expected.items():
        assert [step for step, _ in writer.scalars[tag]] == [step for step, _ in want], tag
        assert [v for _, v in writer.scalars[tag]] == pytest.approx([v for _, v in want]), tag
