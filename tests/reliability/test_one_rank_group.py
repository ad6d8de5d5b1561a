"""One rank under a launcher still gets a process group, so the DDP and collective paths run.

``torchrun --nproc_per_node 1`` and ``--dist`` with one entry in ``--gpus`` (on the CPU: gloo)
must create a process group of one rank and wrap the network in DDP, as a multi-rank run does
(on a one-GPU machine that is the only way to exercise NCCL's paths: DDP, all-reduce,
``gather_object``). A plain single process has none. All three compute the same training: the
final checkpoint, every tensor of ``latest.pth`` and every loss are bit-identical.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import assert_same_state, run_script
from tests.reliability.conftest import phase1_argv
from tests.reliability.runner import BASE_ENV

pytestmark = pytest.mark.slow  # runs the scripts end to end or a training loop (tests/README.md)

STEPS = 2
SCHEDULE = ["--batch-size", "1", "--num-steps", str(STEPS), "--num-steps-stop", str(STEPS),
            "--save-pred-every", "100", "--save_latest_every", str(STEPS), "--print-every", "1"]
TORCHRUN = ["-m", "torch.distributed.run", "--nproc_per_node", "1", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", "127.0.0.1:0"]
DDP_LINE = "DDP wrapper over 1 rank(s), gloo backend"


@pytest.fixture(scope="module")
def runs(synthetic_data, sourceonly_ckpt, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    root = tmp_path_factory.mktemp("one_rank")
    out = {}
    for name, prefix, extra in (("plain", [], []), ("torchrun", TORCHRUN, []),
                                ("dist", [], ["--dist", "--gpus", "0"])):
        snap = root / name
        argv = [*prefix, *phase1_argv(synthetic_data, sourceonly_ckpt, snap, *SCHEDULE, *extra)]
        proc = run_script([str(a) for a in argv], env=BASE_ENV)
        out[name] = (snap, proc.stdout + proc.stderr)
    yield out
    for path in root.rglob("*.pth"):
        path.unlink(missing_ok=True)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _losses(snap: Path) -> list[dict]:
    with open(snap / "metrics.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [{k: v for k, v in r.items() if k.startswith("loss") or k == "iter"} for r in rows]


def test_launched_single_rank_has_a_process_group_and_ddp(runs) -> None:
    for name in ("torchrun", "dist"):
        assert "rank 0/1 on cpu, process group gloo" in runs[name][1], f"{name}:\n{runs[name][1][-4000:]}"
        assert DDP_LINE in runs[name][1], f"{name}:\n{runs[name][1][-4000:]}"
    assert "rank 0/1 on cpu, process group none" in runs["plain"][1], runs["plain"][1][-4000:]
    assert "DDP wrapper" not in runs["plain"][1], runs["plain"][1][-4000:]


@pytest.mark.parametrize("name", ["torchrun", "dist"])
def test_launched_single_rank_computes_the_plain_runs_training(runs, name) -> None:
    plain, other = runs["plain"][0], runs[name][0]
    assert_same_state(load(plain / f"GTA5_{STEPS}.pth"), load(other / f"GTA5_{STEPS}.pth"), f"{name}: GTA5_{STEPS}")
    la, lb = load(plain / "latest.pth"), load(other / "latest.pth")
    assert la["world_size"] == lb["world_size"] == 1
    for key in la:
        if key != "args":  # folders and launcher flags differ
            assert_same_state(la[key], lb[key], f"{name}: latest.pth/{key}")
    assert _losses(plain) == _losses(other) and len(_losses(plain)) == STEPS

