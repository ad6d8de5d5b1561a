"""Write the target-branch logits of every Cityscapes train image (docs/METHOD.md section 4).

    python3 generate_soft_label.py --snapshot-dir ./snapshots/GTA2Cityscapes_generate_soft_labels \\
        --batch-size 8 --gpus 0,1,2,3 --dist --tensorboard --batch_size_val 4 --resume PHASE1.pth \\
        --output_folder ./datasets/gta2city_soft_labels --no_droplast \\
        --src_rootpath DATA/gta5 --tgt_rootpath DATA/cityscapes
"""

from __future__ import annotations

import sys
from typing import Any

from engine.launch import main_entry, seed_everything, setup_run, training_worker
from stages.options import parse_args
from stages.soft_labels import generate_soft_labels


def worker(env, args: Any) -> None:
    writer = setup_run(args, env, "soft_labels")
    seed_everything(args.random_seed, env.rank)
    generate_soft_labels(args, env)
    if writer is not None:
        writer.close()


if __name__ == "__main__":
    sys.exit(main_entry(training_worker(worker), parse_args("soft_label", __doc__.splitlines()[0])))
