"""What a run read: per split of a dataset root, the number of files and a fingerprint of their
list (docs/RELIABILITY.md "What makes runs comparable").

``fingerprint(root, kind)`` walks each split folder of ``kind`` (the layouts of docs/METHOD.md
section 1) and hashes the sorted lines ``relative_path<TAB>size_in_bytes`` (``/`` separators,
relative to the split folder, UTF-8) with SHA-256. Two trees with the same fingerprints hold
the same file names with the same sizes; the contents are not read (that would take minutes
for GTA5), so an edit that keeps a file's size is not seen. Files and folders whose name starts
with a dot are skipped (``.DS_Store``, the writer's temporary files); symbolic links are
followed, each folder visited once.

Splits per kind:

* ``gta5``: ``images``, ``labels``; ``lists`` gives the ids of ``split.mat``'s ``trainIds``,
  ``valIds`` and ``testIds`` (count and hash each) and ``files`` the size and SHA-256 of
  ``split.mat`` and ``gtav_label_info.p`` (small files read whole; they choose and order the
  samples);
* ``synthia``: ``RGB``, ``GT/LABELS``;
* ``cityscapes``: ``leftImg8bit/train``, ``leftImg8bit/val``, ``gtFine/train``, ``gtFine/val``;
* ``soft_labels``: the folder's own ``.npy`` files, not recursive (what ``get_thresholds.py`` reads).

A missing root or split is recorded (``exists: false`` / ``missing: true``), never an error: the
scripts check their data themselves.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np

SPLITS = {
    "gta5": ("images", "labels"),
    "synthia": ("RGB", "GT/LABELS"),
    "cityscapes": ("leftImg8bit/train", "leftImg8bit/val", "gtFine/train", "gtFine/val"),
    "soft_labels": (".",),
}
GTA5_LISTS = {"train": "trainIds", "val": "valIds", "test": "testIds"}
GTA5_FILES = ("split.mat", "gtav_label_info.p")
_CHUNK = 1 << 20


def _walk(folder: str, recursive: bool, suffix: str) -> list[tuple[str, int]]:
    """``(relative path, size)`` of the non-hidden files under ``folder`` ending with ``suffix``."""
    out: list[tuple[str, int]] = []
    seen: set[tuple[int, int]] = set()
    stack = [("", folder)]
    while stack:
        rel, path = stack.pop()
        st = os.stat(path)
        if (st.st_dev, st.st_ino) in seen:  # a link back to a folder already listed
            continue
        seen.add((st.st_dev, st.st_ino))
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                name = f"{rel}{entry.name}"
                try:
                    if entry.is_dir():
                        if recursive:
                            stack.append((f"{name}/", entry.path))
                    elif entry.is_file() and entry.name.endswith(suffix):
                        out.append((name, entry.stat().st_size))
                except OSError:  # a dangling link or a file removed meanwhile: not a file of the split
                    continue
    return out


def listing_digest(lines: list[str]) -> str:
    """SHA-256 (hex) of the sorted ``lines``, each ended by a newline."""
    h = hashlib.sha256()
    for line in sorted(lines):
        h.update(line.encode("utf-8", "surrogateescape") + b"\n")
    return h.hexdigest()


def split_fingerprint(folder: str, recursive: bool = True, suffix: str = "") -> dict[str, Any]:
    """``{"missing", "files", "sha256"}`` of one split folder (see the module docstring)."""
    if not os.path.isdir(folder):
        return {"missing": True, "files": 0, "sha256": None}
    files = _walk(folder, recursive, suffix)
    return {"missing": False, "files": len(files), "sha256": listing_digest([f"{p}\t{s}" for p, s in files])}


def _file_digest(path: str) -> dict[str, Any] | None:
    """Size and SHA-256 of a small file; ``None`` when it is absent or unreadable."""
    try:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        return {"size": os.path.getsize(path), "sha256": h.hexdigest()}
    except OSError:
        return None


def gta5_lists(split_path: str) -> dict[str, Any] | None:
    """Count and hash of each id list of GTA5's ``split.mat``; ``None`` when the file is absent,
    ``{"error": ...}`` when it does not read (the loader reports that itself)."""
    if not os.path.isfile(split_path):
        return None
    import scipy.io  # only here: GTA5's loader needs it anyway, the other kinds do not
    from scipy.io.matlab import MatReadError

    try:
        mat = scipy.io.loadmat(split_path)
        out = {}
        for name, key in GTA5_LISTS.items():
            ids = [str(int(v)) for v in np.asarray(mat[key]).reshape(-1)] if key in mat else None
            out[name] = None if ids is None else {"files": len(ids), "sha256": listing_digest(ids)}
        return out
    except (MatReadError, OSError, ValueError, TypeError, EOFError) as exc:  # the loader says it in one line
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}


def fingerprint(root: str, kind: str) -> dict[str, Any]:
    """The record of dataset ``root`` of ``kind`` (a key of :data:`SPLITS`): ``root`` (absolute),
    ``kind``, ``exists`` and ``splits`` (split name -> :func:`split_fingerprint`); GTA5 also has
    ``lists`` (:func:`gta5_lists`) and ``files`` (``split.mat``, ``gtav_label_info.p``: size and
    SHA-256, or ``None``)."""
    if kind not in SPLITS:
        raise ValueError(f"unknown dataset kind {kind!r}; one of {', '.join(SPLITS)}")
    root_abs = os.path.abspath(root)
    record: dict[str, Any] = {"root": root_abs, "kind": kind, "exists": os.path.isdir(root_abs)}
    if kind == "soft_labels":
        record["splits"] = {".": split_fingerprint(root_abs, recursive=False, suffix=".npy")}
    else:
        record["splits"] = {s: split_fingerprint(os.path.join(root_abs, *s.split("/"))) for s in SPLITS[kind]}
    if kind == "gta5":
        record["lists"] = gta5_lists(os.path.join(root_abs, "split.mat"))
        record["files"] = {name: _file_digest(os.path.join(root_abs, name)) for name in GTA5_FILES}
    return record
