"""Benchmark: offline class thresholds, our get_thresholds.py vs the original's rule (docs/METHOD.md section 5).

For each N in ``--sizes`` (default 50,200,800), N real-size soft labels (19 x 128 x 256
float32 logits, as for a 2048x1024 Cityscapes image) are generated into a temporary
folder; then (a) ``datasets/get_thresholds.py`` and (b) a faithful re-implementation of
the original script (``benchmarks.reference_rules.original_get_thresholds``: one Python
list per class extended with every pixel, fully sorted) each run in a fresh subprocess.
Wall time and the child's peak resident memory (``ru_maxrss`` from ``os.wait4``) are
measured and both outputs must be identical.

    python benchmarks/bench_thresholds_offline.py [--sizes 50,200,800] [--p 0.8]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (19, 128, 256)


def make_soft_label(rng: np.random.Generator) -> np.ndarray:
    """Random logits with a class structure: blocks of one dominant class plus noise."""
    c, h, w = SHAPE
    blocks = rng.integers(0, c, size=(h // 16, w // 16))
    dominant = np.repeat(np.repeat(blocks, 16, axis=0), 16, axis=1)
    logits = rng.standard_normal(SHAPE).astype(np.float32)
    strength = rng.uniform(0.0, 6.0, size=(h, w)).astype(np.float32)
    np.put_along_axis(logits, dominant[None], np.take_along_axis(logits, dominant[None], 0) + strength, 0)
    return logits


def run_child(cmd: list[str], cwd: str) -> tuple[float, float]:
    """Run ``cmd``; return (wall seconds, peak RSS in MiB) of that child alone."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{err}")
    return wall, usage.ru_maxrss / 1024.0  # ru_maxrss is in KiB on Linux


def main() -> None:
    """Generate data, run both implementations per size, print a table (docs/METHOD.md section 5)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="50,200,800", help="comma-separated numbers of files")
    parser.add_argument("--p", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    py = sys.executable
    rng = np.random.default_rng(args.seed)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_thr_") as tmp:
        pool = os.path.join(tmp, "all")
        os.makedirs(pool)
        print(f"generating {sizes[-1]} soft labels {SHAPE} float32 ...", flush=True)
        for i in range(sizes[-1]):
            np.save(os.path.join(pool, f"city_{i:06d}_000019_leftImg8bit.npy"), make_soft_label(rng))
        names = sorted(os.listdir(pool))
        for n in sizes:
            folder = os.path.join(tmp, f"soft_{n}")
            os.makedirs(folder)
            for name in names[:n]:
                os.symlink(os.path.join(pool, name), os.path.join(folder, name))
            ours_out, ref_out = os.path.join(tmp, f"ours_{n}.npy"), os.path.join(tmp, f"ref_{n}.npy")
            ours = run_child(
                [py, "get_thresholds.py", str(args.p), folder, "--output", ours_out, "--quiet"],
                os.path.join(REPO, "datasets"),
            )
            ref_code = (
                "import sys, numpy as np; from benchmarks.reference_rules import original_get_thresholds; "
                "np.save(sys.argv[3], original_get_thresholds(sys.argv[1], float(sys.argv[2])))"
            )
            ref = run_child([py, "-c", ref_code, folder, str(args.p), ref_out], REPO)
            same = np.array_equal(np.load(ours_out), np.load(ref_out))
            if not same:
                raise SystemExit(f"MISMATCH for N={n}: {np.load(ours_out)} vs {np.load(ref_out)}")
            rows.append((n, ref, ours))
            print(f"N={n}: done", flush=True)

    print(f"\nsoft labels {SHAPE} float32, P={args.p}; each run in a fresh subprocess")
    print(f"{'N':>5} {'original s':>11} {'ours s':>8} {'speed-up':>9} {'original MiB':>13} {'ours MiB':>9} {'memory ratio':>13}")
    for n, (ref_s, ref_mb), (ours_s, ours_mb) in rows:
        print(
            f"{n:>5} {ref_s:11.2f} {ours_s:8.2f} {ref_s / ours_s:9.1f} {ref_mb:13.0f} {ours_mb:9.0f} {ref_mb / ours_mb:13.1f}"
        )
    print("results identical for every N: yes")


if __name__ == "__main__":
    main()
