"""Shared test helpers: the deterministic "filled" weights of the parity fixtures, paths."""

from __future__ import annotations

import os
import zlib
from collections import OrderedDict

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARITY = os.path.join(REPO, "tests", "data", "parity")


def filled_tensor(group: str, key: str, like: torch.Tensor) -> torch.Tensor:
    """The value of ``group/key`` under the fill rule of tests/data/parity/README.md."""
    if not like.is_floating_point():
        return like.clone()
    rng = np.random.default_rng(zlib.crc32(f"{group}/{key}".encode()))
    shape = tuple(like.shape)
    if key.endswith("running_var"):
        arr = rng.uniform(0.5, 1.5, shape)
    elif len(shape) == 4:
        arr = rng.standard_normal(shape) * np.sqrt(1.0 / (shape[1] * shape[2] * shape[3]))
    elif key.endswith("weight"):
        arr = rng.uniform(0.5, 1.5, shape)
    else:
        arr = rng.standard_normal(shape) * 0.1
    return torch.from_numpy(np.asarray(arr, dtype=np.float32))


def filled_state(group: str, state: dict) -> OrderedDict:
    return OrderedDict((k, filled_tensor(group, k, v)) for k, v in state.items())


def filled_phase1_checkpoint(net) -> dict:
    """An official phase-1 checkpoint dict of ``net``'s layout holding the filled weights."""
    official = net.official_state(phase=1)
    return OrderedDict(
        (name, filled_state(name[: -len("_state_dict")], sd)) for name, sd in official.items()
    )


def filled_sourceonly_checkpoint(layer: int = 1, num_classes: int = 19) -> dict:
    """Source-only format: backbone = the model_B2 and model_B fills (parity README, phase1_step)."""
    from model import DecoupleNet
    from model.decouplenet import RESNET_CHILDREN

    net = DecoupleNet(num_classes=num_classes, layer=layer, decoupled=False, aux=False)
    official = net.official_state(phase=2)
    split = 4 + layer
    backbone = OrderedDict()
    for group, offset in (("model_B2", 0), ("model_B", split)):
        for key, value in filled_state(group, official[f"{group}_state_dict"]).items():
            idx, _, rest = key.partition(".")
            backbone[f"backbone.{RESNET_CHILDREN[int(idx) + offset]}.{rest}"] = value
    return {
        "model_state_dict": backbone,
        "head_state_dict": filled_state("head", official["head_state_dict"]),
        "classifier_state_dict": filled_state("classifier", official["classifier_state_dict"]),
    }
