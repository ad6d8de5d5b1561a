"""Evaluate any checkpoint (phase 1, phase 2, source-only) on Cityscapes val.

    python3 evaluate.py --resume snapshots/GTA2Cityscapes_phase2/GTA5_40000.pth \\
        --tgt_rootpath DATA/cityscapes [--flip] [--scales 0.75,1.0,1.25] [--save_dir preds/]
"""

from __future__ import annotations

import sys
from typing import Any

from engine.launch import main_entry, setup_run, training_worker
from stages.evaluation import run_evaluation
from stages.options import parse_args


def worker(env, args: Any) -> None:
    setup_run(args, env, "evaluate")
    run_evaluation(args, env)


if __name__ == "__main__":
    argv = sys.argv[1:]
    if not any(a.startswith("--snapshot-dir") for a in argv):
        argv += ["--snapshot-dir", "./snapshots/evaluate"]
    sys.exit(main_entry(training_worker(worker), parse_args("evaluate", __doc__.splitlines()[0], argv)))
