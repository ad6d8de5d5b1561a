"""scripts/demo.py --quick: the whole pipeline end to end through the real scripts (a few minutes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from tests.helpers import REPO

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

    # figure: bar chart + one sample row
    with Image.open(out / "demo.png") as im:
        assert im.mode == "RGB" and im.width >= 1000 and im.height >= 400

    # nothing written into the repository
    assert _stat(repo_figure) == before
    assert not any(os.path.exists(p) for p in repo_thresholds)
