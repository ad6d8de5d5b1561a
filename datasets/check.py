"""Check a source (GTA5 / SYNTHIA) and a target (Cityscapes) tree before a long training run.

    python3 -m datasets.check --src_rootpath DATA/gta5 --tgt_rootpath DATA/cityscapes \\
        [--src_dataset gta5|synthia] [--num-classes 19] [--workers N] [--headers-only]

What is checked (docs/METHOD.md section 1 layouts):

* **GTA5**: ``images/`` and ``labels/`` exist and hold the same ``.png`` names; image and label
  sizes agree (read from the PNG headers; a different size with the same aspect ratio is a
  warning: the loader resizes both); labels are single-channel (grey or palette) and hold
  only GTA5 label ids (0..34 and 250, as the original's loader; any other id is a problem: the
  loader stops on it); ``split.mat`` loads as
  the loader reads it and lists only existing pairs; ``gtav_label_info.p`` loads with the
  restricted unpickler, has ``--num-classes`` classes, lists exactly the label files, and its
  classes per file match the labels' pixels.
* **SYNTHIA**: ``RGB/`` and ``GT/LABELS/`` hold the same names, same sizes, known class ids.
* **Cityscapes**: ``leftImg8bit/{train,val}`` exist and hold images; every val image has its
  ``gtFine/val/<city>/<name>_gtFine_labelIds.png`` of the same size, with known ids (0..33);
  train labels are not needed for training (missing ones are a warning, not a problem).

Every problem is printed on its own line, naming the file; then a summary of the counts.
Exit code 0 when there is no problem (warnings allowed), else 1. Labels are decoded (to read
their ids) in ``--workers`` processes; images only have their headers read.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from .errors import DatasetError
from .gta5 import _split_names
from .label_info import load_label_info
from .labels import class_names, encode_labels, synthia_encode_labels, unknown_gta5_ids
from .prepare import LABEL_MODES, read_label_ids

CITYSCAPES_MAX_ID = 33  # Cityscapes label ids are 0..33
SYNTHIA_MAX_ID = 22  # SYNTHIA-RAND-CITYSCAPES class ids are 0..22
_IMG_SUFFIX = "_leftImg8bit.png"
_LBL_SUFFIX = "_gtFine_labelIds.png"
_MAX_ASPECT_DIFF = 0.02  # same rule as datasets.gta5.check_pair_sizes
_WARN_LINES_PER_KIND = 20
_CHUNK = 16


class Report:
    """Collects problems and warnings and prints each on its own line as it is found."""

    def __init__(self, out=None) -> None:
        self.out = sys.stdout if out is None else out
        self.problems = 0
        self.warnings = 0
        self._warn_kinds: dict[str, int] = defaultdict(int)
        self.summary: list[str] = []

    def problem(self, text: str) -> None:
        self.problems += 1
        print(f"problem: {text}", file=self.out, flush=True)

    def warn(self, text: str, kind: str = "") -> None:
        """A warning; at most ``_WARN_LINES_PER_KIND`` lines of one ``kind`` are printed."""
        self.warnings += 1
        self._warn_kinds[kind] += 1
        if not kind or self._warn_kinds[kind] <= _WARN_LINES_PER_KIND:
            print(f"warning: {text}", file=self.out, flush=True)

    def hidden_warnings(self) -> dict[str, int]:
        return {k: n - _WARN_LINES_PER_KIND for k, n in self._warn_kinds.items() if k and n > _WARN_LINES_PER_KIND}


# ---------------------------------------------------------------------------------------------- reading
def header(path: str) -> tuple[tuple[int, int], str]:
    """``((width, height), mode)`` from the file header (no decoding of the pixels)."""
    from PIL import Image

    with Image.open(path) as im:
        return im.size, im.mode


def _raw_ids(arr: np.ndarray) -> list[int]:
    """Distinct values of a label array (fast path for 8/16-bit)."""
    flat = arr.reshape(-1)
    if flat.dtype in (np.uint8, np.uint16):
        return [int(v) for v in np.flatnonzero(np.bincount(flat, minlength=1))]
    return [int(v) for v in np.unique(flat)]


def _read_ids(job: tuple[str, str]) -> tuple[str, list[int] | None, tuple[int, int] | None, str]:
    """``(path, distinct ids, (h, w), error)`` of one label file; ``kind`` is "ids" or "synthia"."""
    path, kind = job
    try:
        if kind == "synthia":
            import cv2

            lbl = cv2.imread(path, cv2.IMREAD_UNCHANGED)
            if lbl is None:
                return path, None, None, f"{path}: cannot read label (corrupt or not an image)"
            if lbl.ndim == 3:
                lbl = lbl[:, :, 2] if lbl.shape[2] >= 3 else lbl[:, :, 0]
        else:
            lbl = read_label_ids(path)
    except DatasetError as exc:
        return path, None, None, str(exc)
    return path, _raw_ids(lbl), (int(lbl.shape[0]), int(lbl.shape[1])), ""


def _read_ids_chunk(jobs: list[tuple[str, str]]) -> list[tuple[str, list[int] | None, tuple[int, int] | None, str]]:
    return [_read_ids(j) for j in jobs]


def read_all_ids(paths: Sequence[str], kind: str, workers: int) -> dict[str, tuple[list[int] | None, str]]:
    """Distinct label ids of every file (decoded in ``workers`` processes when there are many)."""
    chunks = [[(p, kind) for p in paths[i:i + _CHUNK]] for i in range(0, len(paths), _CHUNK)]
    out: dict[str, tuple[list[int] | None, str]] = {}
    if workers > 1 and len(chunks) > 2:
        with ProcessPoolExecutor(workers) as pool:
            results: Iterable = pool.map(_read_ids_chunk, chunks)
            for res in results:
                for path, ids, _, err in res:
                    out[path] = (ids, err)
    else:
        for chunk in chunks:
            for path, ids, _, err in _read_ids_chunk(chunk):
                out[path] = (ids, err)
    return out


def _pngs(folder: str) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.endswith(".png"))


def _rel_pngs(folder: str) -> list[str]:
    """``.png`` files under ``folder`` (recursive), as sorted paths relative to it."""
    found = []
    for sub, _, names in os.walk(folder):
        found.extend(os.path.relpath(os.path.join(sub, n), folder) for n in names if n.endswith(".png"))
    return sorted(found)


def _compare_sizes(report: Report, img_path: str, lbl_path: str, img_wh: tuple[int, int],
                   lbl_wh: tuple[int, int], exact: bool, what: str = "") -> bool:
    """Problem (or, with the same aspect ratio and not ``exact``, a warning) for differing sizes."""
    if img_wh == lbl_wh:
        return True
    text = (f"{lbl_path}: label size {lbl_wh[0]}x{lbl_wh[1]} (WxH) does not match image {img_path} "
            f"of size {img_wh[0]}x{img_wh[1]}")
    a_img, a_lbl = img_wh[0] / img_wh[1], lbl_wh[0] / lbl_wh[1]
    if not exact and abs(a_img - a_lbl) / a_img <= _MAX_ASPECT_DIFF:
        report.warn(text + " (same aspect ratio: the loader resizes both)", kind="size")
        return True
    report.problem(text + what)
    return False


def _check_headers(report: Report, pairs: Sequence[tuple[str, str]], exact: bool, label_modes: Sequence[str] | None,
                   what: str = "") -> list[tuple[str, str]]:
    """Open image and label headers, check modes and sizes; returns the pairs that passed."""
    good = []
    for img_path, lbl_path in pairs:
        try:
            img_wh, img_mode = header(img_path)
        except (OSError, ValueError, SyntaxError) as exc:
            report.problem(f"{img_path}: cannot read image ({exc})")
            continue
        if img_mode not in ("RGB", "RGBA", "L", "P"):
            report.warn(f"{img_path}: unusual image mode {img_mode} (read as RGB)", kind="mode")
        try:
            lbl_wh, lbl_mode = header(lbl_path)
        except (OSError, ValueError, SyntaxError) as exc:
            report.problem(f"{lbl_path}: cannot read label ({exc})")
            continue
        if label_modes is not None and lbl_mode not in label_modes:
            report.problem(f"{lbl_path}: label must be a single-channel (grey or palette) PNG, got mode {lbl_mode}")
            continue
        if _compare_sizes(report, img_path, lbl_path, img_wh, lbl_wh, exact, what):
            good.append((img_path, lbl_path))
    return good


def _unknown_id_warnings(report: Report, ids_by_path: dict, max_id: int, what: str) -> None:
    for path, (ids, err) in ids_by_path.items():
        if err:
            report.problem(err)
            continue
        bad = [i for i in ids if i < 0 or i > max_id]
        if bad:
            shown = ", ".join(str(i) for i in bad[:8]) + (" ..." if len(bad) > 8 else "")
            report.warn(f"{path}: label ids {shown} outside the known {what} ids 0..{max_id} (read as ignore)",
                        kind="ids")


def _image_label_pairs(report: Report, images_dir: str, labels_dir: str, missing: tuple[str, str],
                       empty: tuple[str, str], label_modes: Sequence[str] | None
                       ) -> tuple[list[str], list[str], list[str]]:
    """``(images, labels, paired)``: the ``.png`` names of a source dataset's two flat folders and
    those present in both. Reports a missing (``missing``) or empty (``empty``) folder, every file
    without its partner, and checks the headers of the pairs (``label_modes`` as in
    :func:`_check_headers`)."""
    found = [_pngs(d) if os.path.isdir(d) else None for d in (images_dir, labels_dir)]
    for folder, names, gone, none in zip((images_dir, labels_dir), found, missing, empty):
        if names is None:
            report.problem(f"{folder}: {gone}")
        elif not names:
            report.problem(f"{folder}: {none}")
    images, labels = found[0] or [], found[1] or []
    image_set, label_set = set(images), set(labels)
    if os.path.isdir(images_dir) and os.path.isdir(labels_dir):
        for n in images:
            if n not in label_set:
                report.problem(f"{os.path.join(labels_dir, n)}: label of image {os.path.join(images_dir, n)} not found")
        for n in labels:
            if n not in image_set:
                report.problem(f"{os.path.join(images_dir, n)}: image of label {os.path.join(labels_dir, n)} not found")
    paired = [n for n in images if n in label_set]
    _check_headers(report, [(os.path.join(images_dir, n), os.path.join(labels_dir, n)) for n in paired],
                   exact=False, label_modes=label_modes)
    return images, labels, paired


# ---------------------------------------------------------------------------------------------- GTA5
def check_gta5(root: str, report: Report, num_classes: int = 19, workers: int = 1, read_ids: bool = True) -> None:
    """Check a GTA5 root (see the module docstring)."""
    if not os.path.isdir(root):
        report.problem(f"{root}: GTA5 root folder not found")
        report.summary.append(f"source gta5 {root}: not found")
        return
    images_dir, labels_dir = os.path.join(root, "images"), os.path.join(root, "labels")
    images, labels, paired = _image_label_pairs(
        report, images_dir, labels_dir, ("GTA5 images folder not found", "GTA5 labels folder not found"),
        ("no .png image found", "no .png label file found"), LABEL_MODES)
    image_set, label_set = set(images), set(labels)

    classes_of: dict[str, list[int]] = {}
    if read_ids and labels:
        ids_by_path = read_all_ids([os.path.join(labels_dir, n) for n in labels], "ids", workers)
        for path, (ids, err) in ids_by_path.items():
            if err:
                report.problem(err)
                continue
            unknown = unknown_gta5_ids(np.asarray(ids, dtype=np.int64))
            if unknown:  # the loader stops on them, as the original's does
                shown = ", ".join(str(i) for i in unknown[:8]) + (" ..." if len(unknown) > 8 else "")
                report.problem(f"{path}: label ids {shown} are not GTA5 label ids (0..34, and 250 for ignore); "
                               "training stops on them")
            enc = encode_labels(np.asarray(ids, dtype=np.int64), num_classes)
            classes_of[os.path.basename(path)] = sorted({int(c) for c in enc if c < num_classes})

    # split.mat, exactly as the loader reads it
    split_path = os.path.join(root, "split.mat")
    split_note = "missing"
    if not os.path.isfile(split_path):
        report.problem(f"{split_path}: GTA5 split file not found (python3 -m datasets.prepare gta5 {root} writes one)")
    else:
        try:
            listed = _split_names(split_path)
        except DatasetError as exc:
            split_note = "unreadable"
            report.problem(str(exc))
        else:
            split_note = f"lists {len(listed)}"
            for n in listed:
                if n not in image_set:
                    report.problem(f"{split_path}: lists {n}, but {os.path.join(images_dir, n)} is missing")
                elif n not in label_set:
                    report.problem(f"{split_path}: lists {n}, but {os.path.join(labels_dir, n)} is missing")
            unlisted = len(set(paired) - set(listed))
            if unlisted:
                report.warn(f"{split_path}: {unlisted} image/label pair(s) are not listed (the loader without a "
                            "class-balanced list does not use them)")

    # gtav_label_info.p: restricted unpickler, consistent with labels/
    info_path = os.path.join(root, "gtav_label_info.p")
    info_note = "missing"
    if not os.path.isfile(info_path):
        report.problem(f"{info_path}: label-info file not found (python3 -m datasets.prepare gta5 {root} builds it)")
    else:
        try:
            label_to_file, file_to_label = load_label_info(info_path)
        except DatasetError as exc:
            info_note = "unreadable"
            report.problem(str(exc))
        else:
            info_note = f"lists {len(file_to_label)} files"
            _check_label_info(report, info_path, label_to_file, file_to_label, num_classes, image_set, label_set,
                              labels_dir, images_dir, classes_of)
    report.summary.append(
        f"source gta5 {root}: {len(images)} images, {len(labels)} labels, {len(paired)} pairs"
        f"{f', {len(classes_of)} labels decoded' if read_ids else ''}; split.mat {split_note}; "
        f"gtav_label_info.p {info_note}"
    )


def _check_label_info(report: Report, info_path: str, label_to_file: list[list[str]],
                      file_to_label: dict[str, list[int]], num_classes: int, image_set: set[str], label_set: set[str],
                      labels_dir: str, images_dir: str, classes_of: dict[str, list[int]]) -> None:
    rebuild = f"(rebuild: python3 -m datasets.prepare gta5 {os.path.dirname(info_path) or '.'})"
    if len(label_to_file) != num_classes:
        report.problem(f"{info_path}: has {len(label_to_file)} classes, expected {num_classes} (--num-classes) "
                       f"{rebuild}")
        return
    for name in sorted(file_to_label):
        if name not in label_set:
            report.problem(f"{info_path}: lists {name}, but {os.path.join(labels_dir, name)} is missing {rebuild}")
        elif name not in image_set:
            report.problem(f"{info_path}: lists {name}, but {os.path.join(images_dir, name)} is missing")
    for name in sorted(label_set - set(file_to_label)):
        report.problem(f"{os.path.join(labels_dir, name)}: not in {info_path} (never drawn for training) {rebuild}")
    for c, names in enumerate(label_to_file):
        for name in names:
            if c not in file_to_label.get(name, ()):
                report.problem(f"{info_path}: label_to_file[{c}] lists {name}, but file_to_label[{name!r}] "
                               f"does not hold class {c}")
    for name, classes in sorted(classes_of.items()):
        if name in file_to_label and sorted(file_to_label[name]) != classes:
            report.problem(f"{info_path}: classes of {name} are {sorted(file_to_label[name])}, but "
                           f"{os.path.join(labels_dir, name)} holds {classes} {rebuild}")

    for c, name in enumerate(class_names(num_classes)):
        if not label_to_file[c]:
            report.warn(f"{info_path}: class {c} ({name}) is in no label file (left out of the class-balanced draw)")


# ---------------------------------------------------------------------------------------------- SYNTHIA
def check_synthia(root: str, report: Report, num_classes: int = 16, workers: int = 1, read_ids: bool = True) -> None:
    """Check a SYNTHIA-RAND-CITYSCAPES root: RGB/ and GT/LABELS/ pairs, sizes, class ids."""
    if not os.path.isdir(root):
        report.problem(f"{root}: SYNTHIA root folder not found")
        report.summary.append(f"source synthia {root}: not found")
        return
    images_dir, labels_dir = os.path.join(root, "RGB"), os.path.join(root, "GT", "LABELS")
    images, labels, paired = _image_label_pairs(
        report, images_dir, labels_dir, ("SYNTHIA RGB folder not found", "SYNTHIA GT/LABELS folder not found"),
        ("no .png file found", "no .png file found"), None)
    decoded = 0
    if read_ids and labels:
        ids_by_path = read_all_ids([os.path.join(labels_dir, n) for n in labels], "synthia", workers)
        _unknown_id_warnings(report, ids_by_path, SYNTHIA_MAX_ID, "SYNTHIA")
        present = set()
        for ids, err in ids_by_path.values():
            if not err:
                decoded += 1
                present.update(int(c) for c in synthia_encode_labels(np.asarray(ids, dtype=np.int64), num_classes))
        if decoded and not present - {250}:
            report.problem(f"{labels_dir}: no label holds any of the {num_classes} SYNTHIA training classes")
    report.summary.append(f"source synthia {root}: {len(images)} images, {len(labels)} labels, {len(paired)} pairs"
                          f"{f', {decoded} labels decoded' if read_ids else ''}")


# ---------------------------------------------------------------------------------------------- Cityscapes
def _label_rel(image_rel: str) -> str:
    """``<city>/<name>_gtFine_labelIds.png`` of ``<city>/<name>_leftImg8bit.png`` (the loader's rule)."""
    if image_rel.endswith(_IMG_SUFFIX):
        return image_rel[: -len(_IMG_SUFFIX)] + _LBL_SUFFIX
    return image_rel[: -len(".png")] + _LBL_SUFFIX


def check_cityscapes(root: str, report: Report, num_classes: int = 19, workers: int = 1,
                     read_ids: bool = True) -> None:
    """Check a Cityscapes root: train and val images, val gtFine labels (sizes, ids)."""
    del num_classes  # the label ids are the same for 19, 16 and 13 classes
    if not os.path.isdir(root):
        report.problem(f"{root}: Cityscapes root folder not found")
        report.summary.append(f"target cityscapes {root}: not found")
        return
    notes = []
    for split in ("train", "val"):
        img_dir = os.path.join(root, "leftImg8bit", split)
        lbl_dir = os.path.join(root, "gtFine", split)
        if not os.path.isdir(img_dir):
            report.problem(f"{img_dir}: Cityscapes {split} image folder not found")
            notes.append(f"{split}: no images")
            continue
        images = _rel_pngs(img_dir)
        if not images:
            report.problem(f"{img_dir}: no .png image found")
        odd = [r for r in images if not r.endswith(_IMG_SUFFIX)]
        for r in odd:
            report.warn(f"{os.path.join(img_dir, r)}: not named *{_IMG_SUFFIX} (used anyway)", kind="name")
        need_labels = split == "val"
        if not os.path.isdir(lbl_dir):
            if need_labels:
                report.problem(f"{lbl_dir}: Cityscapes gtFine {split} label folder not found")
            else:
                report.warn(f"{lbl_dir}: not found (train labels are not used for training)")
            notes.append(f"{split} {len(images)} images / 0 gtFine labels")
            continue
        labels = [r for r in _rel_pngs(lbl_dir) if r.endswith(_LBL_SUFFIX)]
        label_set = set(labels)
        pairs = []
        for r in images:
            lr = _label_rel(r)
            img_path, lbl_path = os.path.join(img_dir, r), os.path.join(lbl_dir, lr)
            if lr in label_set:
                pairs.append((img_path, lbl_path))
            elif need_labels:
                report.problem(f"{lbl_path}: label of image {img_path} not found")
            else:
                report.warn(f"{lbl_path}: label of train image {img_path} not found (not used for training)",
                            kind="train-label")
        image_labels = {_label_rel(r) for r in images}
        for lr in labels:
            if lr not in image_labels:
                (report.problem if need_labels else report.warn)(
                    f"{os.path.join(img_dir, lr[: -len(_LBL_SUFFIX)] + _IMG_SUFFIX)}: image of label "
                    f"{os.path.join(lbl_dir, lr)} not found")
        good = _check_headers(report, pairs, exact=need_labels, label_modes=LABEL_MODES if need_labels else None)
        if read_ids and need_labels and good:
            ids_by_path = read_all_ids([lbl for _, lbl in good], "ids", workers)
            _unknown_id_warnings(report, ids_by_path, CITYSCAPES_MAX_ID, "Cityscapes")
        notes.append(f"{split} {len(images)} images / {len(labels)} gtFine labels")
    report.summary.append(f"target cityscapes {root}: " + ", ".join(notes))


# ---------------------------------------------------------------------------------------------- entry
def run_checks(src_rootpath: str | None, tgt_rootpath: str | None, src_dataset: str = "gta5",
               num_classes: int | None = None, workers: int = 1, read_ids: bool = True,
               out=None) -> Report:
    """Run every check and print problems, warnings and the summary; returns the report."""
    report = Report(out)
    out = report.out
    if num_classes is None:
        num_classes = 16 if src_dataset == "synthia" else 19
    if src_rootpath:
        if src_dataset == "synthia":
            check_synthia(src_rootpath, report, num_classes if num_classes in (16, 13) else 16, workers, read_ids)
        else:
            check_gta5(src_rootpath, report, num_classes, workers, read_ids)
    if tgt_rootpath:
        check_cityscapes(tgt_rootpath, report, num_classes, workers, read_ids)
    print("summary:", file=out)
    for line in report.summary:
        print(f"  {line}", file=out)
    for kind, n in report.hidden_warnings().items():
        print(f"  ({n} more '{kind}' warnings not shown)", file=out)
    verdict = "all is well" if report.problems == 0 else "NOT ready for training"
    print(f"  {report.problems} problem(s), {report.warnings} warning(s): {verdict}", file=out, flush=True)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m datasets.check",
        description="Check GTA5/SYNTHIA and Cityscapes trees (layout, pairs, sizes, label ids, split.mat, "
                    "gtav_label_info.p). Exit 0 when all is well, 1 otherwise.",
    )
    parser.add_argument("--src_rootpath", default=None, help="GTA5 (or SYNTHIA) root")
    parser.add_argument("--tgt_rootpath", default=None, help="Cityscapes root")
    parser.add_argument("--src_dataset", default="gta5", choices=["gta5", "synthia"])
    parser.add_argument("--num-classes", dest="num_classes", type=int, default=None, choices=[19, 16, 13],
                        help="default 19 (gta5), 16 (synthia)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="processes decoding labels")
    parser.add_argument("--headers-only", dest="headers_only", action="store_true",
                        help="do not decode labels (no id / label-info class checks): much faster on full datasets")
    args = parser.parse_args(argv)
    if not args.src_rootpath and not args.tgt_rootpath:
        parser.error("give --src_rootpath and/or --tgt_rootpath")
    report = run_checks(args.src_rootpath, args.tgt_rootpath, args.src_dataset, args.num_classes,
                        max(1, args.workers), not args.headers_only)
    return 0 if report.problems == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
