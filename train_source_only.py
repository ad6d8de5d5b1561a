"""Train DeepLab-v2 ResNet-101 on the source domain only and write sourceonly.pth.

    python3 train_source_only.py --snapshot-dir ./snapshots/GTA5_sourceonly --batch-size 8 \\
        --gpus 0,1,2,3 --dist --src_rootpath DATA/gta5 --tgt_rootpath DATA/cityscapes
Starts from pretrained/resnet101-5d3b4d8f.pth (``--imagenet``) unless ``--resume`` is given.
"""

from __future__ import annotations

import sys
from typing import Any

from engine.launch import main_entry, seed_everything, setup_run, training_worker
from engine.trainer import run_stage
from stages.options import parse_args
from stages.source_only import SourceOnlyStage, export_sourceonly


def worker(env, args: Any) -> None:
    writer = setup_run(args, env, "source_only")
    seed_everything(args.random_seed, env.rank)
    trainer = run_stage(SourceOnlyStage(args, env), writer)
    export_sourceonly(trainer.stage)


if __name__ == "__main__":
    sys.exit(main_entry(training_worker(worker), parse_args("source_only", __doc__.splitlines()[0])))
