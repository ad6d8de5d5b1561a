"""The whole protocol of a recipe in one command, for one or several seeds, with its report.

    python3 pipeline.py recipes/gta5_to_cityscapes.yaml --out runs/gta5 \
        --src_rootpath DATA/gta5 --tgt_rootpath DATA/cityscapes --seeds 1234,1235,1236
    python3 pipeline.py                      # the demo: recipes/demo.yaml on generated data

See docs/PIPELINE.md (recipes, stages that resume, the report) and ``--help``.
"""

import sys

from runner.cli import main

if __name__ == "__main__":
    sys.exit(main())
