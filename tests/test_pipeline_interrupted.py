"""``pipeline.py`` interrupted (docs/PIPELINE.md): killed at three random moments, or stopped by a
SIGTERM in the middle of phase 1, the same command then finishes bit-identical to an uninterrupted
run of the tiny demo recipe (``tests/data/tiny_recipe.yaml``, one seed). A module of its own, so
that its runs and tests/test_pipeline.py's two-seed run are not on disk together (tests/conftest.py)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO
from tests.test_pipeline import TINY, load_json, pipeline


def numbers(report: Path) -> dict[str, dict]:
    """Every stage's entry of ``report`` but the paths of its checkpoints (in another run folder)."""
    return {key: {k: v for k, v in e.items() if k != "checkpoints"} for key, e in load_json(report)["stages"].items()}


@pytest.fixture(scope="module")
def one_seed(tmp_path_factory) -> Path:
    """The tiny demo recipe, seed 1235, run to the end without interruption."""
    out = tmp_path_factory.mktemp("pipeline_reference") / "run"
    pipeline(TINY, "--out", str(out), "--seeds", "1235", "--quiet", "--drop_states")
    return out


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _same_checkpoints(a: Path, b: Path) -> None:
    from tests.conftest import assert_same_state

    for rel in ("source_only/sourceonly.pth", "phase1/GTA5_4.pth", "phase2/GTA5_4.pth"):
        assert_same_state(_state(a / rel), _state(b / rel), rel)
    for npy in sorted((a / "soft_labels" / "labels").iterdir()):
        assert npy.read_bytes() == (b / "soft_labels" / "labels" / npy.name).read_bytes(), npy.name
    t = "thresholds/thresholds_p0.8.npy"
    assert (a / t).read_bytes() == (b / t).read_bytes()


KILL_STAGES = ["source_only", "phase1", "soft_labels", "phase2"]


@pytest.mark.slow
def test_killed_three_times_at_random_moments_finishes_bit_identical(one_seed, tmp_path):
    """SIGKILL to the runner's whole process group at three random moments, then the same command
    to the end: every checkpoint, soft label, threshold and reported number equals the
    uninterrupted run's (``one_seed``)."""
    out = tmp_path / "killed"
    argv = [sys.executable, "pipeline.py", TINY, "--out", str(out), "--seeds", "1235", "--quiet", "--drop_states"]
    rng = random.Random(23)
    kills = 0
    seen: list[str] = []
    # The moments are random within three of the four long stages, in order (not seconds from the
    # start, which a faster machine would outrun): once the stage's folder appears, 0-4 s more.
    for stage in sorted(rng.sample(KILL_STAGES, 3), key=KILL_STAGES.index):
        proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        deadline = time.time() + 600
        while not (out / "seed_1235" / stage).is_dir() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(rng.uniform(0, 4))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            kills += 1
        text = proc.communicate()[0]
        seen += [ln for ln in text.splitlines() if "continues" in ln]
    assert kills == 3, "the run finished before it could be killed three times"
    done = pipeline(TINY, "--out", str(out), "--seeds", "1235", "--quiet", "--drop_states").stdout
    assert seen or "continues" in done  # at least one stage was found interrupted and continued
    _same_checkpoints(one_seed / "seed_1235", out / "seed_1235")
    assert numbers(out / "report.json") == numbers(one_seed / "report.json")


@pytest.mark.slow
def test_sigterm_to_the_runner_stops_the_stage_at_an_iteration_and_the_rerun_continues(one_seed, tmp_path):
    """SIGTERM to the runner while phase 1 trains: passed on to the stage, which saves latest.pth and
    exits 3 (docs/RELIABILITY.md); the runner stops with one line saying the same command continues;
    the rerun continues phase 1 from that latest.pth and ends bit-identical to the uninterrupted run
    (``one_seed``). Then ``--report`` compares the two run folders: equal, stage by stage."""
    out = tmp_path / "signalled"
    argv = [sys.executable, "pipeline.py", TINY, "--out", str(out), "--seeds", "1235", "--quiet", "--drop_states"]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    metrics = out / "seed_1235" / "phase1" / "metrics.jsonl"
    deadline = time.time() + 600
    while not (metrics.exists() and metrics.read_text().strip()) and time.time() < deadline:
        time.sleep(0.2)  # phase 1 has finished its first iteration
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 3, stdout[-3000:] + stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: seed_1235/phase1 stopped by signal SIGTERM") \
        and "the same pipeline.py command continues" in lines[0], lines
    assert _state(out / "seed_1235" / "phase1" / "latest.pth")["iteration"] < 4
    done = pipeline(TINY, "--out", str(out), "--seeds", "1235", "--quiet", "--drop_states").stdout
    assert "[seed_1235/phase1] was interrupted: continues" in done and "--resume_from auto" in done
    _same_checkpoints(one_seed / "seed_1235", out / "seed_1235")
    compared = pipeline("--report", str(one_seed), str(out)).stdout
    a = load_json(one_seed / "report.json")["stages"]
    assert numbers(out / "report.json") == numbers(one_seed / "report.json")
    rows = [ln.strip("| ").split(" | ") for ln in compared.splitlines() if ln.startswith(("| phase", "| source"))]
    assert [r[0] for r in rows[:6]] == list(a)
    for key, left, right, diff in rows[:6]:
        assert left == right == f"{a[key]['miou_mean']:.2f} (1)" and diff == "+0.00", (key, left, right, diff)
