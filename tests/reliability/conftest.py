"""Fixtures of the reliability tests (faults, bad inputs, non-finite losses, crafted pickles).

``synthetic_data`` and ``sourceonly_ckpt`` come from ``tests/conftest.py``.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import IMG_H, IMG_W, target_train_basenames, tiny_args
from tests.reliability.runner import ScriptRunner

SOFT_HW = (math.ceil(IMG_H / 8), math.ceil(IMG_W / 8))


@pytest.fixture(scope="session")
def scripts():
    """The session's :class:`ScriptRunner` (one pre-loaded server, a forked process per run)."""
    runner = ScriptRunner()
    yield runner
    runner.close()


@pytest.fixture(scope="session")
def fake_soft(synthetic_data, tmp_path_factory) -> tuple[Path, Path]:
    """Random float32 soft labels ``[19, H/8, W/8]`` for every target train image and a valid
    thresholds file."""
    root = tmp_path_factory.mktemp("rel_soft")
    soft = root / "soft_labels"
    soft.mkdir()
    rng = np.random.default_rng(0)
    for name in target_train_basenames(synthetic_data):
        np.save(soft / f"{name}.npy", (rng.standard_normal((19, *SOFT_HW)) * 3).astype(np.float32))
    thresholds = root / "thresholds.npy"
    np.save(thresholds, np.full(19, 0.3))
    return soft, thresholds


def copy_data(data: Mapping[str, Path], dest: Path) -> dict[str, Path]:
    """A private copy of the synthetic GTA5 + Cityscapes trees (a few dozen small PNGs)."""
    return {k: Path(shutil.copytree(v, dest / k)) for k, v in data.items()}


def phase1_argv(data: Mapping[str, Path], ckpt: Path, snapshot: Path, *extra: object) -> list[object]:
    return ["train_phase1.py", *tiny_args(data), "--resume", ckpt, "--snapshot-dir", snapshot,
            "--num-workers", "0", *extra]


def phase2_argv(data: Mapping[str, Path], soft: Path, thresholds: Path, ckpt: Path, snapshot: Path,
                *extra: object) -> list[object]:
    return ["train_phase2.py", *tiny_args(data), "--soft_labels_folder", soft, "--thresholds_path", thresholds,
            "--resume", ckpt, "--snapshot-dir", snapshot, "--num-workers", "0", *extra]
