"""Smoke runs of the benchmark scripts at tiny sizes, so they keep working (no timing asserts:
the figures in docs/BENCHMARKS.md come from full runs). Each script checks that our result equals
the original rule's and says so in its output."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.conftest import run_script

pytestmark = pytest.mark.slow  # runs the scripts end to end or a training loop (tests/README.md)


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
    for row in ("phase1 ours", "phase1 straightforward", "phase2 ours"):  # step, config, first s, s/iter, peak
        assert re.search(re.escape(row) + r"\s+off\s+[\d.]+\s+[\d.]+\s+\d+", proc.stdout), proc.stdout
    assert "phase1 off: straightforward / ours =" in proc.stdout


def test_predict_benchmark() -> None:
    """bench_predict.py times predict.py's PyTorch float32, bf16 and onnxruntime predictors in one run
    and gives each as images/s and a ratio to float32; onnxruntime predicts float32's pixels."""
    proc = run_script(["benchmarks/bench_predict.py", "--size", "64,32", "--iters", "1", "--warmup", "0",
                       "--bf16", "on"])
    for row in ("pytorch float32", "pytorch bf16 autocast", "onnxruntime (CPUExecutionProvider)"):
        assert re.search(rf"^{re.escape(row)}\s+[\d.]+\s+[\d.]+\s+[\d.]+x\s+[\d.]+\s+[\d.]+x\s+[\d.]+%$", proc.stdout,
                         re.MULTILINE), proc.stdout
    assert re.search(r"^pytorch float32\s+[\d.]+\s+[\d.]+\s+1\.00x\s+[\d.]+\s+1\.00x\s+100\.00%$", proc.stdout,
                     re.MULTILINE), proc.stdout
    same = float(re.search(r"^onnxruntime \(CPUExecutionProvider\).*\s([\d.]+)%$", proc.stdout, re.MULTILINE).group(1))
    assert same > 99.0, proc.stdout


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


def test_step_benchmark_frees_each_candidate_before_the_next(monkeypatch) -> None:
    """bench_step.py builds, measures and frees one candidate at a time: once measured and
    released, nothing keeps its network alive, so the next candidate's peak memory is its own."""
    import argparse
    import weakref

    import torch

    from benchmarks import bench_step

    nets: list[weakref.ref] = []
    real = bench_step.phase1_ours

    def spy(args, env):
        step, stage = real(args, env)
        nets.append(weakref.ref(stage.net))
        return step, stage

    monkeypatch.setattr(bench_step, "phase1_ours", spy)
    a = argparse.Namespace(batch=1, iters=1, warmup=1, flops=False, compile_backend="inductor")
    result = bench_step.measure("phase1 ours", "off+cudnn_benchmark", a, (64, 32), torch.device("cpu"))
    assert result["sec"] > 0 and result["first"] > 0
    bench_step.release(torch.device("cpu"))
    assert len(nets) == 1 and nets[0]() is None, "the measured candidate is still alive"


# ---------------------------------------------------------------------------- the GPU scripts
GPU_SCRIPTS = {"benchmarks/gpu_check.sh": 360, "benchmarks/gpu_ddp_check.sh": 180}  # one command each, seconds


def _logical_lines(text: str) -> list[str]:
    """The script's lines with backslash continuations joined, comments dropped."""
    return [ln for ln in re.sub(r"\\\n\s*", " ", text).splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def test_gpu_scripts_fit_their_budgets() -> None:
    """Each GPU script is one command: the limits of its commands add up to its budget (6 and 3
    minutes), every Python command runs under a limit, and nothing else calls ``timeout``."""
    from tests.helpers import REPO

    for script, budget in GPU_SCRIPTS.items():
        text = (Path(REPO) / script).read_text(encoding="utf-8")
        declared = re.search(r"^# BUDGET_S=(\d+)$", text, re.MULTILINE)
        assert declared and int(declared.group(1)) == budget, f"{script}: BUDGET_S {declared and declared.group(1)}"
        lines = _logical_lines(text)
        limits = [int(v) for ln in lines for v in re.findall(r"\blimit (\d+) ", ln)]
        assert limits and sum(limits) <= budget, f"{script}: limits {limits} add up to {sum(limits)} > {budget} s"
        for ln in lines:
            if "$PY " in ln:
                assert re.search(r"\blimit \d+ (env \S+ )?\$PY ", ln), f"{script}: unbounded: {ln.strip()}"
            if re.search(r"(?<![-\w])timeout\b", ln):
                assert ln.strip() == 'timeout "$seconds" "$@"', f"{script}: timeout outside limit(): {ln.strip()}"
            budget_flag = re.search(r"--budget \$\(\((\d+) \* SCALE\)\)", ln)
            if budget_flag:  # the check's own budget ends before its limit, so its summary is printed
                assert int(budget_flag.group(1)) < int(re.search(r"\blimit (\d+) ", ln).group(1))
        assert ". benchmarks/gpu_limit.sh" in text, f"{script}: does not source limit()"
    limit_fn = (Path(REPO) / "benchmarks/gpu_limit.sh").read_text(encoding="utf-8")
    assert 'timeout "$seconds" "$@"' in limit_fn and "$(($1 * SCALE))" in limit_fn


def _run_tiny(script: str, out: Path) -> str:
    import subprocess
    import sys

    from tests.helpers import REPO

    env = dict(os.environ, GPU_CHECK_TINY="1", PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", script, str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1500, check=False)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    for bad in ("(stopped at its", "(exit ", "FAILED", "Traceback"):
        assert bad not in proc.stdout, proc.stdout[-8000:]
    return proc.stdout


def test_gpu_check_runs_every_command_at_tiny_sizes(tmp_path) -> None:
    """``GPU_CHECK_TINY=1 bash benchmarks/gpu_check.sh OUT``: every command of the GPU check with
    all its options, at tiny sizes on the CPU; each figure printed and saved in OUT."""
    import json

    out = tmp_path / "figures"
    stdout = _run_tiny("benchmarks/gpu_check.sh", out)
    assert (out / "gpu_check.txt").read_text(encoding="utf-8") == stdout
    assert float((out / "peak_tflops.txt").read_text()) > 0 and "measured bf16 matmul peak" in stdout
    rows = [json.loads(line) for line in (out / "bench_step.jsonl").read_text().splitlines()]
    measured = {(r["step"], r["config"]) for r in rows}
    # the grid (fp16 is bf16 on the CPU), the TF32 trio, --deterministic, the compile run: each step printed
    grid = {(f"phase{p} ours", c) for p in (1, 2) for c in ("bf16", "bf16+channels_last", "bf16+cudnn_benchmark",
                                                                 "bf16+fused_off")}
    want = grid | {("phase1 ours", c) for c in ("off", "off+tf32_on", "off+tf32_off", "bf16+deterministic",
                                                "bf16+channels_last+compile")}
    assert measured == want, measured ^ want
    for step, config in want:
        assert re.search(rf"^{re.escape(step)}\s+{re.escape(config)}\s+[\d.]+\s+[\d.]+\s+\d+", stdout, re.MULTILINE)
    for key in grid:  # the grid's line counts FLOPs (the other lines do not)
        assert any(r["flops"] > 0 for r in rows if (r["step"], r["config"]) == key), key
    compiled = [r for r in rows if "compile" in r["config"]]
    assert compiled[0]["compile_s"] is not None and "compile time" in stdout
    assert "phase1 ours bf16+deterministic / bf16 = " in stdout
    assert "thresholds identical after every update: yes" in stdout
    for phase in ("1", "2"):
        assert f"phase{phase}: ours / original =" in stdout
    for row in ("pytorch float32", "pytorch bf16 autocast"):  # predict.py's inference (bench_predict.py)
        assert re.search(rf"^{re.escape(row)}\s+[\d.]+\s+[\d.]+\s+[\d.]+x", stdout, re.MULTILINE), row
    assert "gpu_check done in" in stdout


def test_gpu_ddp_check_runs_at_tiny_sizes(tmp_path) -> None:
    """``GPU_CHECK_TINY=1 bash benchmarks/gpu_ddp_check.sh OUT``: under ``torchrun
    --nproc_per_node 1`` (gloo) phase 1, the soft labels and thresholds, phase 2 and the
    kill-and-restart scenario, each saying that the process group and DDP ran."""
    stdout = _run_tiny("benchmarks/gpu_ddp_check.sh", tmp_path / "report")
    assert (tmp_path / "report" / "gpu_ddp_check.txt").read_text(encoding="utf-8") == stdout
    assert "torchrun with 1 rank(s), gloo" in stdout
    for run in ("phase 1, 4 iterations, torchrun", "phase 2, 2 iterations, torchrun",
                "phase 1, rank 0 SIGKILLed at iteration 3, torchrun restart"):
        assert re.search(rf"{re.escape(run)}: exit 0, \d+s; process group gloo, DDP wrapper over 1 rank\(s\)", stdout), \
            stdout
    assert re.search(r"generate_soft_label.py, torchrun: exit 0, \d+s; process group gloo", stdout)
    assert "all-reduced file count: 4 of 4; soft-label mIoU (all-reduced): logged" in stdout
    assert "restarted from iteration 2: yes" in stdout
    assert stdout.count("against the uninterrupted run: bit-identical") == 2
    assert "== DDP check: passed" in stdout


def test_stop_agreement_benchmark() -> None:
    """Under torchrun (one rank here): the three variants and the collective alone are printed."""
    proc = run_script(["-m", "torch.distributed.run", "--nproc_per_node", "1", "--rdzv-backend", "c10d",
                       "--rdzv-endpoint", "127.0.0.1:0", "benchmarks/bench_stop_agreement.py", "--cpu", "--crop",
                       "64,32", "--iters", "1", "--warmup", "0", "--collectives", "5"])
    for variant in ("folded", "off", "separate"):
        assert re.search(rf"^\s+{variant}\s+[\d.]+ s/iter", proc.stdout, re.MULTILINE), proc.stdout
    assert "one-element all-reduce + host read alone" in proc.stdout, proc.stdout
    assert re.search(r"all-reduce \+ read alone: [\d.]+ ms for \d+ float64, [\d.]+ ms with the flag", proc.stdout), \
        proc.stdout
