"""Fixtures of the reliability tests (faults, bad inputs, non-finite losses, crafted pickles).

``synthetic_data`` and ``sourceonly_ckpt`` come from ``tests/conftest.py``.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

import pytest

from tests.conftest import tiny_args
from tests.reliability.runner import ScriptRunner


@pytest.fixture(scope="session")
def scripts():
    """The session's :class:`ScriptRunner` (one pre-loaded server, a forked process per run)."""
    runner = ScriptRunner()
    yield runner
    runner.close()


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
