"""Every collective takes tensors on the run's device (NCCL rejects any other; gloo does not).

A GPU run's process group is NCCL, which refuses a CPU tensor ("No backend type associated with
device type cpu"); the CPU test suite runs gloo, which takes tensors anywhere. So the rule is
checked in two ways that need no GPU:

* statically: no module of the project calls a ``torch.distributed`` collective except the
  wrappers of ``utils/distributed.py``, and each wrapper checks its tensor's device
  (:func:`utils.distributed.check_collective`);
* dynamically: the real stages (soft labels, phase 1 with validation and the ``latest.pth``
  gathering, phase 2, the pseudo-label monitor) run in this process under
  :class:`tests.placement.Placement`, which marks every tensor a GPU run would hold on the host
  (made without ``device=``, ``.cpu()``, ...: see its docstring). On the CPU the run's device is
  the default device, so ``tensor.device`` alone cannot tell ``torch.tensor([n])`` from
  ``torch.tensor([n], device=env.device)``; the marks can. Every call of the wrappers' check is
  recorded with its caller, and the test fails on a host-placed tensor, naming the line.
"""

from __future__ import annotations

import ast
import importlib
import logging
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_args
from tests.helpers import REPO
from tests.placement import Placement, on_host

pytestmark = pytest.mark.slow  # runs the scripts end to end or a training loop (tests/README.md)

COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast", "broadcast_object_list",
    "gather", "gather_object", "reduce", "reduce_scatter", "reduce_scatter_tensor", "scatter", "scatter_object_list",
    "barrier", "monitored_barrier", "all_to_all", "all_to_all_single", "send", "recv", "isend", "irecv",
    "batch_isend_irecv",
}


def _project_sources() -> list[Path]:
    skip = {".venv", ".git", "__pycache__", "tests"}
    out = []
    for path in sorted(Path(REPO).rglob("*.py")):
        rel = path.relative_to(REPO)
        if not (set(rel.parts[:-1]) & skip or any(p.startswith(".") for p in rel.parts[:-1])):
            out.append(path)
    return out


def raw_collectives(source: str) -> list[int]:
    """Lines of ``source`` that call or import a ``torch.distributed`` collective directly."""
    tree = ast.parse(source)
    aliases = set()  # names bound to torch.distributed
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name == "torch.distributed" and a.asname}
        elif isinstance(node, ast.ImportFrom):
            if node.module == "torch" and any(a.name == "distributed" for a in node.names):
                aliases |= {a.asname or a.name for a in node.names if a.name == "distributed"}
            if node.module and node.module.startswith("torch.distributed") and \
                    any(a.name in COLLECTIVES for a in node.names):
                found.append(node.lineno)

    def is_dist(value: ast.expr) -> bool:
        if isinstance(value, ast.Name):
            return value.id in aliases
        return (isinstance(value, ast.Attribute) and value.attr == "distributed"
                and isinstance(value.value, ast.Name) and value.value.id == "torch")

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES and is_dist(node.value):
            found.append(node.lineno)
    return sorted(found)


def test_the_scan_finds_raw_collectives() -> None:
    code = ("import torch.distributed as dist\nimport torch\nfrom torch import distributed as d2\n"
            "from torch.distributed import all_gather\n"
            "dist.all_reduce(x)\ntorch.distributed.barrier()\nd2.gather_object(o, out)\nx.all_reduce()\n")
    assert raw_collectives(code) == [4, 5, 6, 7]


def test_no_raw_collective_outside_the_wrappers() -> None:
    sources = _project_sources()
    assert len(sources) > 40, "the scan found too few files"
    bad = []
    for path in sources:
        rel = path.relative_to(REPO).as_posix()
        lines = raw_collectives(path.read_text(encoding="utf-8"))
        if rel == "utils/distributed.py":
            assert lines, "utils/distributed.py holds the wrappers: the scan is broken"
            continue
        bad += [f"{rel}:{line}" for line in lines]
    assert not bad, "torch.distributed collectives outside utils/distributed.py (use its wrappers):\n" + "\n".join(bad)


@pytest.mark.parametrize("call", ["all_reduce_sum", "all_reduce_mean"])
def test_wrappers_refuse_a_tensor_off_the_runs_device(call) -> None:
    """``meta`` stands for a GPU here: a CPU tensor handed to a run on another device is refused."""
    from utils import distributed as du

    with pytest.raises(du.CollectiveDeviceError, match="tensor on cpu, but the run's device is meta"):
        getattr(du, call)(torch.zeros(2), torch.device("meta"))
    assert getattr(du, call)(torch.ones(2), torch.device("cpu")).tolist() == [1.0, 1.0]


def test_gathered_objects_hold_cpu_tensors_only() -> None:
    """Objects travel pickled: a tensor off the CPU in them would land on rank 0's GPU of its index."""
    from utils import distributed as du

    with pytest.raises(du.CollectiveDeviceError, match=r"/rng\[0\] on meta; .*keep their tensors on the CPU"):
        du.gather_to_main({"rng": [torch.zeros(1, device="meta")]}, torch.device("cpu"))
    assert du.gather_to_main({"x": torch.zeros(1)}, torch.device("cpu"))[0]["x"].shape == (1,)


# ---------------------------------------------------------------------------- every stage, recorded
class Recorder:
    """Wraps ``utils.distributed.check_collective``: one ``(op, caller, host_placed)`` per call."""

    def __init__(self, check) -> None:
        self.check = check
        self.calls: list[tuple[str, str, bool | None]] = []

    def __call__(self, op: str, device: torch.device, tensor: torch.Tensor | None = None) -> None:
        import sys

        frame = sys._getframe(2)  # the wrapper's caller
        caller = f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno} ({frame.f_code.co_name})"
        self.calls.append((op, caller, None if tensor is None else on_host(tensor)))
        self.check(op, device, tensor)


def run_in_process(script: str, stage: str, argv: list[str]) -> int:
    from engine.common import LOG
    from engine.launch import main_entry, training_worker
    from stages.options import parse_args

    module = importlib.import_module(script)
    try:
        return main_entry(training_worker(module.worker), parse_args(stage, "test", [str(a) for a in argv]))
    finally:
        for handler in list(LOG.handlers):  # setup_run's file handler of that run's folder
            handler.close()
            LOG.removeHandler(handler)


@pytest.fixture(scope="module")
def recorded(synthetic_data, sourceonly_ckpt, tmp_path_factory) -> list[tuple[str, str, bool | None]]:
    from utils import distributed as du

    root = tmp_path_factory.mktemp("collectives")
    base = [*tiny_args(synthetic_data), "--num-workers", "0", "--print-every", "1"]
    recorder = Recorder(du.check_collective)
    mp = pytest.MonkeyPatch()
    mp.setattr(du, "check_collective", recorder)
    try:
        with Placement():
            soft = root / "soft"
            assert run_in_process("generate_soft_label", "soft_label", [
                *base, "--resume", sourceonly_ckpt, "--output_folder", soft, "--snapshot-dir", root / "s"]) == 0
            thresholds = root / "thresholds.npy"
            import numpy as np

            np.save(thresholds, np.full(19, 0.3))
            # Phase 1: validation after iteration 1, the training state (gathered) after iteration 2.
            assert run_in_process("train_phase1", "phase1", [
                *base, "--resume", sourceonly_ckpt, "--snapshot-dir", root / "p1", "--num-steps", "3", "--num-steps-stop", "3",
                "--save-pred-every", "1", "--save_latest_every", "100"]) == 0
            assert run_in_process("train_phase2", "phase2", [
                *base, "--resume", sourceonly_ckpt, "--snapshot-dir", root / "p2", "--num-steps", "2", "--num-steps-stop", "2",
                "--soft_labels_folder", soft, "--thresholds_path", thresholds]) == 0
            # A stop request from the start (as if SIGUSR1 had come): phase 1 stops after iteration 0,
            # the soft labels after their first batch; both through engine.launch.stop_run.
            from utils import signals

            mp.setattr(signals, "requested", lambda: "SIGUSR1")
            assert run_in_process("train_phase1", "phase1", [
                *base, "--resume", sourceonly_ckpt, "--snapshot-dir", root / "p1_stopped", "--num-steps", "3",
                "--num-steps-stop", "3", "--save_latest_every", "100"]) == signals.EXIT_STOPPED
            assert run_in_process("generate_soft_label", "soft_label", [
                *base, "--resume", sourceonly_ckpt, "--output_folder", root / "soft_stopped",
                "--snapshot-dir", root / "s_stopped"]) == signals.EXIT_STOPPED
    finally:
        mp.undo()
        logging.getLogger("decouplenet").handlers.clear()
        for path in root.rglob("*.pth"):
            path.unlink()
    return recorder.calls


def test_every_collective_tensor_is_on_the_runs_device(recorded) -> None:
    host = sorted({f"{op} at {caller}" for op, caller, placed in recorded if placed})
    assert not host, ("collectives given tensors that a GPU run would hold on the host (NCCL rejects them):\n"
                      + "\n".join(host))


def test_every_stage_s_collectives_were_seen(recorded) -> None:
    """The run above reached the collectives of every stage (so the test above saw them)."""
    callers = {caller.split(" (")[1].rstrip(")") for _, caller, _ in recorded}
    expected = {
        "generate_soft_labels",  # written-files count, soft-label intersections and unions
        "all_ranks_agree",       # whether every rank has target ground truth
        "setup_run", "train",    # barriers
        "evaluate",              # validation (engine.validation.evaluate)
        "pseudo_labels",         # phase 1's class thresholds
        "train_step",            # losses and pseudo-label counts
        "training_state",        # latest.pth: every rank's own state gathered
        "stop_run",              # barriers around the line of a run stopped on a signal
    }
    assert expected <= callers, f"not reached: {sorted(expected - callers)}; seen {sorted(callers)}"
    tensors = [op for op, _, placed in recorded if placed is not None]
    assert len(tensors) >= 10, recorded
