"""The fp16 training loop on the CPU: host syncs per iteration, the loss scale in the logs, and the
stop after consecutive skipped steps.

``--amp fp16`` needs CUDA, so these tests give the real training loop an *enabled* CPU
``torch.amp.GradScaler`` (``engine.trainer.grad_scaler`` patched) while the network computes in
float32: the scaler then scales, unscales, checks for infs, skips and halves exactly as under
fp16, and ``Trainer`` treats the run as an fp16 one (no NaN stop; the scaler skips the step).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_args
from tests.placement import Placement
from tests.test_collective_devices import run_in_process

pytestmark = pytest.mark.slow  # runs the scripts end to end or a training loop (tests/README.md)


def enabled_cpu_scaler(args, device):
    return torch.amp.GradScaler("cpu", enabled=True)


@pytest.fixture
def fault(monkeypatch):
    """``fault("nan_from_iter:1")`` sets ``$DECOUPLENET_FAULT`` for this test (it is read once per process)."""
    from utils.faults import injected_fault

    def set_fault(value: str) -> None:
        monkeypatch.setenv("DECOUPLENET_FAULT", value)
        injected_fault.cache_clear()

    yield set_fault
    monkeypatch.delenv("DECOUPLENET_FAULT", raising=False)
    injected_fault.cache_clear()


def read_metrics(snapshot: Path) -> list[dict]:
    with open(snapshot / "metrics.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def phase1(data, ckpt, snapshot: Path, *extra: object) -> list[object]:
    return [*tiny_args(data), "--resume", ckpt, "--snapshot-dir", snapshot, "--num-workers", "0",
            "--print-every", "1", "--save-pred-every", "1000", "--save_latest_every", "1000", *extra]


# Host syncs of one phase-1 iteration (the second: the first also initialises the scaler): the
# one transfer of the losses, pseudo-label counts and loss scale, plus GradScaler.step's read of
# found_inf before each of the three optimizers unless they are fused. Before the losses and
# the monitor's counts shared one transfer the figures were 5, 2 and 2.
EXPECTED_SYNCS = {("fp16", "off"): 4, ("fp16", "on"): 1, ("fp32", "off"): 1}


@pytest.mark.parametrize("amp, fused", list(EXPECTED_SYNCS))
def test_host_syncs_of_one_phase1_iteration(amp, fused, synthetic_data, sourceonly_ckpt, tmp_path,
                                            monkeypatch, capsys) -> None:
    from engine import trainer

    if amp == "fp16":
        monkeypatch.setattr(trainer, "grad_scaler", enabled_cpu_scaler)
    placement = Placement()
    placement.counting = False

    def at_iteration(it: int, losses=None) -> None:  # the loop's fault hook: count iteration 1 only
        if losses is None:
            placement.counting = it == 1

    monkeypatch.setattr(trainer.faults, "at_iteration", at_iteration)
    with placement:
        rc = run_in_process("train_phase1", "phase1", phase1(
            synthetic_data, sourceonly_ckpt, tmp_path, "--num-steps", "3", "--num-steps-stop", "3",
            "--fused_optimizers", fused))
    assert rc == 0, capsys.readouterr().err
    where = Counter(f"{what} at {caller}" for what, caller in placement.syncs)
    detail = "\n".join(f"{n} x {k}" for k, n in where.items())
    assert len(placement.syncs) == EXPECTED_SYNCS[(amp, fused)], f"host syncs of iteration 1:\n{detail}"
    metrics = read_metrics(tmp_path)
    assert [m["iter"] for m in metrics] == [0, 1, 2]
    assert all("pseudo_acc" in m for m in metrics)  # the monitor's counts came through the transfer
    if amp == "fp16":  # the scale each iteration's backward used; no step was skipped
        assert [m["loss_scale"] for m in metrics] == [65536.0] * 3
    else:  # no scaler: metrics.jsonl keeps its keys
        assert not any("loss_scale" in m for m in metrics)


def test_fp16_divergence_stops_after_consecutive_skipped_steps(synthetic_data, sourceonly_ckpt, tmp_path,
                                                               monkeypatch, capsys, fault) -> None:
    """Every loss NaN from iteration 1 on: the scaler skips iterations 1, 2, 3 and halves the scale
    each time; the loop sees the third skip at iteration 4 and stops with one line, exit code 2."""
    from engine import trainer

    monkeypatch.setattr(trainer, "grad_scaler", enabled_cpu_scaler)
    fault("nan_from_iter:1")
    rc = run_in_process("train_phase1", "phase1", phase1(
        synthetic_data, sourceonly_ckpt, tmp_path, "--num-steps", "10", "--num-steps-stop", "10",
        "--max_skipped_steps", "3"))
    out = capsys.readouterr()
    assert rc == 2, out.err
    lines = [ln for ln in out.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --amp fp16: the grad scaler skipped the optimizer "
                                                   "steps of 3 iterations in a row (1..3;"), out.err
    assert "now 8192" in lines[0] and "--max_skipped_steps 3" in lines[0], lines[0]
    metrics = read_metrics(tmp_path)
    assert [m["iter"] for m in metrics] == [0, 1, 2, 3]
    assert [m["loss_scale"] for m in metrics] == [65536.0, 65536.0, 32768.0, 16384.0]
    assert "loss scale 32768" in out.out  # the console line of iteration 2


def test_max_skipped_steps_0_never_stops(synthetic_data, sourceonly_ckpt, tmp_path, monkeypatch, capsys,
                                         fault) -> None:
    from engine import trainer

    monkeypatch.setattr(trainer, "grad_scaler", enabled_cpu_scaler)
    fault("nan_from_iter:0")
    rc = run_in_process("train_phase1", "phase1", phase1(
        synthetic_data, sourceonly_ckpt, tmp_path, "--num-steps", "3", "--num-steps-stop", "3",
        "--max_skipped_steps", "0"))
    assert rc == 0, capsys.readouterr().err
    assert [m["loss_scale"] for m in read_metrics(tmp_path)] == [65536.0, 32768.0, 16384.0]
