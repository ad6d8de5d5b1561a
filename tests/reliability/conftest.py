"""Fixtures of the reliability tests (faults, bad inputs, non-finite losses, crafted pickles).

``synthetic_data`` and ``sourceonly_ckpt`` come from ``tests/conftest.py``.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.conftest import assert_same_state, tiny_args
from tests.helpers import digest_and_remove
from tests.reliability.runner import ScriptRunner, Watched, temp_files


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


# ---------------------------------------------------------------------------- stopped on a signal, continued
# The runs of test_signals.py and test_slurm.py: 2 ranks (CPU, gloo), 4 iterations, compared with one
# uninterrupted torchrun run of the same schedule (the session's two_rank_reference).
SIGNAL_STEPS = 4
SIGNAL_COMPARED = (f"GTA5_{SIGNAL_STEPS}.pth", "latest.pth")  # what a finished run of the schedule ends with
TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--rdzv-backend", "c10d",
              "--rdzv-endpoint", "127.0.0.1:0"]


def signal_schedule(save_latest_every: int = 100, batch: int = 2) -> list[str]:
    """The schedule of the signal tests; ``latest.pth`` every ``save_latest_every`` iterations (100:
    only at the end, and at a stop)."""
    return ["--batch-size", str(batch), "--num-steps", str(SIGNAL_STEPS), "--num-steps-stop", str(SIGNAL_STEPS),
            "--save-pred-every", "100", "--save_latest_every", str(save_latest_every), "--print-every", "1"]


@dataclass
class Finished:
    """A finished run's snapshot folder and the digests of its compared checkpoints (the files
    themselves are deleted to keep the suite's disk use down: tests/conftest.py)."""

    snap: Path
    states: dict[str, object]


def finished(snap: Path) -> Finished:
    return Finished(snap, digest_and_remove(snap, SIGNAL_COMPARED))


@pytest.fixture(scope="package")
def two_rank_reference(synthetic_data, sourceonly_ckpt, tmp_path_factory) -> Finished:
    """An uninterrupted 2-rank torchrun phase-1 run of :func:`signal_schedule`."""
    snap = tmp_path_factory.mktemp("shared_two_rank_reference") / "snap"
    result = Watched([*TORCHRUN_2, *phase1_argv(synthetic_data, sourceonly_ckpt, snap, *signal_schedule())]).wait()
    assert result.returncode == 0, result.describe()
    return finished(snap)


def load_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def metrics_lines(snapshot: Path) -> list[int]:
    """The iteration of every line of ``metrics.jsonl``, in order (a redone iteration appears twice)."""
    with open(snapshot / "metrics.jsonl", encoding="utf-8") as f:
        return [json.loads(line)["iter"] for line in f if line.strip()]


def assert_continued_exactly(ref: Finished, run: Finished) -> None:
    """``run`` finished bit-identical to the uninterrupted ``ref``: the final checkpoint, every entry
    of ``latest.pth`` (every rank's part) but the arguments, every iteration's losses; and, since the
    state was saved at the stop, no iteration was done twice."""
    snap = run.snap
    assert set(run.states) == set(ref.states) == set(SIGNAL_COMPARED), f"{snap.name}: have {sorted(run.states)}"
    name = SIGNAL_COMPARED[0]
    assert_same_state(ref.states[name], run.states[name], f"{snap.name}: {name}")
    la, lb = ref.states["latest.pth"], run.states["latest.pth"]
    assert la["iteration"] == lb["iteration"] == SIGNAL_STEPS and lb["world_size"] == la["world_size"]
    for key in la:
        if key != "args":
            assert_same_state(la[key], lb[key], f"{snap.name}: latest.pth/{key}")
    assert metrics_lines(snap) == list(range(SIGNAL_STEPS)), f"{snap.name}: iterations logged {metrics_lines(snap)}"
    with open(ref.snap / "metrics.jsonl", encoding="utf-8") as f, open(snap / "metrics.jsonl", encoding="utf-8") as g:
        assert [json.loads(x) for x in f] == [json.loads(y) for y in g], f"{snap.name}: losses differ"
    assert temp_files(snap) == [], temp_files(snap)
