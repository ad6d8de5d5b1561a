"""Build the derived files a GTA5 root needs: ``gtav_label_info.p`` and, if absent, ``split.mat``.

    python3 -m datasets.prepare gta5 ROOT [--num-classes 19] [--workers N] [--quiet]

* ``ROOT/gtav_label_info.p`` (docs/METHOD.md section 1: ``(label_to_file, file_to_label)``, the input of
  the class-balanced list) is (re)built from every ``ROOT/labels/*.png``: a file is listed
  under every train id it contains, files in sorted order. This is the rule of
  :func:`datasets.label_info.label_info_from_folder` (tested to give the same object), done
  with one read per file so that the per-class pixel counts come from the same pass, and
  spread over ``--workers`` processes. The file is written atomically with
  :func:`datasets.label_info.save_label_info`.
* The per-class pixel counts are printed as a table.
* ``ROOT/split.mat`` is written **only when there is none** (an existing one is never
  touched). It lists every image that has a label as ``trainIds`` (``valIds`` and
  ``testIds`` empty), which is what training reads anyway (it uses all three splits
  together); a warning says so.

Exit codes: 0 done, 2 bad input (one line naming the folder or file).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from utils.files import atomic_open

from .errors import DatasetError
from .label_info import save_label_info
from .labels import class_names, encode_labels

_CHUNK = 32  # label files per work item


LABEL_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L")


def read_label_ids(path: str) -> np.ndarray:
    """A single-channel (grey or palette) label-id PNG as an integer array, like the GTA5 loader
    reads it (palette indices are the ids); :class:`DatasetError` naming the file otherwise.
    Only PIL and NumPy: worker processes stay light (no torch / OpenCV import).
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode not in LABEL_MODES:
                raise DatasetError(f"{path}: label must be a single-channel (grey or palette) PNG, got mode {im.mode}")
            im.load()
            return np.asarray(im)
    except DatasetError:
        raise
    except FileNotFoundError:
        raise DatasetError(f"{path}: label file not found") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise DatasetError(f"{path}: cannot read label ({e})") from None


def _scan_chunk(args: tuple[str, list[str], int]) -> list[tuple[str, list[int], np.ndarray]]:
    """``(name, train ids present, per-class pixel counts)`` of each label file of a chunk."""
    labels_dir, names, num_classes = args
    out = []
    for name in names:
        ids = read_label_ids(os.path.join(labels_dir, name))
        enc = encode_labels(ids, num_classes)
        counts = np.bincount(enc.reshape(-1), minlength=256)[:num_classes].astype(np.int64)
        out.append((name, [int(c) for c in np.flatnonzero(counts)], counts))
    return out


def scan_labels(
    labels_dir: str, names: Sequence[str], num_classes: int = 19, workers: int = 1, progress: bool = True
) -> tuple[list[list[str]], dict[str, list[int]], np.ndarray]:
    """``(label_to_file, file_to_label, pixel_counts)`` of the label files ``names``.

    ``label_to_file`` / ``file_to_label`` equal ``label_info_from_folder(labels_dir,
    num_classes, names)``; ``pixel_counts[c]`` is the number of pixels of train id ``c``.
    Raises :class:`DatasetError` naming the first unreadable label.
    """
    from tqdm import tqdm

    chunks = [(labels_dir, list(names[i:i + _CHUNK]), num_classes) for i in range(0, len(names), _CHUNK)]
    label_to_file: list[list[str]] = [[] for _ in range(num_classes)]
    file_to_label: dict[str, list[int]] = {}
    pixels = np.zeros(num_classes, dtype=np.int64)
    bar = tqdm(total=len(names), desc="labels", unit="file", disable=not progress, dynamic_ncols=True)
    pool = ProcessPoolExecutor(workers) if workers > 1 and len(chunks) > 1 else None
    try:
        results = pool.map(_scan_chunk, chunks) if pool else map(_scan_chunk, chunks)
        for result in results:  # in chunk order: the lists stay in sorted file order
            for name, classes, counts in result:
                file_to_label[name] = classes
                for c in classes:
                    label_to_file[c].append(name)
                pixels += counts
            bar.update(len(result))
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return label_to_file, file_to_label, pixels


def format_pixel_table(pixels: np.ndarray, label_to_file: Sequence[Sequence[str]], num_classes: int) -> str:
    """One row per class: train id, name, pixels, share of the labelled pixels, files."""
    names = class_names(num_classes)
    total = int(pixels.sum())
    width = max(len("class"), *(len(n) for n in names))
    lines = [f"{'id':>3}  {'class':<{width}}  {'pixels':>14}  {'share':>7}  {'files':>7}"]
    lines.append("-" * len(lines[0]))
    for c, name in enumerate(names):
        share = 100.0 * pixels[c] / total if total else 0.0
        flag = "   <- in no file" if pixels[c] == 0 else ""
        lines.append(f"{c:>3}  {name:<{width}}  {int(pixels[c]):>14,d}  {share:6.2f}%  {len(label_to_file[c]):>7,d}{flag}")
    lines.append("-" * len(lines[0]))
    lines.append(f"{'':>3}  {'labelled':<{width}}  {total:>14,d}")
    return "\n".join(lines)


def split_numbers(names: Sequence[str]) -> tuple[list[int], list[str]]:
    """Image numbers of ``NNNNN.png`` names (as split.mat holds them) and the names that are not."""
    numbers, others = [], []
    for name in names:
        stem = name[: -len(".png")]
        if stem.isdigit() and int(stem) >= 1 and f"{int(stem):05d}.png" == name:
            numbers.append(int(stem))
        else:
            others.append(name)
    return sorted(numbers), others


def write_split(path: str, numbers: Sequence[int]) -> None:
    """``split.mat`` with every number in ``trainIds`` and empty ``valIds`` / ``testIds``, written atomically."""
    import scipy.io

    ids = np.asarray(numbers, dtype=np.float64).reshape(-1, 1)  # MATLAB doubles, like the original file
    empty = np.zeros((0, 1), dtype=np.float64)
    with atomic_open(path) as f:
        scipy.io.savemat(f, {"trainIds": ids, "valIds": empty, "testIds": empty})


def prepare_gta5(root: str, num_classes: int = 19, workers: int = 1, quiet: bool = False) -> dict:
    """Build ``gtav_label_info.p`` (always) and ``split.mat`` (only if absent) in a GTA5 root.

    Returns a summary dict (``labels``, ``pixels``, ``split_written``). Raises
    :class:`DatasetError` naming the folder or file on bad input.
    """

    if not os.path.isdir(root):
        raise DatasetError(f"{root}: GTA5 root folder not found")
    labels_dir = os.path.join(root, "labels")
    if not os.path.isdir(labels_dir):
        raise DatasetError(f"{labels_dir}: labels folder not found (expected ROOT/labels/*.png)")
    names = sorted(n for n in os.listdir(labels_dir) if n.endswith(".png"))
    if not names:
        raise DatasetError(f"{labels_dir}: no .png label file found")
    print(f"{root}: {len(names)} label files; building gtav_label_info.p ({num_classes} classes)", flush=True)
    label_to_file, file_to_label, pixels = scan_labels(labels_dir, names, num_classes, workers, progress=not quiet)
    info_path = os.path.join(root, "gtav_label_info.p")
    existed = os.path.isfile(info_path)
    save_label_info(info_path, label_to_file, file_to_label)
    print(format_pixel_table(pixels, label_to_file, num_classes))
    print(f"{'replaced' if existed else 'wrote'} {info_path}")
    for c, name in enumerate(class_names(num_classes)):
        if len(label_to_file[c]) < 2:
            print(f"warning: class {c} ({name}) is in {len(label_to_file[c])} label file(s); the class-balanced "
                  "list leaves a class without files out of the draw", file=sys.stderr)

    split_path = os.path.join(root, "split.mat")
    split_written = False
    if os.path.exists(split_path):
        print(f"kept the existing {split_path} (never overwritten)")
    else:
        images_dir = os.path.join(root, "images")
        if os.path.isdir(images_dir):
            images = {n for n in os.listdir(images_dir) if n.endswith(".png")}
            paired = [n for n in names if n in images]
            unpaired = len(names) - len(paired)
            if unpaired:
                print(f"warning: {unpaired} label file(s) have no image in {images_dir}; split.mat leaves them out",
                      file=sys.stderr)
        else:
            print(f"warning: {images_dir}: images folder not found; split.mat lists the label files", file=sys.stderr)
            paired = names
        numbers, others = split_numbers(paired)
        if others:
            print(f"warning: {len(others)} file(s) are not named NNNNN.png and cannot be listed in split.mat "
                  f"(first: {others[0]})", file=sys.stderr)
        if not numbers:
            raise DatasetError(f"{split_path}: no image named NNNNN.png with a label to list; not written")
        write_split(split_path, numbers)
        split_written = True
        print(f"wrote {split_path}")
        print(f"warning: {split_path} lists every image ({len(numbers)}) as trainIds, valIds and testIds are empty; "
              "training uses all three together, so this is what it reads anyway, but it is not the official "
              "GTA5 split", file=sys.stderr)
    return {"labels": len(names), "pixels": pixels, "split_written": split_written}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m datasets.prepare",
        description="Build gtav_label_info.p (and split.mat if absent) for a GTA5 root.",
    )
    parser.add_argument("dataset", choices=["gta5"], help="dataset layout (gta5)")
    parser.add_argument("root", help="GTA5 root (holds images/ and labels/)")
    parser.add_argument("--num-classes", dest="num_classes", type=int, default=19, choices=[19, 16, 13])
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="processes reading the labels")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        prepare_gta5(args.root, args.num_classes, max(1, args.workers), args.quiet)
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc.filename or args.root}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
