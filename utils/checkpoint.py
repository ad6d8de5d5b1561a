"""Checkpoint I/O: atomic ``torch.save`` (through :mod:`utils.files`) and safe (``weights_only``) loads."""

from __future__ import annotations

import os
import re
import warnings
from typing import Any

import torch

from utils.files import atomic_open


class CheckpointError(ValueError):
    """A checkpoint does not fit the network (unknown layout, missing/unexpected key, shape), or a
    file is not the kind of checkpoint it should be."""


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` made atomic (:func:`utils.files.atomic_open`)."""
    with atomic_open(path) as f:
        torch.save(obj, f)


def _load_failure(exc: Exception) -> str:
    """One line on why ``torch.load(weights_only=True)`` failed (its message spans paragraphs)."""
    text = str(exc).strip()
    refused = re.search(r"GLOBAL ([\w.]+)", text)
    if refused:
        return f"refusing to load {refused.group(1)!r}: only tensors and plain data are allowed"
    if "Weights only load failed" in text:
        detail = [ln.strip() for ln in text.partition("WeightsUnpickler error:")[2].splitlines() if ln.strip()]
        return "refused by the weights-only unpickler" + (f": {detail[0]}" if detail else "")
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def safe_load(path: str, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with a clear error naming the file.

    ``weights_only=True`` refuses pickles that would construct arbitrary objects, so a crafted
    file cannot execute code. Our own training states only hold tensors, numbers, strings and
    plain containers.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint file not found")
    with warnings.catch_warnings(record=True) as caught:  # a refused file: the error line says it all
        warnings.simplefilter("always")
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{path}: not a loadable checkpoint ({_load_failure(exc)})") from exc
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return state
