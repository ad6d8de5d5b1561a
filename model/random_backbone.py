"""A randomly initialised ResNet-101 in the ImageNet (torchvision) file format.

    python3 -m model.random_backbone --out pretrained/resnet101_random_init.pth [--seed 0]

For runs without the real ImageNet weights (``pretrained/resnet101-5d3b4d8f.pth``), such as the
demo on generated data (docs/DEMO.md): ``train_source_only.py --imagenet`` reads the file as it
reads the real one. ``zero_init_residual=True`` (each block's last BatchNorm starts at 0, so
every residual block starts as the identity) keeps a 101-layer network trainable from scratch
at the demo's learning rate; with torchvision's plain default init the loss diverges.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from utils.checkpoint import atomic_save


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python3 -m model.random_backbone",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the .pth file to write")
    parser.add_argument("--seed", type=int, default=0, help="torch seed of the initialisation")
    return parser


def write_random_resnet101(path: str, seed: int = 0) -> None:
    """torchvision's ResNet-101 drawn at ``seed`` (residual branches zero-initialised), saved to ``path``."""
    import torch
    import torchvision

    torch.manual_seed(seed)
    state = torchvision.models.resnet101(weights=None, zero_init_residual=True).state_dict()
    atomic_save(state, path)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_random_resnet101(args.out, args.seed)
    print(f"random ResNet-101 (seed {args.seed}) written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
