"""Processes killed with SIGKILL at the worst moments, then continued: nothing lost, nothing partial.

Faults come from ``DECOUPLENET_FAULT`` (utils/faults.py). For phase 1 and phase 2 on the CPU
one run is killed, continued with ``--resume_from auto`` and killed again, at each of:

1. the middle of the first ``latest.pth`` write (before any training state exists),
2. the start of an iteration,
3. the middle of writing the best checkpoint ``GTA5_<it>_<miou>.pth``,
4. between writing ``latest.pth``'s temporary file and the rename,

then continued until it exits 0. After every kill there is a loadable ``latest.pth`` (or none
before the first save), no partial file under a final name, and at the end the checkpoints are
bit-identical to an uninterrupted run (fp32 on the CPU, one thread). generate_soft_label.py is
killed in the middle of its second file and rerun with ``--skip_existing``.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import IMG_H, IMG_W, assert_same_state, target_train_basenames
from tests.reliability.conftest import phase1_argv, phase2_argv
from tests.reliability.runner import temp_files

pytestmark = pytest.mark.slow  # runs the scripts end to end or a training loop (tests/README.md)

STEPS = 4
SCHEDULE = ["--batch-size", "1", "--num-steps", str(STEPS), "--num-steps-stop", str(STEPS),
            "--save-pred-every", "2", "--save_latest_every", "1", "--print-every", "1"]
MAX_RESTARTS = 3

# (fault, latest.pth iteration after the kill or None, a temporary file is expected to remain)
KILLS = [
    ("kill_mid_write:latest.pth", None, True),
    ("kill_at_iter:2", 2, False),
    ("kill_mid_write:GTA5_2_*.pth", 2, True),
    ("kill_before_rename:latest.pth:2", 3, True),
]


def load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def metrics_by_iter(snapshot: Path) -> dict[int, dict]:
    """The last line logged for each iteration (a continued run appends the redone ones)."""
    with open(snapshot / "metrics.jsonl", encoding="utf-8") as f:
        return {m["iter"]: m for m in (json.loads(line) for line in f if line.strip())}


def argv_for(phase: str, data, soft, ckpt: Path, snapshot: Path) -> list:
    if phase == "phase1":
        return phase1_argv(data, ckpt, snapshot, *SCHEDULE, "--resume_from", "auto")
    return phase2_argv(data, *soft, ckpt, snapshot, *SCHEDULE, "--resume_from", "auto")


PHASES = ("phase1", "phase2")


def observe(snapshot: Path, result) -> dict:
    """What a killed run left behind."""
    seen = {"result": result, "latest": None, "temps": temp_files(snapshot), "partial": []}
    if (snapshot / "latest.pth").exists():
        try:
            seen["latest"] = int(load(snapshot / "latest.pth")["iteration"])
        except Exception as exc:  # noqa: BLE001 - any failure is the finding
            seen["latest"] = f"not loadable: {exc}"
    for path in sorted(snapshot.glob("GTA5_*.pth")):
        try:  # torch.save writes a zip whose directory is at the end: a partial file has none
            with zipfile.ZipFile(path):
                pass
        except zipfile.BadZipFile:
            seen["partial"].append(path.name)
    return seen


@pytest.fixture(scope="module")
def chains(scripts, synthetic_data, fake_soft, sourceonly_ckpt, tmp_path_factory):
    """Phase 1 and phase 2 side by side: the uninterrupted runs in the background while a second
    run of each is killed at every point of KILLS in turn, then continued until it exits 0."""
    root = tmp_path_factory.mktemp("kill")
    argv = {(phase, kind): argv_for(phase, synthetic_data, fake_soft, sourceonly_ckpt, root / phase / kind)
            for phase in PHASES for kind in ("reference", "killed")}
    refs = {phase: scripts.start(argv[phase, "reference"]) for phase in PHASES}
    seen: dict[str, list[dict]] = {phase: [] for phase in PHASES}
    for fault, _, _ in KILLS:
        jobs = {phase: scripts.start(argv[phase, "killed"], env={"DECOUPLENET_FAULT": fault}) for phase in PHASES}
        for phase, job in jobs.items():
            seen[phase].append(observe(root / phase / "killed", scripts.wait(job)))
    final = {}
    for phase in PHASES:
        for _ in range(MAX_RESTARTS):
            final[phase] = scripts.run(argv[phase, "killed"], expect=None)
            if final[phase].returncode == 0:
                break
    out = {phase: {"reference": scripts.wait(refs[phase]), "kills": seen[phase], "final": final[phase],
                   "ref_snap": root / phase / "reference", "snap": root / phase / "killed"} for phase in PHASES}
    yield out
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("phase", PHASES)
def test_every_kill_leaves_a_loadable_state(phase, chains) -> None:
    for (fault, latest_iter, tmp_left), seen in zip(KILLS, chains[phase]["kills"]):
        where = f"{phase}, killed by {fault}"
        assert seen["result"].returncode == -9, f"{where}: expected SIGKILL\n" + seen["result"].describe()
        # None: no latest.pth yet (killed in the middle of the first write); else its iteration.
        assert seen["latest"] == latest_iter, f"{where}: latest.pth: {seen['latest']}"
        assert bool(seen["temps"]) == tmp_left, f"{where}: temporary files {seen['temps']}"
        assert seen["partial"] == [], f"{where}: partial files under a final name: {seen['partial']}"


@pytest.mark.parametrize("phase", PHASES)
def test_killed_and_continued_is_bit_identical(phase, chains) -> None:
    c = chains[phase]
    ref, final, ref_snap, snap = c["reference"], c["final"], c["ref_snap"], c["snap"]
    assert ref.returncode == 0, ref.describe()
    assert final.returncode == 0, f"{phase}: not done after {MAX_RESTARTS} restarts\n" + final.describe()
    assert "resumed from" in final.stdout and "removed stale temporary file" in final.stdout, final.stdout
    assert temp_files(snap) == [], temp_files(snap)
    assert_same_state(load(ref_snap / f"GTA5_{STEPS}.pth"), load(snap / f"GTA5_{STEPS}.pth"), f"GTA5_{STEPS}.pth")
    best_ref = sorted(p.name for p in ref_snap.glob("GTA5_2_*.pth"))
    best = sorted(p.name for p in snap.glob("GTA5_2_*.pth"))
    assert len(best_ref) == 1 and best == best_ref, (best_ref, best)
    assert_same_state(load(ref_snap / best[0]), load(snap / best[0]), best[0])
    la, lb = load(ref_snap / "latest.pth"), load(snap / "latest.pth")
    assert la["iteration"] == lb["iteration"] == STEPS
    for key in ("model", "extra_modules", "optimizers", "scaler", "stage_state", "best_miou"):
        assert_same_state(la[key], lb[key], f"latest.pth/{key}")
    assert Path(la["best_path"]).name == Path(lb["best_path"]).name
    # Every iteration, redone or not, computed the same losses as the uninterrupted run.
    assert metrics_by_iter(ref_snap) == metrics_by_iter(snap)


# ---------------------------------------------------------------------------- soft labels
def test_soft_labels_killed_then_skip_existing(scripts, synthetic_data, sourceonly_ckpt, tmp_path) -> None:
    def argv(out: Path, *extra: str) -> list:
        return ["generate_soft_label.py", "--cpu", "--quiet", "--tgt_rootpath", synthetic_data["cityscapes"],
                "--tgt_img_size", f"{IMG_W},{IMG_H}", "--resume", sourceonly_ckpt, "--output_folder", out,
                "--snapshot-dir", tmp_path / f"snap_{out.name}", "--num-workers", "0", "--batch_size_val", "1", *extra]

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    job = scripts.start(argv(whole))
    result = scripts.run(argv(killed), env={"DECOUPLENET_FAULT": "kill_mid_write:*.npy:2"}, expect=None)
    assert result.returncode == -9, result.describe()
    names = [f"{n}.npy" for n in target_train_basenames(synthetic_data)]
    finals = sorted(p.name for p in killed.glob("*.npy"))
    assert len(finals) == 1 and finals[0] in names, finals  # the first file; the second is only a .tmp
    assert len(temp_files(killed)) == 1, temp_files(killed)
    ref = scripts.wait(job)
    assert ref.returncode == 0, ref.describe()
    assert sorted(p.name for p in whole.iterdir()) == sorted(names)

    result = scripts.run(argv(killed, "--skip_existing"))
    assert f"1 of {len(names)} soft labels already there" in result.stdout, result.stdout
    assert "removed stale temporary file" in result.stdout, result.stdout
    assert sorted(p.name for p in killed.iterdir()) == sorted(names)  # no temporary file left
    for name in names:
        assert (whole / name).read_bytes() == (killed / name).read_bytes(), name
        assert np.load(killed / name).shape == (19, *((IMG_H + 7) // 8, (IMG_W + 7) // 8))
