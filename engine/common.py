"""What every part of the engine shares: the run's logger, its error types, the progress bar and
the split of a batch over ranks."""

from __future__ import annotations

import logging
import sys

from engine.options import OptionError, major_minor
from utils import distributed as du

LOG = logging.getLogger("decouplenet")


class NonFiniteLossError(RuntimeError):
    """A loss became NaN/inf in a precision where that is not expected (fp32 / bf16)."""


class RunError(RuntimeError):
    """A problem with the run's set-up (folders, files); the message names it."""


# The oldest releases the code runs on: torch.amp.GradScaler(device) (fp16 training and the
# scaler of every run) arrived in torch 2.3, nn.Module.compile in 2.2; torchvision 0.18 is the
# release built for torch 2.3 (requirements.txt, README "Quick start").
MIN_TORCH = (2, 3)
MIN_TORCHVISION = (0, 18)


def check_versions() -> None:
    """Raise :class:`RunError` (one line) when torch or torchvision is older than the code needs."""
    import torch
    import torchvision

    for name, version, need in (("torch", torch.__version__, MIN_TORCH),
                                ("torchvision", torchvision.__version__, MIN_TORCHVISION)):
        if major_minor(version) < need:
            raise RunError(f"{name} {version} is too old: this code needs torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]} "
                           f"and torchvision >= {MIN_TORCHVISION[0]}.{MIN_TORCHVISION[1]} "
                           f"(pip install -r requirements.txt)")


def per_rank(total: int, env: du.DistEnv, flag: str) -> int:
    """Split a total batch over ranks; ``flag`` names the option in the error."""
    if total % env.world_size != 0:
        raise OptionError(f"{flag} {total} is not divisible by the world size {env.world_size}")
    return total // env.world_size


def progress(iterable=None, total: int | None = None, initial: int = 0, desc: str = "",
             env: du.DistEnv | None = None, quiet: bool = False):
    """tqdm on rank 0 unless ``--quiet``; a plain iterator otherwise."""
    from tqdm import tqdm

    disable = quiet or (env is not None and not env.is_main)
    return tqdm(iterable, total=total, initial=initial, desc=desc, disable=disable, dynamic_ncols=True,
                file=sys.stdout)
