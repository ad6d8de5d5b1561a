"""SYNTHIA-RAND-CITYSCAPES source dataset (docs/METHOD.md section 1, "SYNTHIA")."""

from __future__ import annotations

import os
from collections.abc import Sequence

import cv2
import numpy as np

from .errors import DatasetError
from .gta5 import GTA5Dataset, require_dir
from .labels import synthia_encode_labels
from .transforms import JointAugment


def read_synthia_label(path: str) -> np.ndarray:
    """SYNTHIA class ids of a ``GT/LABELS`` PNG (16-bit; the id is in the red channel).

    Read with ``cv2.IMREAD_UNCHANGED`` the channels come as B, G, R, so the id is the
    last one (docs/METHOD.md section 1). A single-channel file is taken as the ids directly.
    """
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: label file not found")
    lbl = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if lbl is None:
        raise DatasetError(f"{path}: cannot read label (corrupt or not an image)")
    if lbl.ndim == 3:
        lbl = lbl[:, :, 2] if lbl.shape[2] >= 3 else lbl[:, :, 0]
    return lbl


class SynthiaDataset(GTA5Dataset):
    """SYNTHIA images and labels resized to ``img_size`` (default 1280x760), augmented.

    Root holds ``RGB/*.png`` and ``GT/LABELS/*.png`` with the same names. Everything but the
    files is :class:`datasets.gta5.GTA5Dataset`'s: samples have the GTA5 format (``img``,
    ``label``, ``resized_hw``, ``crop_box``, ``flip``, ``path``, ``index``), the same
    augmentation and seeding from ``(seed, "source", epoch, index)``; labels are the red channel
    of 16-bit PNGs, encoded to 16 (or 13) train ids.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        img_size: Sequence[int] = (1280, 760),
        augment: JointAugment | None = None,
        seed: int = 1234,
        num_classes: int = 16,
        file_list: Sequence[str] | None = None,
        skip_bad_images: bool = False,
    ) -> None:
        if num_classes not in (16, 13):
            raise ValueError(f"SYNTHIA num_classes must be 16 or 13, got {num_classes}")
        self.root = os.fspath(root)
        self.split = "train"
        self.img_size = (int(img_size[0]), int(img_size[1]))
        self.augment = augment
        self.seed = int(seed)
        self.num_classes = int(num_classes)
        self.skip_bad_images = bool(skip_bad_images)
        require_dir(self.root, "SYNTHIA root")
        self.image_dir = os.path.join(self.root, "RGB")
        self.label_dir = os.path.join(self.root, "GT", "LABELS")
        require_dir(self.image_dir, "SYNTHIA RGB")
        require_dir(self.label_dir, "SYNTHIA GT/LABELS")
        images = sorted(n for n in os.listdir(self.image_dir) if n.endswith(".png"))
        names = images if file_list is None else [str(n) for n in file_list]
        if not names:
            raise DatasetError(f"{self.image_dir}: no .png image found")
        self._check_files(names)
        self.files = names
        self._warned: set[str] = set()

    def read_ids(self, path: str, rows: int | None = None) -> np.ndarray:
        """SYNTHIA class ids of the whole label file (16-bit PNGs are read whole)."""
        return read_synthia_label(path)

    def encode(self, ids: np.ndarray, path: str = "") -> np.ndarray:
        """SYNTHIA class ids -> train ids; every other id becomes 250 (``path`` is not needed)."""
        return synthia_encode_labels(ids, self.num_classes)
