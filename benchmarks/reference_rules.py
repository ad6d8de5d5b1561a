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


def original_get_thresholds(folder: str, p: float, num_classes: int = 19) -> np.ndarray:
    """The original ``datasets/get_thresholds.py`` rule, operation for operation (SPEC section 5).

    Per file: ``scipy.special.softmax`` over the classes, ``argmax`` and ``max``; for each
    class present (``np.unique``), the list of that class is extended with the *NumPy float32
    scalars* of its pixels (``list.extend(prob[classes == c])``, as the original: one Python
    object per pixel, so memory grows with the number of files); every list is sorted in
    place, descending; ``thr[c] = pool_c[int(p * len(pool_c))]``. One deliberate difference:
    float16 files are converted to float32 before the softmax (the original would compute
    the softmax in float16); for float32 files the computation is the original's. Raises
    ``KeyError`` when a class never wins (the original crashes there too).
    """
    from scipy.special import softmax  # the original's softmax

    cls2prob: dict[int, list] = {}
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".npy"):
            continue
        f = np.load(os.path.join(folder, name))
        f = softmax(f.astype(np.float32, copy=False), axis=0)
        classes = f.argmax(0)
        prob = f.max(0)
        for c in np.unique(classes):
            cls2prob.setdefault(int(c), []).extend(prob[classes == c])
    for pool in cls2prob.values():
        pool.sort(reverse=True)
    # np.array of the pools' float32 scalars: float32, the dtype the original saves
    return np.array([cls2prob[c][int(p * len(cls2prob[c]))] for c in range(num_classes)])
