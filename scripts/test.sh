#!/usr/bin/env bash
# Set up .venv (if needed) from requirements.txt, requirements-dev.txt and requirements-onnx.txt and run
# the test suite.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, torchvision, cv2, scipy, tensorboardX, tqdm, yaml, pytest, cityscapesscripts, onnx, onnxscript, onnxruntime" 2>/dev/null; then
    echo "installing requirements into .venv (first run: PyTorch is a few GB, a few minutes)"
    # --no-cache-dir: no second copy of the wheels on disk (the suite's checkpoints need the room)
    .venv/bin/python -m pip install -q --no-cache-dir --upgrade pip
    .venv/bin/python -m pip install -q --no-cache-dir -r requirements.txt -r requirements-dev.txt -r requirements-onnx.txt
fi
if [ "$#" -eq 0 ]; then set -- tests; fi
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
