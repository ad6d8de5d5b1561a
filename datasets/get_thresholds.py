"""Offline class thresholds for phase 2 from saved soft labels (SPEC section 5).

Usage, exactly as the original::

    cd datasets && python3 get_thresholds.py 0.8 gta2city_soft_labels

writes ``./gta2city_soft_labels_thresholds_p0.8.npy`` (19 float64 values). Also runs as
``python3 -m datasets.get_thresholds P FOLDER``; ``--output PATH`` chooses the file,
``--num-classes`` the class count and ``--quiet`` hides the progress bars.

The rule (SPEC section 5): for every ``.npy`` logits file ``[C, H, W]``, softmax over the
classes (float32, computed like ``scipy.special.softmax``), ``cls = argmax``,
``prob = max``; pool ``prob`` per class over all files;
``thr[c] = sorted(pool_c, descending)[int(P * len(pool_c))]``.

The original keeps every pixel in Python lists (tens of GB for Cityscapes). Here memory
does not grow with the number of files: an exact two-pass radix select on the float32
bit pattern of ``prob`` (monotonic for non-negative floats). Pass 1 counts, per class, the
values in each of 2^15 bins of the high 16 bits; that fixes the bin holding the wanted
rank. Pass 2 counts, per class, the low 16 bits of only the values in that bin, which
fixes the exact value. Both passes read the files one at a time.

A class that never wins anywhere has no threshold in the original (it crashes). Here it
gets **0.0**, with a warning naming the class: with threshold 0, phase 2 keeps every
pixel of that class, as phase 1 does with its thresholds' start value of 0.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
from tqdm import tqdm

_HI_BINS = 1 << 15  # high 16 bits of a non-negative float32 (sign bit is 0)
_LO_BINS = 1 << 16  # low 16 bits
NEVER_WON_THRESHOLD = 0.0


class ThresholdsError(ValueError):
    """Bad input for :func:`compute_thresholds`; the message names the folder or file."""


def _softmax_max(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(argmax, max)`` over axis 0 of the float32 softmax, like ``scipy.special.softmax``."""
    x_max = np.amax(logits, axis=0, keepdims=True)
    exp_x = np.exp(logits - x_max)
    prob_all = exp_x / np.sum(exp_x, axis=0, keepdims=True)
    # np.argmax over the leading axis is slow; the first class equal to the max (found
    # by scanning the classes backwards) is the same argmax for non-NaN input, faster.
    best = np.max(prob_all, axis=0)
    cls = np.empty(best.shape, dtype=np.int64)
    for c in range(prob_all.shape[0] - 1, -1, -1):
        np.copyto(cls, c, where=prob_all[c] == best)
    return cls, best


def _list_files(folder: str) -> list[str]:
    """The ``.npy`` files of ``folder``, sorted; errors for a missing or empty folder."""
    if not os.path.isdir(folder):
        raise ThresholdsError(f"soft-label folder not found: {folder}")
    names = sorted(n for n in os.listdir(folder) if n.endswith(".npy"))
    if not names:
        raise ThresholdsError(f"no .npy files in {folder}")
    return [os.path.join(folder, n) for n in names]


def _file_keys(path: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Winning class (int64) and the bit pattern of the winning probability (uint32) per pixel."""
    try:
        logits = np.load(path)
    except (OSError, ValueError) as exc:
        raise ThresholdsError(f"cannot read {path}: {exc}") from exc
    if logits.ndim != 3 or logits.shape[0] != num_classes:
        raise ThresholdsError(f"{path}: expected logits of shape [{num_classes}, H, W], got {list(logits.shape)}")
    if not np.issubdtype(logits.dtype, np.floating):
        raise ThresholdsError(f"{path}: expected floating-point logits, got {logits.dtype}")
    cls, prob = _softmax_max(logits.astype(np.float32, copy=False))
    if not np.isfinite(prob).all():
        raise ThresholdsError(f"{path}: logits contain NaN or infinite values")
    return cls.reshape(-1).astype(np.int64), prob.reshape(-1).view(np.uint32)


def _each_file(files: Sequence[str], num_classes: int, desc: str, progress: bool) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield :func:`_file_keys` for every file, with a tqdm bar when ``progress``."""
    for path in tqdm(files, desc=desc, unit="file", disable=not progress):
        yield _file_keys(path, num_classes)


def _select(hist: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the bin holding descending index ``index`` and the count in the bins above it."""
    cum_desc = np.cumsum(hist[:, ::-1], axis=1)
    rows = np.arange(hist.shape[0])
    pos = np.minimum((cum_desc <= index[:, None]).sum(axis=1), hist.shape[1] - 1)
    bins = hist.shape[1] - 1 - pos
    above = cum_desc[rows, pos] - hist[rows, bins]
    return bins, above


def _class_label(c: int, num_classes: int) -> str:
    """``'16 (train)'`` for the standard class sets, ``'16'`` otherwise."""
    if num_classes in (19, 16, 13):
        # imported here: run as a file, the repository root joins sys.path only in __main__
        from datasets.labels import class_names

        return f"{c} ({class_names(num_classes)[c]})"
    return str(c)


def compute_thresholds(folder: str, p: float, num_classes: int = 19, progress: bool = True) -> np.ndarray:
    """Class thresholds of SPEC section 5 for the soft labels in ``folder``.

    Args:
        folder: folder of ``.npy`` logits files ``[num_classes, H, W]`` (float32 or float16;
            float16 is converted to float32 before the softmax).
        p: the rank fraction, ``0 < p < 1``.
        num_classes: number of classes ``C``.
        progress: show tqdm progress bars (two passes over the files).

    Returns:
        float64 ``[C]``: ``thr[c] = sorted(pool_c, descending)[int(p * len(pool_c))]``,
        identical to the original's values. A class that never wins gets 0.0 and a
        ``UserWarning`` naming it.

    Raises:
        ThresholdsError: missing folder, no ``.npy`` files, a file of the wrong shape or
            dtype, non-finite logits, or ``p`` outside (0, 1).
    """
    if not 0.0 < p < 1.0:
        raise ThresholdsError(f"P must be between 0 and 1 (exclusive), got {p}")
    files = _list_files(folder)

    # Pass 1: per class, counts of the high 16 bits of the winning probability.
    hist_hi = np.zeros(num_classes * _HI_BINS, dtype=np.int64)
    for cls, key in _each_file(files, num_classes, "thresholds pass 1/2", progress):
        counts = np.bincount(cls * _HI_BINS + (key >> 16), minlength=num_classes * _HI_BINS)
        hist_hi += counts
    hist_hi = hist_hi.reshape(num_classes, _HI_BINS)
    totals = hist_hi.sum(axis=1)
    want = np.array([min(int(p * int(n)), max(int(n) - 1, 0)) for n in totals], dtype=np.int64)
    hi_bin, above = _select(hist_hi, want)

    # Pass 2: per class, counts of the low 16 bits of the values inside the chosen bin.
    hist_lo = np.zeros(num_classes * _LO_BINS, dtype=np.int64)
    for cls, key in _each_file(files, num_classes, "thresholds pass 2/2", progress):
        inside = (key >> 16) == hi_bin[cls]
        index, counts = np.unique(cls[inside] * _LO_BINS + (key[inside] & 0xFFFF), return_counts=True)
        hist_lo[index] += counts
    lo_bin, _ = _select(hist_lo.reshape(num_classes, _LO_BINS), want - above)

    bits = ((hi_bin.astype(np.uint32) << 16) | lo_bin.astype(np.uint32)).astype(np.uint32)
    thresholds = bits.view(np.float32).astype(np.float64)
    for c in np.flatnonzero(totals == 0):
        thresholds[c] = NEVER_WON_THRESHOLD
        warnings.warn(
            f"class {_class_label(int(c), num_classes)} is never predicted in {folder}; its threshold "
            f"is set to {NEVER_WON_THRESHOLD} (phase 2 keeps every pixel of that class)",
            UserWarning,
            stacklevel=2,
        )
    return thresholds


def default_output_name(folder: str, p: float) -> str:
    """``<folder basename>_thresholds_p<P>.npy`` with ``P`` as Python prints the float."""
    base = os.path.basename(os.path.normpath(folder))
    return f"{base}_thresholds_p{p}.npy"


def _atomic_save(path: str, array: np.ndarray) -> None:
    """``np.save`` to a temporary file next to ``path``, then rename it into place."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".npy", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def main(argv: Sequence[str] | None = None) -> int:
    """Command line of SPEC section 5; returns the exit code (2 for bad input)."""
    parser = argparse.ArgumentParser(
        description="Per-class confidence thresholds from saved soft labels (phase 2).",
    )
    parser.add_argument("p", metavar="P", type=float, help="rank fraction, e.g. 0.8")
    parser.add_argument("folder", metavar="FOLDER", help="folder of soft-label .npy files")
    parser.add_argument(
        "--output", default=None, help="output file (default: ./<FOLDER basename>_thresholds_p<P>.npy)"
    )
    parser.add_argument("--num-classes", type=int, default=19, help="number of classes (default 19)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    output = args.output if args.output is not None else default_output_name(args.folder, args.p)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            thresholds = compute_thresholds(args.folder, args.p, args.num_classes, progress=not args.quiet)
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
        _atomic_save(output, thresholds)
    except ThresholdsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot write {output}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(f"saved {output}: " + " ".join(f"{v:.4f}" for v in thresholds))
    return 0


if __name__ == "__main__":
    # Run as a file from inside datasets/: make the repository root importable.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
