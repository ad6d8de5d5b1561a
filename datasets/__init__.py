"""Data: labels, loaders, augmentation, class-balanced list, samplers (docs/METHOD.md section 1).

Importing the package is cheap: only the NumPy-level label helpers and the error type
are loaded eagerly; the loaders (which need torch / OpenCV) load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import DatasetError
from .labels import (
    CLASS_NAMES_13,
    CLASS_NAMES_16,
    CLASS_NAMES_19,
    IGNORE_LABEL,
    PALETTE,
    class_names,
    colorize,
    encode_labels,
    synthia_encode_labels,
)

_LAZY = {
    "GTA5Dataset": "gta5",
    "CityscapesDataset": "cityscapes",
    "SynthiaDataset": "synthia",
    "JointAugment": "transforms",
    "StreamSampler": "sampler",
    "ShardSampler": "sampler",
    "class_balanced_list": "class_balance",
    "load_label_info": "label_info",
    "save_label_info": "label_info",
}

__all__ = [
    "CLASS_NAMES_13",
    "CLASS_NAMES_16",
    "CLASS_NAMES_19",
    "IGNORE_LABEL",
    "PALETTE",
    "CityscapesDataset",
    "DatasetError",
    "GTA5Dataset",
    "JointAugment",
    "ShardSampler",
    "StreamSampler",
    "SynthiaDataset",
    "class_balanced_list",
    "class_names",
    "colorize",
    "encode_labels",
    "load_label_info",
    "save_label_info",
    "synthia_encode_labels",
]


def __getattr__(name: str) -> Any:
    """Load the heavier submodules on first access (PEP 562)."""
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
