"""scripts/demo.py --quick: ``pipeline.py recipes/demo.yaml`` at tiny sizes, then the figure drawn
from its report.json (a few minutes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from tests.helpers import REPO


def _stat(path: str):
    return os.stat(path).st_mtime_ns if os.path.exists(path) else None


@pytest.mark.slow
def test_demo_quick_runs_the_pipeline_and_draws_the_report(tmp_path):
    out = tmp_path / "demo"
    repo_figure = os.path.join(REPO, "figs", "demo.png")
    before = _stat(repo_figure)
    proc = subprocess.run([sys.executable, "scripts/demo.py", "--quick", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=900, check=False,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-4000:]
    assert "demo: python3 pipeline.py recipes/demo.yaml" in proc.stdout.replace(REPO + os.sep, "")
    report = json.loads((out / "report.json").read_text())
    for stage in ("source_only", "phase1", "phase2"):
        e = report["stages"][f"{stage}/final"]
        assert e["n"] == 1 and 0.0 <= e["miou_mean"] <= 100.0 and len(e["iou_mean"]) == 19
        assert not (out / "seed_1234" / stage / "latest.pth").exists()  # --drop_states: the large state goes
        assert (out / "seed_1234" / stage / f"{stage}_args.json").is_file()
    assert set(report["pseudo_labels"]) == {"phase1", "phase2"}
    assert "| phase2/final |" in (out / "report.md").read_text() and "| phase2/final |" in proc.stdout
    with Image.open(out / "demo.png") as im:  # bar chart + one sample row
        assert im.mode == "RGB" and im.width >= 1000 and im.height >= 400
    assert _stat(repo_figure) == before  # a --quick run leaves figs/demo.png alone


def test_tiny_recipe_is_the_demo_recipe_at_tiny_sizes():
    """tests/data/tiny_recipe.yaml (the pipeline tests') keeps the demo recipe's stages and flags;
    only sizes, image counts and iteration counts differ."""
    from runner.recipe import load_recipe

    demo = load_recipe(os.path.join(REPO, "recipes", "demo.yaml"))
    tiny = load_recipe(os.path.join(REPO, "tests", "data", "tiny_recipe.yaml"))
    sizes = {"--size", "--num_source", "--num_target_train", "--num_target_val", "--src_img_size", "--tgt_img_size",
             "--resize", "--rcrop", "--num-steps", "--num-steps-stop", "--save-pred-every"}
    assert [(s.name, s.kind, s.script, list(s.flags), s.args, s.checkpoints) for s in demo.stages] == \
        [(s.name, s.kind, s.script, list(s.flags), s.args, s.checkpoints) for s in tiny.stages]
    assert list(demo.common) == list(tiny.common) and demo.device == tiny.device
    for a, b in zip(demo.stages, tiny.stages):
        assert {k: v for k, v in a.flags.items() if k not in sizes} == {k: v for k, v in b.flags.items() if k not in sizes}
    assert {k: v for k, v in demo.common.items() if k not in sizes} == \
        {k: v for k, v in tiny.common.items() if k not in sizes}
