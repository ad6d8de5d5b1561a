"""Atomic writes create files with the permissions of an ordinary new file (0666 minus the umask).

The scripts' outputs are checked under umask 022 where they are made (tests/test_phase2_chain.py:
checkpoints, latest.pth, soft labels, thresholds; tests/test_tools.py: evaluate.py outputs;
tests/test_get_thresholds.py). Here the rule itself, under two umasks, and the files of
``python3 -m datasets.prepare gta5`` (gtav_label_info.p, split.mat).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from utils.checkpoint import atomic_save
from utils.files import atomic_save_npy, atomic_write, remove_stale_temp_files


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request: pytest.FixtureRequest):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_atomic_writes_get_the_mode_of_open(tmp_path: Path, umask: int) -> None:
    with open(tmp_path / "plain.txt", "w") as f:  # what an ordinary file gets
        f.write("x")
    plain = (tmp_path / "plain.txt").stat().st_mode & 0o777
    assert plain == 0o666 & ~umask
    atomic_save({"w": torch.zeros(2)}, str(tmp_path / "latest.pth"))
    atomic_save_npy(np.zeros(3, np.float32), str(tmp_path / "a.npy"))
    atomic_write(str(tmp_path / "results.json"), lambda f: f.write("{}"), mode="w")
    atomic_save({"w": torch.ones(2)}, str(tmp_path / "latest.pth"))  # replacing keeps the rule
    for name in ("latest.pth", "a.npy", "results.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == plain, name
    assert torch.load(tmp_path / "latest.pth", weights_only=True)["w"].sum() == 2
    assert sorted(os.listdir(tmp_path)) == ["a.npy", "latest.pth", "plain.txt", "results.json"]  # no temp file


def test_failed_write_leaves_no_temp_file(tmp_path: Path) -> None:
    def fail(_f) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(str(tmp_path / "x.pth"), fail)
    assert os.listdir(tmp_path) == []
    fd = os.open(tmp_path / ".x.pth.abc123.tmp", os.O_CREAT | os.O_WRONLY, 0o600)  # left by a killed run
    os.close(fd)
    assert remove_stale_temp_files(str(tmp_path)) == [str(tmp_path / ".x.pth.abc123.tmp")]


def test_label_info_gets_the_mode_of_open(tmp_path: Path, umask: int) -> None:
    """``gtav_label_info.p`` (datasets.label_info.save_label_info), new and replaced."""
    from datasets.label_info import load_label_info, save_label_info

    path = tmp_path / "gtav_label_info.p"
    save_label_info(path, [["a.png"], []], {"a.png": [0]})
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    save_label_info(path, [["a.png", "b.png"], ["b.png"]], {"a.png": [0], "b.png": [0, 1]})
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert load_label_info(str(path)) == ([["a.png", "b.png"], ["b.png"]], {"a.png": [0], "b.png": [0, 1]})
    assert os.listdir(tmp_path) == ["gtav_label_info.p"]  # no temp file


def test_prepare_gta5_writes_files_with_the_mode_of_open(tmp_path: Path, umask: int) -> None:
    """``python3 -m datasets.prepare gta5 ROOT`` (a subprocess, which inherits the umask): every
    file it writes (gtav_label_info.p, split.mat) has an ordinary new file's mode, and nothing
    else appears in the root."""
    import subprocess
    import sys

    from PIL import Image

    from tests.helpers import REPO

    root = tmp_path / "gta5"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(0)
    for i in (1, 2, 3):
        Image.fromarray(rng.integers(0, 256, (16, 32, 3), dtype=np.uint8)).save(root / "images" / f"{i:05d}.png")
        ids = rng.choice(np.array([0, 7, 8, 11, 26, 34], dtype=np.uint8), size=(16, 32))
        Image.fromarray(ids, mode="L").save(root / "labels" / f"{i:05d}.png")
    before = {p.relative_to(root) for p in root.rglob("*")}
    proc = subprocess.run([sys.executable, "-m", "datasets.prepare", "gta5", str(root), "--quiet", "--workers", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    written = {p.relative_to(root) for p in root.rglob("*")} - before
    assert written == {Path("gtav_label_info.p"), Path("split.mat")}, written
    modes = {str(p): oct((root / p).stat().st_mode & 0o777) for p in written}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes
    # run again: the label info is replaced, split.mat kept, the modes stay
    proc = subprocess.run([sys.executable, "-m", "datasets.prepare", "gta5", str(root), "--quiet", "--workers", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {p.relative_to(root) for p in root.rglob("*")} - before == written
    assert {oct((root / p).stat().st_mode & 0o777) for p in written} == {oct(0o666 & ~umask)}
