"""SYNTHIA-RAND-CITYSCAPES source dataset (SPEC section 1, "SYNTHIA")."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from .errors import DatasetError
from .gta5 import (
    Key,
    augment_or_whole,
    check_pair_sizes,
    open_rgb,
    parse_key,
    require_dir,
    resize_pair,
    sample_rngs,
)
from .labels import synthia_encode_labels
from .transforms import JointAugment


def read_synthia_label(path: str) -> np.ndarray:
    """SYNTHIA class ids of a ``GT/LABELS`` PNG (16-bit; the id is in the red channel).

    Read with ``cv2.IMREAD_UNCHANGED`` the channels come as B, G, R, so the id is the
    last one (SPEC section 1). A single-channel file is taken as the ids directly.
    """
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: label file not found")
    lbl = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if lbl is None:
        raise DatasetError(f"{path}: cannot read label (corrupt or not an image)")
    if lbl.ndim == 3:
        lbl = lbl[:, :, 2] if lbl.shape[2] >= 3 else lbl[:, :, 0]
    return lbl


class SynthiaDataset(Dataset):
    """SYNTHIA images and labels resized to ``img_size`` (default 1280x760), augmented.

    Root holds ``RGB/*.png`` and ``GT/LABELS/*.png`` with the same names. Samples have the
    GTA5 format (``img``, ``label``, ``resized_hw``, ``crop_box``, ``flip``, ``path``,
    ``index``); labels are encoded to 16 (or 13) train ids. Randomness is seeded from
    ``(seed, "source", epoch, index)``.
    """

    domain = "source"

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
        image_set = set(images)
        labels = set(os.listdir(self.label_dir))
        for name in dict.fromkeys(names):
            if name not in image_set:
                raise DatasetError(f"{os.path.join(self.image_dir, name)}: image not found")
            if name not in labels:
                raise DatasetError(f"{os.path.join(self.label_dir, name)}: label not found")
        self.files = names
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.files)

    def load_pair(self, index: int) -> tuple[Image.Image, np.ndarray, str]:
        """Image (RGB PIL image) and train ids (uint8), both resized to ``img_size``."""
        name = self.files[index]
        img_path = os.path.join(self.image_dir, name)
        lbl_path = os.path.join(self.label_dir, name)
        img = open_rgb(img_path)
        ids = read_synthia_label(lbl_path)
        check_pair_sizes(img_path, (img.height, img.width), lbl_path, ids.shape[:2])
        label = synthia_encode_labels(ids, self.num_classes)
        img, label = resize_pair(img, label, self.img_size)
        return img, label, img_path

    def __getitem__(self, key: Key) -> dict[str, Any]:
        epoch, index = parse_key(key, len(self))
        rng, gen = sample_rngs(self.seed, self.domain, epoch, index)
        used = index
        for step in range(len(self.files) if self.skip_bad_images else 1):
            used = (index + step) % len(self.files)
            try:
                img, label, path = self.load_pair(used)
                break
            except DatasetError as e:
                if not self.skip_bad_images:
                    raise
                if self.files[used] not in self._warned:
                    self._warned.add(self.files[used])
                    warnings.warn(f"skipping unreadable sample: {e}", stacklevel=2)
        else:
            raise DatasetError(f"{self.root}: no readable image/label pair at all")
        sample = augment_or_whole(self.augment, img, label, rng, gen)
        sample["path"] = path
        sample["index"] = used
        return sample
