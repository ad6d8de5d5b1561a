"""Shared fixtures of the integration tests (tests/test_phase1_train.py, tests/test_phase2_chain.py).

* ``synthetic_data``: a tiny synthetic GTA5 + Cityscapes tree (128x64 images), made once per session.
* ``sourceonly_ckpt``: a source-only start checkpoint with the deterministic "filled" weights.
* :func:`run_script`: run one of the project's scripts in a subprocess from the repository root.
* :func:`tiny_args`: the flags that keep a training run small enough for a 2-core CPU.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.disk import DiskWatch
from tests.helpers import REPO, filled_sourceonly_checkpoint

IMG_W, IMG_H = 128, 64  # synthetic image size
SOFT_HW = (math.ceil(IMG_H / 8), math.ceil(IMG_W / 8))  # soft labels of those images (stride 8)
NUM_SOURCE, NUM_TARGET_TRAIN, NUM_TARGET_VAL = 6, 4, 2
SCRIPT_TIMEOUT_S = 300


def run_script(args: Sequence[str], check: bool = True, env: Mapping[str, str] | None = None,
               cwd: str | os.PathLike[str] = REPO) -> subprocess.CompletedProcess:
    """``python ARGS`` (the test's own interpreter) in ``cwd`` (the repository root by default).

    Output is captured as text; ``env`` entries are added to the current environment. With
    ``check`` a non-zero exit fails the test with the command's stdout and stderr in the message.
    """
    full_env = dict(os.environ)
    full_env.update(env or {})
    cmd = [sys.executable, *[str(a) for a in args]]
    proc = subprocess.run(cmd, check=False, cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=SCRIPT_TIMEOUT_S)
    if check:
        assert proc.returncode == 0, (
            f"command failed with exit code {proc.returncode}: {' '.join(cmd[1:])}\n"
            f"--- stdout ---\n{proc.stdout[-8000:]}\n--- stderr ---\n{proc.stderr[-8000:]}"
        )
    return proc


def tiny_args(data: Mapping[str, Path]) -> list[str]:
    """Data and size flags of a tiny CPU run on ``synthetic_data`` (no snapshot dir, no steps)."""
    return [
        "--cpu", "--quiet",
        "--src_rootpath", str(data["gta5"]), "--tgt_rootpath", str(data["cityscapes"]),
        "--src_img_size", f"{IMG_W},{IMG_H}", "--tgt_img_size", f"{IMG_W},{IMG_H}",
        "--resize", str(IMG_W), "--rcrop", "64,32",
        "--batch_size_val", "2",
    ]


def target_train_basenames(data: Mapping[str, Path]) -> list[str]:
    """Basenames (without ``.png``) of the Cityscapes train images of ``synthetic_data``."""
    root = Path(data["cityscapes"]) / "leftImg8bit" / "train"
    return sorted(p.name[: -len(".png")] for p in root.rglob("*.png"))


@pytest.fixture(scope="session")
def fake_soft(synthetic_data, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Random float32 soft labels ``[19, H/8, W/8]`` for every target train image of
    ``synthetic_data`` and a valid thresholds file. Shared: tests that alter them work on a copy."""
    root = tmp_path_factory.mktemp("shared_fake_soft")
    soft = root / "soft_labels"
    soft.mkdir()
    rng = np.random.default_rng(0)
    for name in target_train_basenames(synthetic_data):
        np.save(soft / f"{name}.npy", (rng.standard_normal((19, *SOFT_HW)) * 3).astype(np.float32))
    thresholds = root / "thresholds.npy"
    np.save(thresholds, np.full(19, 0.3))
    return soft, thresholds


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``{"gta5": root, "cityscapes": root}`` of a tiny synthetic tree, generated once."""
    from datasets.synthetic import generate

    out = tmp_path_factory.mktemp("shared_synthetic")
    roots = generate(out, seed=0, size=(IMG_W, IMG_H), num_source=NUM_SOURCE,
                     num_target_train=NUM_TARGET_TRAIN, num_target_val=NUM_TARGET_VAL)
    return {k: Path(v) for k, v in roots.items()}


@pytest.fixture(scope="session")
def sourceonly_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a ``torch.save``d source-only checkpoint (layer 1) with the filled weights."""
    path = tmp_path_factory.mktemp("shared_ckpt") / "sourceonly_filled.pth"
    torch.save(filled_sourceonly_checkpoint(1), path)
    return path


def assert_same_state(a, b, where: str = "") -> None:
    """Nested dicts / lists / tensors / numbers of ``a`` and ``b`` are bit-identical."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{where}: tensor vs {type(b).__name__}"
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        assert torch.equal(a, b), f"{where}: tensors differ (max |diff| {(a.double() - b.double()).abs().max().item():.3g})"
    elif isinstance(a, Mapping):
        assert isinstance(b, Mapping), f"{where}: dict vs {type(b).__name__}"
        assert list(a.keys()) == list(b.keys()), f"{where}: keys differ: {sorted(set(a) ^ set(b))}"
        for k in a:
            assert_same_state(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: sequences differ in length"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# ---------------------------------------------------------------------------- disk
# A tiny training run still writes full ResNet-101 checkpoints (~200 MB, latest.pth ~450 MB). The
# suite keeps its peak low: a passed test's tmp_path goes at once (tmp_path_retention_policy in
# pytest.ini), every test's .pth files go after it, and a module's own folders lose theirs when the
# module ends. Folders named shared_* belong to fixtures shared by several modules.
SHARED_PREFIX = "shared_"
_disk_watch: DiskWatch | None = None
_running = {"test": "(setup)"}


def drop_checkpoints(folder: Path) -> None:
    """Delete the ``.pth`` files under ``folder`` (a failed test's folder keeps everything else)."""
    for path in folder.rglob("*.pth"):
        path.unlink(missing_ok=True)


@pytest.fixture(scope="session", autouse=True)
def _watch_disk(tmp_path_factory: pytest.TempPathFactory):
    """Sample the temporary folder's size while the session runs (summary line: tests/disk.py)."""
    global _disk_watch
    _disk_watch = DiskWatch(tmp_path_factory.getbasetemp(), lambda: _running["test"])
    yield


def pytest_runtest_logstart(nodeid: str, location) -> None:
    _running["test"] = nodeid


def pytest_terminal_summary(terminalreporter) -> None:
    if _disk_watch is not None:
        terminalreporter.write_line(_disk_watch.stop())


@pytest.fixture(scope="module", autouse=True)
def _drop_module_checkpoints(tmp_path_factory: pytest.TempPathFactory):
    """When a module ends, delete the .pth files in the temporary folders made while it ran
    (those of module-scoped fixtures would otherwise stay to the end of the session)."""
    base = tmp_path_factory.getbasetemp()
    before = set(os.listdir(base))
    yield
    for name in set(os.listdir(base)) - before:
        if not name.startswith(SHARED_PREFIX):
            drop_checkpoints(base / name)


@pytest.fixture(autouse=True)
def _drop_checkpoints(request: pytest.FixtureRequest):
    """After a test that used ``tmp_path``, delete the ``.pth`` files in it (hundreds of MB per
    training run; a failed test's tmp_path is kept)."""
    folder = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    yield
    if folder is not None:
        drop_checkpoints(folder)
