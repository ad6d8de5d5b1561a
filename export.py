"""Export the target branch of any checkpoint as an ONNX model (docs/INFERENCE.md).

    python3 export.py --resume snapshots/GTA2Cityscapes_phase2/GTA5_40000.pth --out model.onnx \\
        [--size 2048,1024] [--dynamic] [--argmax]
"""

from __future__ import annotations

import sys

from stages.export import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
