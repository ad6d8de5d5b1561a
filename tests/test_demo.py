"""scripts/demo.py --quick: the whole pipeline end to end through the real scripts (a few minutes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.helpers import REPO

pytestmark = pytest.mark.slow  # runs the scripts end to end or a training loop (tests/README.md)

STAGES = ("source-only", "phase 1", "phase 2")


def _stat(path: str):
    return os.stat(path).st_mtime_ns if os.path.exists(path) else None


def test_demo_quick_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    repo_figure = os.path.join(REPO, "figs", "demo.png")
    repo_thresholds = [os.path.join(REPO, "soft_labels_thresholds_p0.8.npy"),
                       os.path.join(REPO, "datasets", "soft_labels_thresholds_p0.8.npy")]
    before = _stat(repo_figure)
    proc = subprocess.run([sys.executable, "scripts/demo.py", "--quick", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-4000:]

    # the printed table and the files
    assert "RANDOM" in proc.stdout  # says clearly that the backbone is not ImageNet-trained
    table = (out / "miou.md").read_text()
    for stage in STAGES:
        assert f"| {stage} |" in table and f"| {stage} |" in proc.stdout
    result = json.loads((out / "miou.json").read_text())
    assert list(result["stages"]) == list(STAGES)
    for stage in STAGES:
        r = result["stages"][stage]
        assert 0.0 <= r["miou"] <= 1.0 and len(r["iou"]) == 19
        assert os.path.isfile(out / "eval" / f"{stage.replace(' ', '').replace('-', '_')}.json")

    # every stage's product is where the next stage read it from
    assert sorted(os.listdir(out / "soft_labels")) and all(n.endswith(".npy") for n in os.listdir(out / "soft_labels"))
    thresholds = np.load(out / "soft_labels_thresholds_p0.8.npy")
    assert thresholds.shape == (19,)
    for folder in ("source_only", "phase1", "phase2"):
        assert not (out / "runs" / folder / "latest.pth").exists()  # removed at the end (large)

    # pseudo-label accuracy of every stage that trains on pseudo labels (synthetic data has train ground truth)
    assert "pseudo-label accuracy (%)" in table and "| soft labels |" in table
    pseudo = result["pseudo_labels"]
    for stage in ("phase 1", "phase 2"):
        p = pseudo[stage]
        assert p is not None and 0.0 <= p["acc"] <= 1.0 and 0.0 <= p["kept"] <= 1.0, (stage, p)
        assert len(p["per_iteration"]) == result["stages"][stage]["steps"]
    assert 0.0 <= pseudo["soft labels"]["acc"] <= 1.0 and 0.0 <= pseudo["soft labels"]["miou"] <= 1.0
    # the diagnostic phase-2 run with learning rate 0 (only the BatchNorm statistics move)
    bn_only = result["diagnostics"]["phase 2 BN-only"]
    assert 0.0 <= bn_only["miou"] <= 1.0 and "| phase 2 BN-only |" in table
    assert json.loads((out / "runs" / "phase2_bn_only" / "phase2_args.json").read_text())["learning_rate"] == 0

    # figure: bar chart + one sample row
    with Image.open(out / "demo.png") as im:
        assert im.mode == "RGB" and im.width >= 1000 and im.height >= 400

    # nothing written into the repository
    assert _stat(repo_figure) == before
    assert not any(os.path.exists(p) for p in repo_thresholds)


def _load_demo():
    import importlib.util
    import sys

    if "demo_script" not in sys.modules:  # (registered first: its dataclasses look their module up)
        spec = importlib.util.spec_from_file_location("demo_script", os.path.join(REPO, "scripts", "demo.py"))
        demo = importlib.util.module_from_spec(spec)
        sys.modules["demo_script"] = demo
        spec.loader.exec_module(demo)
    return sys.modules["demo_script"]


def test_soft_label_accuracy_scores_argmax_against_ground_truth(synthetic_data, tmp_path):
    """Soft labels made from the ground truth score 1; upside-down ones (sky on the road) far lower."""
    import torch

    from datasets.cityscapes import CityscapesDataset, soft_label_name
    from datasets.gta5 import read_label_ids
    from datasets.labels import encode_labels
    from stages.pseudo_quality import ground_truth_at_logits

    demo = _load_demo()
    data = os.path.dirname(synthetic_data["cityscapes"])
    ds = CityscapesDataset(synthetic_data["cityscapes"], split="train", img_size=(64, 64))
    good, flipped = tmp_path / "good", tmp_path / "flipped"
    good.mkdir()
    flipped.mkdir()
    for path in ds.files:
        gt = torch.from_numpy(encode_labels(read_label_ids(ds.label_path(path))).astype(np.int64))
        h, w = gt.shape
        at = ground_truth_at_logits(gt, ((h + 7) // 8, (w + 7) // 8)).numpy()
        logits = np.zeros((19, *at.shape), np.float32)
        for c in range(19):
            logits[c][at == c] = 10.0
        np.save(good / soft_label_name(path), logits)
        np.save(flipped / soft_label_name(path), logits[:, ::-1, :].copy())
    assert demo.soft_label_accuracy(data, str(good)) == 1.0
    assert demo.soft_label_accuracy(data, str(flipped)) < 0.5
    (tmp_path / "empty").mkdir()
    assert demo.soft_label_accuracy(data, str(tmp_path / "empty")) is None
