"""evaluate.py's mIoU against the Cityscapes benchmark rule (cityscapesScripts, pixel level).

``cityscapesscripts`` (the official evaluation package) is a test-only dependency
(``requirements-dev.txt``, installed by ``scripts/test.sh``; it pulls in matplotlib, requests,
pyquaternion, coloredlogs and more, so the project itself does not need it). Its comparison is
skipped where it is not installed (a failure in CI, where ``CI`` is set); this file also carries
an independent reference implementation of its pixel-level rule
(``evalPixelLevelSemanticLabeling.py``), always run:

* a confusion matrix ``M[gt_id, pred_id]`` over Cityscapes **label ids** 0..33, counting every
  pixel;
* for each class that is not ``ignoreInEval``: ``TP = M[c, c]``, ``FN = row sum - TP``,
  ``FP = sum of column c over the rows of the non-ignored classes other than c`` (pixels whose
  ground truth is void or another ignored id do not count as false positives);
  ``IoU = TP / (TP + FP + FN)``, NaN when the denominator is 0;
* the class average is the mean over the classes whose IoU is not NaN.

evaluate.py averages over all 19 classes (a class absent everywhere counts as 0, as the
original), so the data are built such that every class appears in the ground truth and in
the predictions; then both rules must give the same numbers. The official code is run on the
same files when ``cityscapesscripts`` is importable; in CI (``CI`` set) its absence is a failure.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import REPO, filled_phase1_checkpoint

pytestmark = pytest.mark.slow  # runs the scripts end to end or a training loop (tests/README.md)

# cityscapesScripts helpers/labels.py: (name, id, ignoreInEval) for every id >= 0
CITYSCAPES_LABELS = [
    ("unlabeled", 0, True), ("ego vehicle", 1, True), ("rectification border", 2, True),
    ("out of roi", 3, True), ("static", 4, True), ("dynamic", 5, True), ("ground", 6, True),
    ("road", 7, False), ("sidewalk", 8, False), ("parking", 9, True), ("rail track", 10, True),
    ("building", 11, False), ("wall", 12, False), ("fence", 13, False), ("guard rail", 14, True),
    ("bridge", 15, True), ("tunnel", 16, True), ("pole", 17, False), ("polegroup", 18, True),
    ("traffic light", 19, False), ("traffic sign", 20, False), ("vegetation", 21, False),
    ("terrain", 22, False), ("sky", 23, False), ("person", 24, False), ("rider", 25, False),
    ("car", 26, False), ("truck", 27, False), ("bus", 28, False), ("caravan", 29, True),
    ("trailer", 30, True), ("train", 31, False), ("motorcycle", 32, False), ("bicycle", 33, False),
]
IGNORED = {i for _, i, ign in CITYSCAPES_LABELS if ign}
EVAL_IDS = [i for _, i, ign in CITYSCAPES_LABELS if not ign]
NAME_OF = {i: n for n, i, _ in CITYSCAPES_LABELS}
TRAIN_ID_TO_LABEL_ID = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
SIZE = (128, 64)


def reference_confusion(pairs) -> np.ndarray:
    """Confusion matrix over label ids 0..33 of ``(pred_label_ids, gt_label_ids)`` arrays."""
    m = np.zeros((34, 34), dtype=np.int64)
    for pred, gt in pairs:
        gt = np.asarray(gt, dtype=np.int64).reshape(-1)
        pred = np.asarray(pred, dtype=np.int64).reshape(-1)
        assert gt.min() >= 0 and gt.max() <= 33, "unknown ground-truth label id"
        assert pred.min() >= 0 and pred.max() <= 33, "unknown predicted label id"
        m += np.bincount(gt * 34 + pred, minlength=34 * 34).reshape(34, 34)
    return m


def reference_scores(m: np.ndarray) -> tuple[dict[str, float], float]:
    """Per-class IoU (NaN where undefined) and the NaN-excluding class average."""
    scores = {}
    for c in EVAL_IDS:
        tp = m[c, c]
        fn = m[c, :].sum() - tp
        rows = [r for r in EVAL_IDS if r != c]
        fp = m[rows, c].sum()
        denom = tp + fp + fn
        scores[NAME_OF[c]] = float("nan") if denom == 0 else float(tp) / float(denom)
    valid = [v for v in scores.values() if not np.isnan(v)]
    return scores, float(np.mean(valid)) if valid else float("nan")


def test_reference_rule_by_hand():
    # gt: road road | void(0) car ; pred: road car | car car
    gt = np.array([[7, 7], [0, 26]])
    pred = np.array([[7, 26], [26, 26]])
    scores, mean = reference_scores(reference_confusion([(pred, gt)]))
    assert scores["road"] == pytest.approx(1 / 2)  # TP 1, FN 1 (predicted car), FP 0
    assert scores["car"] == pytest.approx(1 / 2)  # TP 1, FP 1 (on road); the void pixel is not an FP
    assert np.isnan(scores["sky"])
    assert mean == pytest.approx(0.5)  # NaN classes are left out of the mean


def _calibrated_biases(logits: torch.Tensor, per_class: int = 30) -> torch.Tensor:
    """Class biases with which every class wins (by a clear margin) on at least ``per_class`` pixels.

    Repeatedly lifts the bias of a class below the quota just enough for it to win its
    ``per_class``-th most favourable pixel. Adding a bias before the bilinear upsampling equals
    adding it after (the interpolation weights sum to 1).
    """
    c = logits.shape[1]
    flat = logits.permute(1, 0, 2, 3).reshape(c, -1).double()
    margin = 1e-3 * float(flat.std())
    b = torch.zeros(c, dtype=torch.float64)
    for _ in range(1000):
        s = flat + b[:, None]
        top2 = s.topk(2, dim=0)
        clear = (top2.values[0] - top2.values[1]) >= margin
        wins = torch.bincount(top2.indices[0][clear], minlength=c)
        short = (wins < per_class).nonzero().flatten().tolist()
        if not short:
            return b
        k = short[0]
        others = torch.cat([s[:k], s[k + 1:]]).max(0).values
        b[k] = (others - flat[k]).kthvalue(per_class).values + 2 * margin
    raise AssertionError("could not make every class win somewhere")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """evaluate.py on synthetic val data where every class is in the ground truth and the predictions."""
    from datasets.cityscapes import CityscapesDataset
    from datasets.synthetic import generate
    from model import DecoupleNet

    out = tmp_path_factory.mktemp("cs_eval")
    generate(out / "data", seed=11, size=SIZE, num_source=2, num_target_train=1, num_target_val=10)
    root = out / "data" / "cityscapes"
    ds = CityscapesDataset(str(root), split="val", img_size=SIZE)
    present = set()
    for i in range(len(ds)):
        present |= set(np.unique(ds[i]["label"].numpy()).tolist())
    assert set(range(19)) <= present, f"synthetic val ground truth lacks classes {set(range(19)) - present}"

    net = DecoupleNet(layer=1)
    ckpt = filled_phase1_checkpoint(net)
    net.load_official(ckpt)
    net.eval()
    with torch.no_grad():
        logits = torch.cat([
            torch.nn.functional.interpolate(net(ds[i]["img"][None].float() / 255), size=ds[i]["label"].shape,
                                            mode="bilinear", align_corners=True)
            for i in range(len(ds))
        ])
    bias = _calibrated_biases(logits)
    ckpt["classifier_state_dict"]["bias"] = ckpt["classifier_state_dict"]["bias"] + bias.float()
    path = out / "phase1_calibrated.pth"
    torch.save(ckpt, path)

    results = out / "results.json"
    proc = subprocess.run(
        [sys.executable, "evaluate.py", "--cpu", "--quiet", "--resume", str(path), "--tgt_rootpath", str(root),
         "--tgt_img_size", f"{SIZE[0]},{SIZE[1]}", "--num-workers", "0", "--batch_size_val", "3",
         "--snapshot-dir", str(out / "eval"), "--results_json", str(results), "--save_dir", str(out / "preds")],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    pred_files, gt_files = [], []
    for image_path in ds.files:
        name = image_path.rsplit("/", 1)[-1]
        pred_files.append(out / "preds" / "trainid" / name)
        gt_files.append(ds.label_path(image_path))
    path.unlink()
    return json.loads(results.read_text()), pred_files, gt_files, out


def _label_id_prediction(pred_file) -> np.ndarray:
    train_ids = np.asarray(Image.open(pred_file))
    assert train_ids.max() < 19
    return np.asarray(TRAIN_ID_TO_LABEL_ID, dtype=np.uint8)[train_ids]


def test_evaluate_matches_cityscapes_pixel_rule(evaluated):
    result, pred_files, gt_files, _ = evaluated
    pairs = [(_label_id_prediction(p), np.asarray(Image.open(g))) for p, g in zip(pred_files, gt_files)]
    predicted = set()
    for pred, _ in pairs:
        predicted |= set(np.unique(pred).tolist())
    assert predicted == set(EVAL_IDS), "every class must be predicted somewhere for the two rules to agree"
    assert any(np.isin(gt, list(IGNORED)).any() for _, gt in pairs), "the data should hold void pixels"

    scores, mean = reference_scores(reference_confusion(pairs))
    assert not any(np.isnan(v) for v in scores.values())
    ours = {name.replace("_", " "): v for name, v in result["iou"].items()}
    assert set(ours) == set(scores)
    for name, v in scores.items():
        assert ours[name] == pytest.approx(v, abs=1e-9), name
    assert result["miou"] == pytest.approx(mean, abs=1e-9)
    assert 0.0 < mean < 1.0


def require_cityscapesscripts() -> None:
    """Skip where the official package is missing, except in CI (``CI`` set, as CI services do):
    there this independent comparison must run, so its absence fails the test."""
    if importlib.util.find_spec("cityscapesscripts") is not None:
        return
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail("cityscapesscripts is not installed but CI is set: the comparison with the official "
                    "Cityscapes evaluation must run in CI (pip install -r requirements-dev.txt)")
    pytest.skip("cityscapesscripts not installed (requirements-dev.txt); the reference rule above is still checked")


def test_evaluate_matches_official_cityscapesscripts(evaluated):
    require_cityscapesscripts()
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as cs

    result, pred_files, gt_files, out = evaluated
    lists = []  # the label-id PNGs evaluate.py --save_dir writes for cityscapesScripts
    for p in pred_files:
        label_ids = out / "preds" / "labelid" / p.name
        np.testing.assert_array_equal(np.asarray(Image.open(label_ids)), _label_id_prediction(p))
        lists.append(str(label_ids))
    cs.args.evalInstLevelScore = False
    cs.args.JSONOutput = False
    cs.args.quiet = True
    official = cs.evaluateImgLists(lists, [str(g) for g in gt_files], cs.args)
    ours = {name.replace("_", " "): v for name, v in result["iou"].items()}
    for name, v in ours.items():
        assert official["classScores"][name] == pytest.approx(v, abs=1e-9), name
    assert official["averageScoreClasses"] == pytest.approx(result["miou"], abs=1e-9)
