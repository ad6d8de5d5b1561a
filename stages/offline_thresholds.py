"""Offline class thresholds for phase 2 from saved soft labels (docs/METHOD.md section 5).

The command is ``datasets/get_thresholds.py`` (``cd datasets && python3 get_thresholds.py 0.8
FOLDER``, as the original); this module computes what it writes.

The rule (docs/METHOD.md section 5): for every ``.npy`` logits file ``[C, H, W]``, softmax over the
classes (float32, computed like ``scipy.special.softmax``), ``cls = argmax``,
``prob = max``; pool ``prob`` per class over all files;
``thr[c] = sorted(pool_c, descending)[int(P * len(pool_c))]``.

The original keeps every pixel in Python lists (tens of GB for Cityscapes). Here memory
does not grow with the number of files: an exact two-level radix select on the float32
bit pattern of ``prob`` (monotonic for non-negative floats). One pass over the files
computes ``(cls, prob)`` per pixel, counts per class the values in each bin of the high
16 bits (that fixes the bin holding the wanted rank) and appends the compact pair
(5 bytes a pixel, against 76 bytes of logits) to a temporary cache file. The second level
reads the cache back in chunks and counts, per class, the low 16 bits of only the values in
the chosen bin, which fixes the exact value. If the cache cannot be written (e.g. a full
disk), the second level recomputes the softmax from the files instead.

A class that never wins anywhere has no threshold in the original (it crashes). Here it
gets **0.0**, with a warning naming the class: with threshold 0, phase 2 keeps every
pixel of that class, as phase 1 does with its thresholds' start value of 0.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
from tqdm import tqdm

from datasets.labels import class_names
from utils.files import read_npy_header

_LO_BINS = 1 << 16  # low 16 bits
_NEAR_ONE = np.float32(1.0 - 2.0**-18)  # exp values this close to 1 may tie with the maximum
NEVER_WON_THRESHOLD = 0.0


class ThresholdsError(ValueError):
    """Bad input for :func:`compute_thresholds`; the message names the folder or file."""


class _Scratch:
    """Work arrays reused from file to file: a fresh set of multi-MB arrays per file costs
    more in page faults than the arithmetic (measured: 0.6 s of 1.7 s for 200 files)."""

    def __init__(self) -> None:
        self.shape: tuple[int, ...] | None = None

    def ensure(self, shape: tuple[int, ...]) -> None:
        if shape == self.shape:
            return
        plane = shape[1:]
        self.logits = np.empty(shape, dtype=np.float32)
        self.exp = np.empty(shape, dtype=np.float32)
        self.top = np.empty((1, *plane), dtype=np.float32)
        self.total = np.empty(plane, dtype=np.float32)
        self.best = np.empty(plane, dtype=np.float32)
        self.near = np.empty(shape, dtype=bool)
        self.rank = np.empty(shape, dtype=np.uint8)
        self.first = np.empty(plane, dtype=np.uint8)
        self.cls = np.empty(plane, dtype=np.int64)
        self.flat_index = np.empty(plane, dtype=np.int64)
        self.offsets = np.arange(int(np.prod(plane)), dtype=np.int64).reshape(plane)
        self.chosen = np.empty(plane, dtype=np.float32)
        # weight C - c for class c: the largest weight among the qualifying classes is the first's
        if shape[0] <= 255:
            self.weights = np.arange(shape[0], 0, -1, dtype=np.uint8).reshape(-1, *([1] * len(plane)))
        self.shape = shape


def _softmax_max(logits: np.ndarray, scratch: _Scratch | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(argmax, max)`` over axis 0 of ``scipy.special.softmax(logits, axis=0)``, bit for bit.

    scipy computes ``e = exp(x - max(x))`` and ``e / sum(e)``. At the largest logit ``e`` is
    exactly 1 and every other ``e`` is at most 1, so (division by a positive number being
    monotonic) the largest probability is exactly ``1 / sum(e)``: no division of all ``C``
    planes is needed. The argmax is the first class whose probability equals that value.
    Such a class has ``e`` within a few ulps of 1, so the first class with
    ``e >= 1 - 2^-18`` is the answer whenever its ``e`` is exactly 1; the rare pixels where
    it is not (two logits within ~1e-6) are decided by the full rule.

    ``logits`` is float32 ``[C, ...]``. With ``scratch`` the results are views into its
    arrays, valid until the next call. Raises ``FloatingPointError`` when a pixel's largest
    logit is NaN or infinite (the softmax is undefined there).
    """
    if scratch is None:
        scratch = _Scratch()
    scratch.ensure(logits.shape)
    exp_x, total, best, cls = scratch.exp, scratch.total, scratch.best, scratch.cls
    num_classes = logits.shape[0]
    np.amax(logits, axis=0, keepdims=True, out=scratch.top)  # NaN if any logit of the pixel is NaN
    if not np.isfinite(scratch.top).all():
        raise FloatingPointError("logits contain NaN or infinite values")
    np.subtract(logits, scratch.top, out=exp_x)
    np.exp(exp_x, out=exp_x)
    np.sum(exp_x, axis=0, out=total)
    np.divide(np.float32(1.0), total, out=best)
    np.greater_equal(exp_x, _NEAR_ONE, out=scratch.near)
    if num_classes <= 255:
        # first qualifying class = C - max_c(qualifies_c * (C - c)), in uint8 (4x less memory
        # traffic than a loop of masked copies)
        np.multiply(scratch.near.view(np.uint8), scratch.weights, out=scratch.rank)
        np.amax(scratch.rank, axis=0, out=scratch.first)
        np.subtract(num_classes, scratch.first, out=cls, dtype=np.int64)
    else:
        for c in range(num_classes - 1, -1, -1):  # backwards: the first qualifying class wins
            np.copyto(cls, c, where=scratch.near[c])
    # exp value of the chosen class per pixel (a flat gather: cls * pixels + pixel index)
    np.multiply(cls, scratch.offsets.size, out=scratch.flat_index)
    np.add(scratch.flat_index, scratch.offsets, out=scratch.flat_index)
    np.take(exp_x.reshape(-1), scratch.flat_index, out=scratch.chosen)
    ambiguous = scratch.chosen != 1.0
    if ambiguous.any():
        probs = exp_x[:, ambiguous] / total[ambiguous]  # the full rule on those pixels only
        cls[ambiguous] = np.argmax(probs == best[ambiguous], axis=0)
    return cls, best


def _list_files(folder: str) -> list[str]:
    """The ``.npy`` files of ``folder``, sorted; errors for a missing or empty folder."""
    if not os.path.isdir(folder):
        raise ThresholdsError(f"soft-label folder not found: {folder}")
    names = sorted(n for n in os.listdir(folder) if n.endswith(".npy"))
    if not names:
        raise ThresholdsError(f"no .npy files in {folder}")
    return [os.path.join(folder, n) for n in names]


def _header_shape(path: str) -> tuple[int, ...]:
    """The array shape in the header of the ``.npy`` file ``path``."""
    try:
        with open(path, "rb") as f:
            return tuple(read_npy_header(f)[0])
    except (OSError, ValueError) as exc:
        raise ThresholdsError(f"cannot read {path}: {exc}") from exc


def infer_num_classes(files: Sequence[str], num_classes: int | None = None) -> tuple[int, str]:
    """The class count of the soft labels, from the first axis of the first file (the original
    runs its softmax over that axis and takes as many classes as it finds), and the reason to
    quote when another file disagrees. A given ``num_classes`` (``--num-classes``) must match it."""
    shape = _header_shape(files[0])
    if len(shape) != 3:
        raise ThresholdsError(f"{files[0]}: expected logits of shape [C, H, W], got {list(shape)}")
    if num_classes is not None and num_classes != shape[0]:
        raise ThresholdsError(f"--num-classes {num_classes}: the soft labels have {shape[0]} classes "
                              f"({files[0]}: shape {list(shape)})")
    source = f"--num-classes {num_classes}" if num_classes is not None else f"as {os.path.basename(files[0])}"
    return shape[0], source


def _read_logits(path: str, num_classes: int, scratch: _Scratch, source: str = "") -> np.ndarray:
    """The logits of ``path`` as float32 ``[C, H, W]``; float32 C-order files are read straight
    into ``scratch.logits`` (no new array per file), anything else through ``np.load``.
    ``source``: where ``num_classes`` comes from, quoted in the shape error."""
    try:
        with open(path, "rb") as f:
            shape, fortran_order, dtype = read_npy_header(f)
            if len(shape) != 3 or shape[0] != num_classes:
                why = f" ({source})" if source else ""
                raise ThresholdsError(f"{path}: expected logits of shape [{num_classes}, H, W]{why}, got {list(shape)}")
            if not np.issubdtype(dtype, np.floating):
                raise ThresholdsError(f"{path}: expected floating-point logits, got {dtype}")
            if dtype == np.dtype(np.float32) and not fortran_order:
                scratch.ensure(tuple(shape))
                buffer = memoryview(scratch.logits).cast("B")
                if f.readinto(buffer) != buffer.nbytes:
                    raise ThresholdsError(f"cannot read {path}: file is truncated")
                return scratch.logits
        return np.load(path).astype(np.float32, copy=False)
    except ThresholdsError:
        raise
    except (OSError, ValueError) as exc:
        raise ThresholdsError(f"cannot read {path}: {exc}") from exc


def _file_keys(path: str, num_classes: int, scratch: _Scratch, source: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Winning class (int64) and the bit pattern of the winning probability (uint32) per pixel,
    as views into ``scratch`` (valid until the next file)."""
    try:
        cls, prob = _softmax_max(_read_logits(path, num_classes, scratch, source), scratch)
    except FloatingPointError as exc:
        raise ThresholdsError(f"{path}: {exc}") from None
    return cls.reshape(-1), prob.reshape(-1).view(np.uint32)


def _each_file(files: Sequence[str], num_classes: int, desc: str, progress: bool,
               source: str = "") -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield :func:`_file_keys` for every file, with a tqdm bar when ``progress``."""
    scratch = _Scratch()
    for path in tqdm(files, desc=desc, unit="file", disable=not progress):
        yield _file_keys(path, num_classes, scratch, source)


class _KeyCache:
    """Append-only temporary file of ``(cls uint8, key uint32)`` per pixel, read back file by file.

    Disabled (``ok`` False, the file removed) on the first write error, so that a full disk
    costs a second softmax pass instead of the run.
    """

    def __init__(self, num_classes: int) -> None:
        self.ok = num_classes <= 256
        self.sizes: list[int] = []
        # closed by close(), which compute_thresholds calls in a finally block
        self._file = tempfile.TemporaryFile(prefix="thresholds_cache_") if self.ok else None  # noqa: SIM115

    def append(self, cls: np.ndarray, key: np.ndarray) -> None:
        if not self.ok:
            return
        try:
            self._file.write(cls.astype(np.uint8).tobytes())
            self._file.write(key.tobytes())
            self.sizes.append(key.size)
        except OSError:
            self.close()

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The pairs in the order they were appended, one file at a time."""
        self._file.flush()
        self._file.seek(0)
        for size in self.sizes:
            cls = np.fromfile(self._file, dtype=np.uint8, count=size).astype(np.int64)
            key = np.fromfile(self._file, dtype=np.uint32, count=size)
            yield cls, key

    def close(self) -> None:
        self.ok = False
        if self._file is not None:
            self._file.close()
            self._file = None


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
        return f"{c} ({class_names(num_classes)[c]})"
    return str(c)


def compute_thresholds(folder: str, p: float, num_classes: int | None = None, progress: bool = True,
                       report: dict | None = None) -> np.ndarray:
    """Class thresholds of docs/METHOD.md section 5 for the soft labels in ``folder``.

    Args:
        folder: folder of ``.npy`` logits files ``[num_classes, H, W]`` (float32 or float16;
            float16 is converted to float32 before the softmax).
        p: the rank fraction, ``0 <= p < 1`` (0: the highest probability of each class, as the original).
        num_classes: number of classes ``C``; ``None`` (the default) takes it from the files, as
            the original (the first axis of the first file; every file must have it). When
            given, the files must have it (:func:`infer_num_classes`).
        progress: show a tqdm progress bar (one pass over the files; a second one only if
            the temporary cache cannot be written).
        report: if given, filled with int64 ``[C]`` arrays ``"pixels"`` (pixels whose argmax
            is the class) and ``"kept"`` (of those, the ones whose winning probability is
            ``>= thr[c]``: what phase 2's rule would keep of the soft label alone), exact
            counts (see :func:`format_report`).

    Returns:
        float32 ``[C]`` (the original's dtype: its pools hold float32 probabilities):
        ``thr[c] = sorted(pool_c, descending)[int(p * len(pool_c))]``, identical to the
        original's values. A class that never wins gets 0.0 and a
        ``UserWarning`` naming it.

    Raises:
        ThresholdsError: missing folder, no ``.npy`` files, a file of the wrong shape or
            dtype, a class count other than ``num_classes``, non-finite logits, or ``p``
            outside [0, 1).
    """
    # P = 0 is the original's index 0 of the descending pool, the highest probability; P >= 1
    # indexes past the pool there (IndexError), a negative P counts from its end.
    if not 0.0 <= p < 1.0:
        raise ThresholdsError(f"P must be in [0, 1), got {p}")
    files = _list_files(folder)
    num_classes, source = infer_num_classes(files, num_classes)

    # Level 1, one pass over the files: per class, counts of the high 16 bits of the winning
    # probability. That probability is 1 / sum(e) with sum(e) <= C, so it lies in [1/C, 1]:
    # only the high-bit values from fl(1/C) to fl(1) occur (~700 bins for C = 19).
    hi_first = (int(np.array(1.0 / num_classes, dtype=np.float32).view(np.uint32)) >> 16) - 1
    hi_span = (int(np.array(1.0, dtype=np.float32).view(np.uint32)) >> 16) - hi_first + 1
    hist_hi = np.zeros(num_classes * hi_span, dtype=np.int64)
    cache = _KeyCache(num_classes)
    try:
        for cls, key in _each_file(files, num_classes, "thresholds", progress, source):
            hist_hi += np.bincount(cls * hi_span + ((key >> 16) - hi_first), minlength=num_classes * hi_span)
            cache.append(cls, key)
        hist_hi = hist_hi.reshape(num_classes, hi_span)
        totals = hist_hi.sum(axis=1)
        want = np.array([min(int(p * int(n)), max(int(n) - 1, 0)) for n in totals], dtype=np.int64)
        hi_bin, above = _select(hist_hi, want)
        hi_bin = hi_bin + hi_first

        # Level 2: per class, counts of the low 16 bits of the values inside the chosen bin,
        # from the cache (or, if it could not be written, from the files again).
        pairs = cache if cache.ok else _each_file(files, num_classes, "thresholds, second pass", progress, source)
        hist_lo = np.zeros(num_classes * _LO_BINS, dtype=np.int64)
        for cls, key in pairs:
            inside = (key >> 16) == hi_bin[cls]
            index, counts = np.unique(cls[inside] * _LO_BINS + (key[inside] & 0xFFFF), return_counts=True)
            hist_lo[index] += counts
    finally:
        cache.close()
    hist_lo = hist_lo.reshape(num_classes, _LO_BINS)
    lo_bin, _ = _select(hist_lo, want - above)
    if report is not None:
        # kept = values in the higher high-bit bins + values of the chosen bin with low bits >= lo_bin
        in_bin = np.cumsum(hist_lo[:, ::-1], axis=1)[:, ::-1]
        kept = above + in_bin[np.arange(num_classes), lo_bin]
        report["pixels"] = totals.astype(np.int64)
        report["kept"] = np.where(totals > 0, kept, 0).astype(np.int64)

    bits = ((hi_bin.astype(np.uint32) << 16) | lo_bin.astype(np.uint32)).astype(np.uint32)
    thresholds = bits.view(np.float32).copy()
    for c in np.flatnonzero(totals == 0):
        thresholds[c] = NEVER_WON_THRESHOLD
        warnings.warn(
            f"class {_class_label(int(c), num_classes)} is never predicted in {folder}; its threshold "
            f"is set to {NEVER_WON_THRESHOLD} (phase 2 keeps every pixel of that class)",
            UserWarning,
            stacklevel=2,
        )
    return thresholds


def format_report(thresholds: np.ndarray, report: dict, p: float) -> str:
    """Per class: threshold, pixels won (share of all pixels), fraction of them kept at ``P``.

    Ties at the threshold (e.g. many probabilities of exactly 1.0) make a class keep more
    than ``P`` of its pixels; a class that never wins keeps none.
    """
    num_classes = len(thresholds)
    pixels, kept = report["pixels"], report["kept"]
    total = max(int(pixels.sum()), 1)
    names = [_class_label(c, num_classes) for c in range(num_classes)]
    width = max(len("class"), *(len(n) for n in names))
    lines = [f"per-class thresholds at P={p} (kept: winning probability >= threshold)",
             f"{'class':<{width}}  {'threshold':>9}  {'pixels':>12}  {'share':>7}  {'kept':>7}"]
    for c in range(num_classes):
        frac = f"{100.0 * kept[c] / pixels[c]:6.2f}%" if pixels[c] else f"{'-':>7}"
        lines.append(f"{names[c]:<{width}}  {thresholds[c]:9.4f}  {int(pixels[c]):12d}  "
                     f"{100.0 * pixels[c] / total:6.2f}%  {frac}")
    lines.append(f"{'all':<{width}}  {'':>9}  {int(pixels.sum()):12d}  {100.0:6.2f}%  "
                 f"{100.0 * kept.sum() / total:6.2f}%")
    return "\n".join(lines)


def default_output_name(folder: str, p: float) -> str:
    """The original's output path ``./<FOLDER>_thresholds_p<P>.npy``, ``P`` as Python prints the float.

    Relative to the working directory, like the original's ``"./{}_thresholds_p{}.npy".format(
    FOLDER, P)``; trailing separators of ``folder`` are dropped and an absolute ``folder`` stays
    absolute (both cases where the original writes somewhere unintended).
    """
    seps = os.sep + (os.altsep or "")
    stem = folder.rstrip(seps) or folder
    if os.path.isabs(stem):
        return f"{stem}_thresholds_p{p}.npy"
    return os.path.join(".", f"{stem}_thresholds_p{p}.npy")


def build_parser() -> argparse.ArgumentParser:
    """``datasets/get_thresholds.py``'s command line (docs/METHOD.md section 5)."""
    parser = argparse.ArgumentParser(
        description="Per-class confidence thresholds from saved soft labels (phase 2).",
    )
    parser.add_argument("p", metavar="P", type=float, help="rank fraction, e.g. 0.8")
    parser.add_argument("folder", metavar="FOLDER", help="folder of soft-label .npy files")
    parser.add_argument(
        "--output", default=None,
        help="output file (default: ./<FOLDER>_thresholds_p<P>.npy relative to the working directory, as the original)"
    )
    parser.add_argument("--num-classes", type=int, default=None,
                        help="number of classes; by default taken from the soft-label files, as the original "
                             "(19 for Cityscapes, 16 for SYNTHIA). When given, the files must have it")
    parser.add_argument("--quiet", action="store_true", help="no progress bars, nothing printed on success")
    return parser
