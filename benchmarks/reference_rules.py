"""Faithful, slow re-implementations of the original DecoupleNet rules.

These functions mirror what the original code does with plain Python lists and full
sorts. They exist only as a yardstick: the benchmarks time them against our
implementations and the tests cross-check our results against them. Do not use them in
training.

* :func:`reference_update`: the phase-1 class-wise confidence banks (SPEC section 3).
* :func:`original_get_thresholds`: the offline class thresholds (SPEC section 5).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def reference_update(
    conf_bank: dict[int, list[float]],
    thresholds: np.ndarray,
    conf: torch.Tensor | np.ndarray,
    pred: torch.Tensor | np.ndarray,
    p: float,
    bank_length: int,
) -> np.ndarray:
    """Update the per-class confidence banks like the original (SPEC section 3).

    For every class ``c`` present in ``pred``: the confidences of the pixels predicted
    ``c`` (row-major order) are appended to ``conf_bank[c]``, then
    ``thresholds[c] = sorted(conf_bank[c], reverse=True)[int(len(conf_bank[c]) * p)]``,
    then only the newest ``bank_length`` values are kept. Absent classes keep their
    threshold. ``conf_bank`` and ``thresholds`` are modified in place; ``thresholds`` is
    also returned.
    """
    import torch  # imported here so that the offline benchmark's child stays torch-free

    conf_t = torch.as_tensor(conf)
    pred_t = torch.as_tensor(pred)
    for c in range(len(thresholds)):
        mask = pred_t == c
        if int(mask.sum()) == 0:
            continue
        bank = conf_bank.setdefault(c, [])
        bank.extend(conf_t[mask].float().cpu().tolist())
        thresholds[c] = sorted(bank, reverse=True)[int(len(bank) * p)]
        conf_bank[c] = bank[-bank_length:]
    return thresholds


def _scipy_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    """``scipy.special.softmax`` written out (same operations, same dtype)."""
    x_max = np.amax(x, axis=axis, keepdims=True)
    exp_x = np.exp(x - x_max)
    return exp_x / np.sum(exp_x, axis=axis, keepdims=True)


def original_get_thresholds(folder: str, p: float, num_classes: int = 19) -> np.ndarray:
    """The original ``get_thresholds.py`` rule with Python lists (SPEC section 5).

    Every pixel's max probability is kept in a Python list per class (memory grows with
    the number of files) and each list is fully sorted. Crashes (IndexError) when a class
    never wins, like the original.
    """
    pools: list[list[float]] = [[] for _ in range(num_classes)]
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".npy"):
            continue
        logits = np.load(os.path.join(folder, name)).astype(np.float32)
        prob_all = _scipy_softmax(logits, axis=0)
        cls = np.argmax(prob_all, axis=0)
        prob = np.max(prob_all, axis=0)
        for c in range(num_classes):
            pools[c].extend(prob[cls == c].tolist())
    out = np.zeros(num_classes, dtype=np.float64)
    for c in range(num_classes):
        pool = sorted(pools[c], reverse=True)
        out[c] = pool[int(p * len(pool))]
    return out
