"""Resuming where the saving run's hardware or precision differs: fewer visible GPUs, another
``--amp``; and the start-up check of the torch / torchvision versions. CPU only: CUDA's random
generators are stood in for by patched ``torch.cuda`` functions."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from engine.common import LOG
from tests.helpers import REPO


class LogLines(logging.Handler):
    """The project logger's records while installed (``with LogLines() as lines:``)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def __enter__(self) -> list[str]:
        self._level = LOG.level
        LOG.setLevel(logging.INFO)
        LOG.addHandler(self)
        return self.lines

    def __exit__(self, *exc) -> None:
        LOG.removeHandler(self)
        LOG.setLevel(self._level)


# ---------------------------------------------------------------------------- 1. fewer GPUs
class FakeCuda:
    """``count`` visible GPUs whose generator states are 16 bytes of their index (+ ``seed``).

    ``set_rng_state`` raises ``IndexError`` for a GPU that is not there, as
    ``torch.cuda.default_generators[index]`` does; ``*_all`` loop over the GPUs as torch's do.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, count: int, seed: int = 0) -> None:
        self.count, self.seed, self.set_calls = count, seed, []
        for name in ("get_rng_state", "set_rng_state", "get_rng_state_all", "set_rng_state_all"):
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)

    @staticmethod
    def index(device) -> int:
        if isinstance(device, int):
            return device
        return torch.device(device).index or 0

    def get_rng_state(self, device="cuda") -> torch.Tensor:
        return torch.full((16,), self.seed + self.index(device), dtype=torch.uint8)

    def set_rng_state(self, state: torch.Tensor, device="cuda") -> None:
        index = self.index(device)
        if index >= self.count:
            raise IndexError("tuple index out of range")
        self.set_calls.append((index, int(state[0])))

    def get_rng_state_all(self) -> list[torch.Tensor]:
        return [self.get_rng_state(i) for i in range(self.count)]

    def set_rng_state_all(self, states) -> None:
        for i, state in enumerate(states):
            self.set_rng_state(state, i)


def saved_parts(world: int) -> list[dict]:
    """Every rank's ``local_state`` as a CPU run saves it (no CUDA state)."""
    from engine.state import local_state

    return [local_state({"model": torch.nn.BatchNorm1d(3)}, {}, r) for r in range(world)]


class _Stage:
    def load_extra_state(self, state: dict) -> None:
        pass


def restore(parts: list[dict], rank: int, world: int, device: torch.device) -> str:
    from engine.state import restore_local_state
    from utils.distributed import DistEnv

    return restore_local_state({"ranks": parts}, _Stage(), {"model": torch.nn.BatchNorm1d(3)},
                               DistEnv(rank=rank, world_size=world, device=device))


def test_a_4_gpu_state_resumes_on_2_gpus(monkeypatch) -> None:
    """States written before held ``get_rng_state_all()``, one state per visible GPU: 4 of them
    from a 4-GPU node. On 2 GPUs ``set_rng_state_all`` of 4 states raised IndexError; now each
    rank takes the entry of its own GPU."""
    parts = saved_parts(2)
    for part in parts:
        part["rng"]["cuda"] = FakeCuda(pytest.MonkeyPatch(), 4, seed=100).get_rng_state_all()
    cuda = FakeCuda(monkeypatch, 2)
    assert restore(parts, 1, 2, torch.device("cuda", 1)) == ""
    assert cuda.set_calls == [(1, 101)]  # GPU 1 only, with saved GPU 1's state


def test_each_rank_saves_and_restores_its_own_gpu_only(monkeypatch) -> None:
    from engine.state import local_state

    saving = FakeCuda(monkeypatch, 4, seed=100)  # a 4-GPU node
    part = local_state({"model": torch.nn.BatchNorm1d(3)}, {}, 1, torch.device("cuda", 1))
    assert torch.equal(part["rng"]["cuda"], saving.get_rng_state(1))  # one state: GPU 1's
    cuda = FakeCuda(monkeypatch, 2)  # resumed on a 2-GPU node
    restore([saved_parts(1)[0], part], 1, 2, torch.device("cuda", 1))
    assert cuda.set_calls == [(1, 101)]


def test_no_saved_state_for_this_gpu_keeps_the_fresh_one_and_says_so(monkeypatch) -> None:
    parts = saved_parts(4)
    for part in parts:  # written on a 2-GPU node (world size 4 over two nodes, say)
        part["rng"]["cuda"] = FakeCuda(pytest.MonkeyPatch(), 2, seed=100).get_rng_state_all()
    cuda = FakeCuda(monkeypatch, 4)
    with LogLines() as lines:
        restore(parts, 3, 4, torch.device("cuda", 3))
        restore(saved_parts(1), 0, 1, torch.device("cuda", 0))  # saved on the CPU: no CUDA state at all
    assert cuda.set_calls == []
    assert lines == ["the training state holds no CUDA random state for cuda:3; it keeps this run's seed",
                     "the training state holds no CUDA random state for cuda:0; it keeps this run's seed"]


# ---------------------------------------------------------------------------- 2. another --amp
class TinyStage:
    """The parts of a :class:`engine.trainer.Stage` that the training state reads and writes."""

    name = "tiny"
    pseudo_monitor = None

    def __init__(self, args, env) -> None:
        self.args, self.env = args, env
        self.net = torch.nn.Linear(2, 2)
        self.extra_modules: dict = {}
        self.optimizers = {"model": (torch.optim.SGD(self.net.parameters(), lr=0.1), 0.1)}

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass


def tiny_trainer(folder: Path, amp: str):
    from engine.trainer import Trainer
    from utils.distributed import DistEnv

    args = SimpleNamespace(amp=amp, snapshot_dir=str(folder), batch_size=1, iter_size=1, max_skipped_steps=100)
    return Trainer(TinyStage(args, DistEnv()), None, None)


@pytest.mark.parametrize("saved_amp", ["off", "bf16"])
def test_fp16_resumes_a_state_written_without_fp16(saved_amp, tmp_path) -> None:
    """A disabled scaler saves ``{}``, which an enabled one refused to load (a traceback)."""
    tiny_trainer(tmp_path, saved_amp).save_latest(7)
    resumed = tiny_trainer(tmp_path, "fp16")
    with LogLines() as lines:
        resumed.restore(str(tmp_path / "latest.pth"))
    assert resumed.start_iter == 7 and resumed.scaler.is_enabled() and resumed.scaler.get_scale() == 65536.0
    assert f"{tmp_path / 'latest.pth'}: no grad-scaler state (written without --amp fp16); the fp16 loss scale " \
           f"starts at 65536" in lines, lines


def test_the_scaler_state_still_resumes_across_fp16_and_is_noted_without(tmp_path) -> None:
    saving = tiny_trainer(tmp_path, "fp16")
    saving.scaler.scale(torch.ones(()))  # creates the scale tensor
    saving.scaler.update(1024.0)
    saving.save_latest(3)
    fp16 = tiny_trainer(tmp_path, "fp16")
    fp16.restore(str(tmp_path / "latest.pth"))
    assert fp16.scaler.get_scale() == 1024.0
    off = tiny_trainer(tmp_path, "off")
    with LogLines() as lines:
        off.restore(str(tmp_path / "latest.pth"))
    assert f"{tmp_path / 'latest.pth'}: its fp16 grad-scaler state is not used with --amp off" in lines, lines


# ---------------------------------------------------------------------------- 3. versions
@pytest.mark.parametrize("module, version", [("torch", "2.2.2+cu121"), ("torchvision", "0.17.2")])
def test_too_old_torch_or_torchvision_stops_with_one_line(module, version, monkeypatch, capsys) -> None:
    import importlib

    from engine.launch import main_entry

    monkeypatch.setattr(importlib.import_module(module), "__version__", version)
    ran = []
    rc = main_entry(lambda rank, args: ran.append(rank), SimpleNamespace(debug=False, resume="", stage="evaluate", resume_from="", dist=False, gpus=[0]))
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and not ran
    assert err == [(f"error: {module} {version} is too old: this code needs torch >= 2.3 and torchvision >= 0.18 "
                    f"(pip install -r requirements.txt)")]


def test_this_torch_passes_and_requirements_state_the_same_minimum(capsys) -> None:
    from engine.common import MIN_TORCH, MIN_TORCHVISION
    from engine.launch import main_entry

    ran = []
    assert main_entry(lambda rank, args: ran.append(rank), SimpleNamespace(debug=False, resume="", stage="evaluate", resume_from="", dist=False, gpus=[0])) == 0
    assert ran == [-1]
    text = Path(REPO, "requirements.txt").read_text(encoding="utf-8")
    for name, need in (("torch", MIN_TORCH), ("torchvision", MIN_TORCHVISION)):
        found = re.search(rf"^{name}>=(\d+)\.(\d+)\s*$", text, re.MULTILINE)
        assert found and (int(found.group(1)), int(found.group(2))) == need, f"requirements.txt: {name}"
