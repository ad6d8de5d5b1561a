"""Atomic writes create files with the permissions of an ordinary new file (0666 minus the umask).

The scripts' outputs are checked under umask 022 where they are made (tests/test_phase2_chain.py:
checkpoints, latest.pth, soft labels, thresholds; tests/test_tools.py: evaluate.py outputs;
tests/test_get_thresholds.py). Here the rule itself, under two umasks.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from utils.checkpoint import atomic_save, atomic_save_npy, atomic_write, remove_stale_temp_files


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
