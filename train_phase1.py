"""Phase 1 of DecoupleNet: decoupled stems + discriminators + Self-Discrimination (docs/METHOD.md section 3).

    python3 train_phase1.py --snapshot-dir ./snapshots/GTA2Cityscapes_phase1 --batch-size 8 \\
        --gpus 0,1,2,3 --dist --tensorboard --batch_size_val 4 \\
        --src_rootpath DATA/gta5 --tgt_rootpath DATA/cityscapes
"""

from __future__ import annotations

import sys
from typing import Any

from engine.launch import main_entry, seed_everything, setup_run, training_worker
from engine.trainer import run_stage
from stages.options import parse_args
from stages.phase1 import Phase1Stage


def worker(env, args: Any) -> None:
    writer = setup_run(args, env, "phase1")
    seed_everything(args.random_seed, env.rank)
    run_stage(Phase1Stage(args, env), writer)


if __name__ == "__main__":
    sys.exit(main_entry(training_worker(worker), parse_args("phase1", __doc__.splitlines()[0])))
