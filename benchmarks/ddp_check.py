"""DDP / NCCL check through the real launchers (docs/RELIABILITY.md), bounded by ``--budget``.

For a lent GPU machine (NCCL; ``benchmarks/gpu_ddp_check.sh``) or the CPU (gloo). On generated
data (128x64 images), under ``torchrun --nproc_per_node N`` (N = 1 on a one-GPU machine: the
process group, the DDP wrapper and every collective still run, as with several ranks):

1. phase 1, 4 iterations, uninterrupted (the reference);
2. ``generate_soft_label.py`` from its final checkpoint (all-reduced file count and mIoU: the
   path where a CPU tensor given to NCCL would crash), then ``datasets/get_thresholds.py``;
3. phase 2, 2 iterations, from those soft labels and thresholds;
4. phase 1 again with the last rank SIGKILLed at iteration 3 under ``torchrun --max-restarts 2
   ... --resume_from auto``: the restarted group must resume from iteration 2 and finish; its
   final weights and ``latest.pth`` are compared with the reference (bit-identical expected on
   the CPU; on GPUs the largest difference is reported);
5. with two or more ranks, a ``--dist`` spawned rank killed: the seconds until the job ends,
   its one stderr line, and the printed command that continues it.

Runs 1-3 and 4-5 are two chains that run at the same time (independent jobs, each with its own
torchrun and process group). Each run prints, from its own log, what it exercised (process
group and backend, DDP wrapper) and is bounded by ``--timeout`` and by what is left of
``--budget``; parts that no longer fit are reported as skipped. Every report is printed as soon
as it is known.

    python benchmarks/ddp_check.py --device cuda --budget 160     # benchmarks/gpu_ddp_check.sh
    python benchmarks/ddp_check.py --device cpu --nproc 1         # the same on the CPU with gloo
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

STEPS = 4
PHASE2_STEPS = 2
MIN_RUN_S = 10.0  # a run is not started with less time left than this


class Clock:
    """What is left of the budget; each run gets ``min(timeout, left)`` seconds."""

    def __init__(self, budget: float, per_run: float) -> None:
        self.end = time.monotonic() + budget
        self.per_run = per_run

    def limit(self) -> float:
        return min(self.per_run, self.end - time.monotonic())


def run(argv: list[str], timeout: float, env: dict[str, str] | None = None) -> tuple[int, str, str, float]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("DECOUPLENET_FAULT")}
    full.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}, **(env or {}))
    start = time.monotonic()
    try:
        p = subprocess.run(argv, check=False, cwd=REPO, env=full, capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stdout, p.stderr, time.monotonic() - start
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        return 124, out, err, time.monotonic() - start


def max_difference(a: object, b: object) -> float:
    """Largest absolute difference over the tensors of two nested states (inf: different layout)."""
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.shape != b.shape:
            return float("inf")
        return 0.0 if torch.equal(a, b) else float((a.double() - b.double()).abs().max())
    if isinstance(a, dict):
        if not isinstance(b, dict) or set(a) != set(b):
            return float("inf")
        return max([max_difference(a[k], b[k]) for k in a if k != "args"] or [0.0])
    if isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            return float("inf")
        return max([max_difference(x, y) for x, y in zip(a, b)] or [0.0])
    return 0.0 if a == b or isinstance(a, str) else float("inf")


def exercised(out: str) -> str:
    """What a run's log says it ran: its process group and whether DDP wrapped the network."""
    group = re.search(r"process group (\w+)", out)
    ddp = re.search(r"DDP wrapper over (\d+) rank\(s\), (\w+) backend", out)
    text = f"process group {group.group(1) if group else '?'}"
    return text + (f", DDP wrapper over {ddp.group(1)} rank(s)" if ddp else ", no DDP wrapper")


def tail(text: str, n: int = 2500) -> str:
    return "  | " + "\n  | ".join(text[-n:].splitlines())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--nproc", type=int, default=0,
                        help="ranks per torchrun (default: 2 on the CPU or with two GPUs or more, else 1)")
    parser.add_argument("--budget", type=float, default=170.0, help="seconds for the whole check")
    parser.add_argument("--timeout", type=float, default=75.0, help="seconds per launcher run at most")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (checkpoints: about 3 GB)")
    opts = parser.parse_args()
    clock = Clock(opts.budget, opts.timeout)

    from datasets.synthetic import generate
    from tests.helpers import filled_sourceonly_checkpoint

    gpus = torch.cuda.device_count() if opts.device == "cuda" else 0
    if opts.device == "cuda" and gpus == 0:
        print("no CUDA device: nothing to check")
        return 1
    nproc = opts.nproc or (2 if opts.device == "cpu" or gpus >= 2 else 1)
    work = Path(tempfile.mkdtemp(prefix="ddp_check_"))
    data = generate(work / "data", seed=0, size=(128, 64), num_source=6, num_target_train=4, num_target_val=2)
    ckpt = work / "start.pth"
    torch.save(filled_sourceonly_checkpoint(1), ckpt)
    device = ["--cpu"] if opts.device == "cpu" else ["--amp", "off"]
    backend = "gloo" if opts.device == "cpu" else "nccl"
    print(f"== DDP check: torchrun with {nproc} rank(s), {backend}, torch {torch.__version__}"
          + (f", {torch.cuda.get_device_name(0)}" if gpus else "") + f"; budget {opts.budget:.0f}s", flush=True)

    common = [*device, "--quiet", "--src_rootpath", data["gta5"], "--tgt_rootpath", data["cityscapes"],
              "--src_img_size", "128,64", "--tgt_img_size", "128,64", "--resize", "128", "--rcrop", "64,32",
              "--batch_size_val", str(nproc), "--num-workers", "0", "--batch-size", str(2 * nproc),
              "--save-pred-every", "100", "--print-every", "1"]

    def phase1(snap: str, *extra: str) -> list[str]:
        return ["train_phase1.py", *common, "--resume", str(ckpt), "--snapshot-dir", str(work / snap),
                "--num-steps", str(STEPS), "--num-steps-stop", str(STEPS), "--save_latest_every", "2", *extra]

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0", "--max-restarts", "2"]
    results: dict[str, bool] = {}
    lock = threading.Lock()

    def say(*lines: str) -> None:
        with lock:  # the two chains print whole reports, never halves
            print("\n".join(lines), flush=True)

    def launch(what: str, argv: list[str], env: dict[str, str] | None = None,
               details: Callable[[int, str, str], list[str]] | None = None,
               script: bool = True) -> tuple[int, str, str] | None:
        limit = clock.limit()
        if limit < MIN_RUN_S:
            say(f"{what}: skipped (budget spent)")
            return None
        rc, out, err, secs = run(argv, limit, env)
        lines = [f"{what}: exit {rc}{' (time limit)' if rc == 124 else ''}, {secs:.0f}s"
                 + (f"; {exercised(out)}" if script else "")]
        lines += details(rc, out, err) if details else []
        say(*lines, *([tail(out + err)] if rc != 0 else []))
        return rc, out, err

    final = work / "reference" / f"GTA5_{STEPS}.pth"
    soft, thresholds = work / "soft", work / "thresholds.npy"

    def soft_details(rc: int, out: str, err: str) -> list[str]:
        written = re.search(r"soft labels: (\d+) files written", out)
        miou = "soft labels (argmax) vs train ground truth" in out
        results["soft_labels"] = rc == 0 and written is not None and int(written.group(1)) == 4
        return [(f"  all-reduced file count: {written.group(1) if written else 'not logged'} of 4; soft-label "
                 f"mIoU (all-reduced): {'logged' if miou else 'not logged'}")]

    def training_chain() -> None:
        """1-3: phase 1, the soft labels and thresholds from its checkpoint, phase 2 from them."""
        r = launch(f"phase 1, {STEPS} iterations, torchrun", [*torchrun, *phase1("reference")])
        results["phase1"] = r is not None and r[0] == 0 and final.is_file()
        if not results["phase1"]:
            return
        launch("generate_soft_label.py, torchrun",
               [*torchrun, "generate_soft_label.py", *common, "--resume", str(final), "--snapshot-dir",
                str(work / "soft_run"), "--output_folder", str(soft)], details=soft_details)
        if not results.get("soft_labels"):
            return
        r = launch("get_thresholds.py", [sys.executable, "datasets/get_thresholds.py", "0.8", str(soft),
                                         "--output", str(thresholds), "--quiet"], script=False)
        results["thresholds"] = r is not None and r[0] == 0 and thresholds.is_file()
        if not results["thresholds"]:
            return
        r = launch(f"phase 2, {PHASE2_STEPS} iterations, torchrun",
                   [*torchrun, "train_phase2.py", *common, "--resume", str(final), "--soft_labels_folder",
                    str(soft), "--thresholds_path", str(thresholds), "--snapshot-dir", str(work / "phase2"),
                    "--num-steps", str(PHASE2_STEPS), "--num-steps-stop", str(PHASE2_STEPS)])
        results["phase2"] = r is not None and r[0] == 0 and (work / "phase2" / f"GTA5_{PHASE2_STEPS}.pth").is_file()

    fault = {"DECOUPLENET_FAULT": "kill_at_iter:3", "DECOUPLENET_FAULT_RANK": str(nproc - 1)}

    def restart_details(rc: int, out: str, err: str) -> list[str]:
        restarted = "exitcode: -9" in err and "latest.pth at iteration 2" in out
        results["kill_restart"] = rc == 0 and restarted
        return [f"  restarted from iteration 2: {'yes' if restarted else 'no'}"]

    def fault_chain() -> None:
        """4-5: a rank killed under torchrun (restarted group), then a killed --dist rank."""
        launch(f"phase 1, rank {nproc - 1} SIGKILLed at iteration 3, torchrun restart",
               [*torchrun, *phase1("killed", "--resume_from", "auto")], fault, details=restart_details)
        if nproc < 2:
            say("one rank: the --dist spawning part needs two devices")
            return
        gpu_flags = ["--dist", "--gpus", ",".join(str(i) for i in range(nproc))]
        limit = clock.limit()
        if limit < MIN_RUN_S:
            say("--dist spawned rank killed: skipped (budget spent)")
            return
        rc, _out, err, secs = run([sys.executable, *phase1("spawned", *gpu_flags)], limit, fault)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        say(f"--dist spawned rank {nproc - 1} SIGKILLed at iteration 3: exit {rc}, {secs:.0f}s in all, "
            f"{len(lines)} stderr line(s)", "  " + (lines[-1] if lines else "(no stderr)"))
        results["spawned"] = rc == 1 and len(lines) == 1 and f"rank {nproc - 1} was killed by SIGKILL" in lines[0]
        if lines and "continue with: " in lines[-1]:
            r = launch("  the printed command", shlex.split(lines[-1].split("continue with: ", 1)[1]))
            resumed = r is not None and "latest.pth at iteration 2" in r[1]
            say(f"  resumed at iteration 2: {'yes' if resumed else 'no'}")
            results["spawned"] &= r is not None and r[0] == 0 and resumed

    # Two independent jobs at a time (each its own torchrun and process group): the budget then
    # holds both chains. The restarted run is compared with the reference once both have ended.
    with ThreadPoolExecutor(2) as pool:
        for future in [pool.submit(training_chain), pool.submit(fault_chain)]:
            future.result()
    killed = work / "killed" / f"GTA5_{STEPS}.pth"
    if results.get("kill_restart") and final.is_file() and killed.is_file():
        for name in (f"GTA5_{STEPS}.pth", "latest.pth"):
            a = torch.load(work / "reference" / name, map_location="cpu", weights_only=True)
            b = torch.load(work / "killed" / name, map_location="cpu", weights_only=True)
            diff = max_difference(a, b)
            say(f"  killed and restarted run, {name} against the uninterrupted run: "
                + ("bit-identical" if diff == 0 else f"largest difference {diff:.3g}"))
            results["kill_restart"] &= opts.device == "cuda" or diff == 0
    if opts.keep:
        print(f"work folder kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    wanted = ["phase1", "soft_labels", "thresholds", "phase2", "kill_restart"] + (["spawned"] if nproc >= 2 else [])
    ok = all(results.get(k, False) for k in wanted)
    print("== DDP check: " + ("passed" if ok else "FAILED") + " ("
          + ", ".join(f"{k} {'ok' if results.get(k) else 'FAILED' if k in results else 'not run'}" for k in wanted)
          + ")", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
