"""Phase 2 of DecoupleNet: Online Enhanced Self-Training with soft pseudo labels (docs/METHOD.md section 6).

    python3 train_phase2.py --snapshot-dir ./snapshots/GTA2Cityscapes_phase2 --batch-size 8 \\
        --gpus 0,1,2,3 --dist --tensorboard --learning-rate 5e-4 --batch_size_val 4 \\
        --soft_labels_folder ./datasets/gta2city_soft_labels --resume PHASE1.pth \\
        --thresholds_path ./datasets/gta2city_soft_labels_thresholds_p0.8.npy \\
        --src_rootpath DATA/gta5 --tgt_rootpath DATA/cityscapes
"""

from __future__ import annotations

import sys
from typing import Any

from engine.launch import main_entry, seed_everything, setup_run, training_worker
from engine.trainer import run_stage
from stages.options import parse_args
from stages.phase2 import Phase2Stage


def worker(env, args: Any) -> None:
    writer = setup_run(args, env, "phase2")
    seed_everything(args.random_seed, env.rank)
    run_stage(Phase2Stage(args, env), writer)


if __name__ == "__main__":
    sys.exit(main_entry(training_worker(worker), parse_args("phase2", __doc__.splitlines()[0])))
