"""Smoke runs of the benchmark scripts at tiny sizes, so they keep working (no timing asserts:
the figures in docs/BENCHMARKS.md come from full runs). Each script checks that our result equals
the original rule's and says so in its output."""

from __future__ import annotations

import re

from tests.conftest import run_script


def test_online_thresholds_benchmark() -> None:
    proc = run_script(["benchmarks/bench_thresholds_online.py", "--repeats", "1", "--bank-length", "2000",
                       "--pixels", "500"])
    assert "thresholds identical after every update: yes" in proc.stdout, proc.stdout
    assert re.search(r"OnlineClassThresholds, cpu\s+[\d.]+\s+[\d.]+", proc.stdout), proc.stdout


def test_offline_thresholds_benchmark() -> None:
    proc = run_script(["benchmarks/bench_thresholds_offline.py", "--sizes", "2,3"])
    assert "results identical for every N: yes" in proc.stdout, proc.stdout
    assert re.search(r"^\s+3\s+[\d.]+\s+[\d.]+\s+[\d.]+", proc.stdout, re.MULTILINE), proc.stdout


def test_data_benchmark() -> None:
    proc = run_script(["benchmarks/bench_data.py", "--samples", "1", "--pixels", "2"])
    for row in ("GTA5, phase 1", "Cityscapes, phase 1", "GTA5, phase 2 (jitter)",
                "Cityscapes, phase 2 (jitter + soft)"):
        assert re.search(re.escape(row) + r"(\s+[\d.]+x?){5}", proc.stdout), proc.stdout
    for row in ("GTA5, phase 1", "GTA5, phase 2 (jitter)"):  # + floor and original / floor
        assert re.search(re.escape(row) + r"(\s+[\d.]+x?){7}\s*$", proc.stdout, re.MULTILINE), proc.stdout
    for row in ("ours", "ours+jitter"):  # our random resize + crop gives the original's pixels
        assert re.search(rf"^{re.escape(row)}\s+2/2\s", proc.stdout, re.MULTILINE), proc.stdout


def test_step_benchmark() -> None:
    proc = run_script(["benchmarks/bench_step.py", "--device", "cpu", "--crop", "64,32", "--iters", "1",
                       "--warmup", "0", "--rounds", "1", "--baseline"])
    for row in ("phase1 ours", "phase1 straightforward", "phase2 ours"):
        assert re.search(re.escape(row) + r"\s+[\d.]+\s+\d+", proc.stdout), proc.stdout
    assert "phase1: straightforward / ours =" in proc.stdout


def test_data_benchmark_floor_computes_our_samples(tmp_path) -> None:
    """The "floor" of bench_data.py (library calls only) gives exactly our GTA5 samples, so the
    time it reports is the cost of the same pixels, not of less work."""
    import numpy as np

    from benchmarks.bench_data import _pil_floor
    from datasets.gta5 import GTA5Dataset
    from datasets.labels import encode_labels
    from datasets.synthetic import generate
    from datasets.transforms import JointAugment

    generate(str(tmp_path), seed=3, size=(191, 105), num_source=2, num_target_train=1, num_target_val=1)
    ds = GTA5Dataset(str(tmp_path / "gta5"), img_size=(191, 105),
                     augment=JointAugment(220, (64, 32), 0.5, (0.5, 0.5, 0.5, 0.2)))
    flips = set()
    for key in [(1, 0), (1, 1), (2, 0), (2, 1), (3, 0), (3, 1)]:
        sample = ds[key]
        img, lbl = _pil_floor(ds, key)
        flip = bool(sample["flip"])
        flips.add(flip)
        assert np.array_equal(np.asarray(img).transpose(2, 0, 1), sample["img"].numpy())
        lbl = np.ascontiguousarray(lbl[:, ::-1] if flip else lbl)
        assert np.array_equal(encode_labels(lbl, ds.num_classes), sample["label"].numpy())
    assert flips == {False, True}  # both branches were compared


def test_memory_benchmark() -> None:
    """Every step runs in both phases and computes the first-iteration losses of the original's loop
    (in one process: the fresh-process peaks of a real run are not the point here)."""
    proc = run_script(["benchmarks/bench_memory.py", "--phase", "1,2", "--small", "", "--large", "64,32",
                       "--batch", "1", "--iters", "1", "--in_process"])
    for phase in ("1", "2"):
        assert f"phase{phase}: ours / original =" in proc.stdout, proc.stdout
    for row in ("original", "ours", "ours --activation_checkpointing"):
        rows = re.findall(rf"^{re.escape(row)}\s+-\s+\d+\s+\d+\s+[\d.]+x\s+nan\s+(\w+)$", proc.stdout, re.MULTILINE)
        assert rows == ["yes", "yes"], proc.stdout
