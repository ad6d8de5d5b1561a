"""Kill-and-restart check of DDP training through the real launchers (README "Reliability").

The scenario of ``tests/reliability/test_ddp.py``, for a lent GPU machine (NCCL) or the CPU
(gloo): a tiny phase-1 run on synthetic data under ``torchrun``, uninterrupted, then again with
one worker SIGKILLed at iteration 3 under ``torchrun --max-restarts 2 ... --resume_from auto``;
the final weights and ``latest.pth`` are compared (bit-identical is expected on the CPU; on GPUs
the report gives the largest difference). With two or more devices a ``--dist`` spawned rank is
killed too: the seconds until the job ends and its one stderr line are reported. Every run is
bounded by ``--timeout`` seconds.

    python benchmarks/ddp_check.py --device cuda      # benchmarks/gpu_ddp_check.sh
    python benchmarks/ddp_check.py --device cpu       # the same on the CPU with gloo
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

STEPS = 4


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--timeout", type=float, default=75.0, help="seconds per launcher run")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (checkpoints: about 3 GB)")
    opts = parser.parse_args()

    from datasets.synthetic import generate
    from tests.helpers import filled_sourceonly_checkpoint

    gpus = torch.cuda.device_count() if opts.device == "cuda" else 0
    if opts.device == "cuda" and gpus == 0:
        print("no CUDA device: nothing to check")
        return 1
    nproc = 2 if opts.device == "cpu" or gpus >= 2 else 1
    work = Path(tempfile.mkdtemp(prefix="ddp_check_"))
    data = generate(work / "data", seed=0, size=(128, 64), num_source=6, num_target_train=4, num_target_val=2)
    ckpt = work / "start.pth"
    torch.save(filled_sourceonly_checkpoint(1), ckpt)
    device = ["--cpu"] if opts.device == "cpu" else ["--amp", "off"]
    backend = "gloo" if opts.device == "cpu" else "nccl"
    print(f"== DDP kill-and-restart check: {nproc} rank(s), {backend}, torch {torch.__version__}"
          + (f", {torch.cuda.get_device_name(0)}" if gpus else ""))

    def phase1(snap: str, *extra: str) -> list[str]:
        return ["train_phase1.py", *device, "--quiet", "--src_rootpath", data["gta5"], "--tgt_rootpath",
                data["cityscapes"], "--src_img_size", "128,64", "--tgt_img_size", "128,64", "--resize", "128",
                "--rcrop", "64,32", "--batch_size_val", str(nproc), "--resume", str(ckpt), "--snapshot-dir",
                str(work / snap), "--num-workers", "0", "--batch-size", str(2 * nproc), "--num-steps", str(STEPS),
                "--num-steps-stop", str(STEPS), "--save-pred-every", "100", "--save_latest_every", "2", *extra]

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0", "--max-restarts", "2"]
    ok = True
    rc, out, err, secs = run([*torchrun, *phase1("reference")], opts.timeout)
    print(f"uninterrupted torchrun run: exit {rc}, {secs:.0f}s")
    ok &= rc == 0
    fault = {"DECOUPLENET_FAULT": "kill_at_iter:3", "DECOUPLENET_FAULT_RANK": str(nproc - 1)}
    rc, out, err, secs = run([*torchrun, *phase1("killed", "--resume_from", "auto")], opts.timeout, fault)
    restarted = "exitcode: -9" in err and "latest.pth at iteration 2" in out
    print(f"rank {nproc - 1} SIGKILLed at iteration 3, torchrun restart: exit {rc}, {secs:.0f}s, "
          f"restarted from iteration 2: {'yes' if restarted else 'no'}")
    ok &= rc == 0 and restarted
    if rc == 0 and (work / "reference" / f"GTA5_{STEPS}.pth").is_file():
        for name in (f"GTA5_{STEPS}.pth", "latest.pth"):
            a = torch.load(work / "reference" / name, map_location="cpu", weights_only=True)
            b = torch.load(work / "killed" / name, map_location="cpu", weights_only=True)
            diff = max_difference(a, b)
            print(f"  {name}: " + ("bit-identical" if diff == 0 else f"largest difference {diff:.3g}"))
            ok &= opts.device == "cuda" or diff == 0
    else:
        print(err[-3000:])
    if nproc == 2:
        gpu_flags = ["--dist", "--gpus", "0,1"]
        rc, out, err, secs = run([sys.executable, *phase1("spawned", *gpu_flags)], opts.timeout, fault)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        print(f"--dist spawned rank 1 SIGKILLed at iteration 3: exit {rc}, {secs:.0f}s in all, "
              f"{len(lines)} stderr line(s)")
        print("  " + (lines[-1] if lines else "(no stderr)"))
        ok &= rc == 1 and len(lines) == 1 and "rank 1 was killed by SIGKILL" in lines[0]
        if lines and "continue with: " in lines[-1]:
            command = shlex.split(lines[-1].split("continue with: ", 1)[1])
            rc, out, err, secs = run(command, opts.timeout)
            print(f"  the printed command: exit {rc}, {secs:.0f}s, "
                  f"resumed at iteration 2: {'yes' if 'latest.pth at iteration 2' in out else 'no'}")
            ok &= rc == 0
    else:
        print("one GPU: the --dist spawning part needs two")
    if opts.keep:
        print(f"work folder kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    print(f"== DDP check: {'passed' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
