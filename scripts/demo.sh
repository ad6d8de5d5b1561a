#!/usr/bin/env bash
# One command for a first look: set up .venv (if needed) from requirements.txt, then run the whole
# pipeline (pipeline.py recipes/demo.yaml) on generated data via scripts/demo.py (results in ./demo_out,
# report in demo_out/report.md, figure in figs/demo.png).
# Usage: bash scripts/demo.sh [--quick] [--out DIR] [any pipeline.py flag, e.g. --seeds 1234,1235 or --set ...]
# Needs only Python 3.10+ (and, the first time, network access to install PyTorch & co.).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null; then
    echo "error: $PYTHON is not Python 3.10 or newer (set PYTHON=/path/to/python3.10+)" >&2
    exit 2
fi
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, torchvision, cv2, scipy, tensorboardX, tqdm, yaml" 2>/dev/null; then
    echo "installing requirements into .venv (first run: PyTorch is a few GB, a few minutes)"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -r requirements.txt
fi
exec .venv/bin/python scripts/demo.py "$@"
