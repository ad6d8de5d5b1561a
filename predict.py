"""Predict with the target branch of any checkpoint (or an ONNX model of export.py) on images or
videos (docs/INFERENCE.md).

    python3 predict.py --resume snapshots/GTA2Cityscapes_phase2/GTA5_40000.pth --input street_photos/ \\
        [--output predictions/] [--flip] [--scales 0.75,1.0,1.25] [--size 2048,1024] [--batch_size N] [--cpu]
    python3 predict.py --resume CKPT --input drive.mp4          # overlay/drive.mp4, same frame rate and size
    python3 predict.py --onnx model.onnx --input street_photos/  # onnxruntime, without PyTorch
"""

from __future__ import annotations

import sys

from stages.prediction import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
