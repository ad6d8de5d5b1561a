"""Cityscapes target dataset (docs/METHOD.md section 1, "Cityscapes (target)")."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from utils.files import read_npy_header

from .errors import DatasetError
from .gta5 import (
    Key,
    augment_or_whole,
    open_rgb,
    parse_key,
    read_label_ids,
    require_dir,
    resize_pair,
    sample_rngs,
)
from .labels import encode_labels
from .transforms import JointAugment, to_chw_tensor

_IMG_SUFFIX = "_leftImg8bit.png"
_LBL_SUFFIX = "_gtFine_labelIds.png"


def soft_label_name(image_path: str) -> str:
    """File name of an image's soft label: its basename with ``.png`` -> ``.npy``.

    docs/METHOD.md section 4: ``aachen_000000_000019_leftImg8bit.png`` ->
    ``aachen_000000_000019_leftImg8bit.npy``.
    """
    return os.path.basename(image_path).removesuffix(".png") + ".npy"


class CityscapesDataset(Dataset):
    """Cityscapes images (and, for val/test, encoded gtFine labels).

    Files are a sorted recursive search for ``.png`` under ``leftImg8bit/<split>``.
    ``split="train"`` gives training samples: ``img`` (augmented crop), ``img_full``
    (the whole image resized to ``img_size``, never augmented), the augmentation
    parameters, and with ``soft_labels_folder`` the stored logits as ``soft_label``.
    ``split="val"`` / ``"test"`` give ``img`` resized to ``img_size`` and ``label`` (the
    encoded ``gtFine`` label at its own size; required for val, optional for test).
    ``train_labels=True`` (train split) also reads the ``gtFine/train`` labels when *every*
    train image has one (``has_labels``; ``labels_missing`` counts the images without):
    the encoded label is resized (nearest) to ``img_size`` and goes through the same
    augmentation call as its image (resize, crop, flip), as ``label``. It serves to measure
    pseudo-label accuracy only (stages/pseudo_quality.py); the draws of the augmentation,
    hence the images, are the same with or without it.
    Keys are ``int`` or ``(epoch, index)``; randomness is seeded from
    ``(seed, "target", epoch, index)``.
    """

    domain = "target"

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "train",
        img_size: Sequence[int] = (2048, 1024),
        augment: JointAugment | None = None,
        seed: int = 1234,
        soft_labels_folder: str | os.PathLike[str] | None = None,
        num_classes: int = 19,
        train_labels: bool = False,
    ) -> None:
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be train, val or test, got {split!r}")
        self.root = os.fspath(root)
        self.split = split
        self.img_size = (int(img_size[0]), int(img_size[1]))
        self.augment = augment
        self.seed = int(seed)
        self.num_classes = int(num_classes)
        self.soft_labels_folder = (
            None if soft_labels_folder is None else os.fspath(soft_labels_folder)
        )
        require_dir(self.root, "Cityscapes root")
        self.image_dir = os.path.join(self.root, "leftImg8bit", split)
        self.label_dir = os.path.join(self.root, "gtFine", split)
        require_dir(self.image_dir, "Cityscapes image")
        files = []
        for folder, _, names in os.walk(self.image_dir):
            files.extend(os.path.join(folder, n) for n in names if n.endswith(".png"))
        files.sort()
        if not files:
            raise DatasetError(f"{self.image_dir}: no .png image found")
        self.files = files
        if split == "val":
            require_dir(self.label_dir, "Cityscapes gtFine label")
            for f in files:
                lbl = self.label_path(f)
                if not os.path.isfile(lbl):
                    raise DatasetError(f"{lbl}: label of image {f} not found")
        self.has_labels = split == "val"
        self.labels_missing = 0
        if split == "train" and train_labels:
            # all or nothing: ground truth for every train image, or for none
            self.labels_missing = sum(not os.path.isfile(self.label_path(f)) for f in files)
            self.has_labels = self.labels_missing == 0
        if self.soft_labels_folder is not None:
            require_dir(self.soft_labels_folder, "soft labels")

    def __len__(self) -> int:
        return len(self.files)

    def label_path(self, image_path: str) -> str:
        """``gtFine/<split>/<city>/<name>_gtFine_labelIds.png`` of an image path."""
        rel = os.path.relpath(image_path, self.image_dir)
        if rel.endswith(_IMG_SUFFIX):
            rel = rel[: -len(_IMG_SUFFIX)] + _LBL_SUFFIX
        else:
            rel = rel[: -len(".png")] + _LBL_SUFFIX
        return os.path.join(self.label_dir, rel)

    def soft_label_path(self, image_path: str) -> str:
        """Where the soft label of an image lives (docs/METHOD.md section 4)."""
        if self.soft_labels_folder is None:
            raise ValueError("no soft_labels_folder was given")
        return os.path.join(self.soft_labels_folder, soft_label_name(image_path))

    def load_soft_label(self, image_path: str) -> torch.Tensor:
        """The stored logits ``[C, h, w]`` of an image, dtype kept (float32 / float16)."""
        path = self.soft_label_path(image_path)
        if not os.path.isfile(path):
            raise DatasetError(f"{path}: soft label of image {image_path} not found")
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise DatasetError(f"{path}: cannot read soft label ({e})") from None
        self._check_soft_shape(path, arr.shape, arr.dtype, self.num_classes, None)
        return torch.from_numpy(np.ascontiguousarray(arr))

    @staticmethod
    def _check_soft_shape(path: str, shape: tuple[int, ...], dtype: np.dtype,
                          num_classes: int, expected_hw: Sequence[int] | None) -> None:
        if len(shape) != 3:
            raise DatasetError(
                f"{path}: soft label must be [C, H, W] logits, got shape {tuple(shape)}"
            )
        if shape[0] != num_classes:
            raise DatasetError(
                f"{path}: soft label has {shape[0]} classes, expected {num_classes}"
            )
        if expected_hw is not None and tuple(shape[1:]) != tuple(int(v) for v in expected_hw):
            raise DatasetError(
                f"{path}: soft label is {shape[1]}x{shape[2]} (HxW), expected "
                f"{expected_hw[0]}x{expected_hw[1]}"
            )
        if dtype not in (np.dtype(np.float32), np.dtype(np.float16)):
            raise DatasetError(f"{path}: soft label dtype {dtype}, expected float32/float16")

    def check_soft_labels(self, num_classes: int | None = None,
                          expected_hw: Sequence[int] | None = None) -> None:
        """Check that every image has a soft label of shape ``[C, *expected_hw]``.

        Only the ``.npy`` headers are read, so this is quick. Raises DatasetError naming
        the first missing or mis-shaped file. ``expected_hw=None`` skips the size check.
        """
        num_classes = self.num_classes if num_classes is None else int(num_classes)
        for image_path in self.files:
            path = self.soft_label_path(image_path)
            if not os.path.isfile(path):
                raise DatasetError(f"{path}: soft label of image {image_path} not found")
            try:
                with open(path, "rb") as f:
                    shape, _, dtype = read_npy_header(f)
            except (OSError, ValueError, EOFError) as e:
                raise DatasetError(f"{path}: not a valid .npy file ({e})") from None
            self._check_soft_shape(path, shape, dtype, num_classes, expected_hw)

    def load_image(self, index: int) -> tuple[Image.Image, tuple[int, int], str]:
        """Image resized to ``img_size`` (RGB PIL image), its original (h, w), its path."""
        path = self.files[index]
        img = open_rgb(path)
        orig_hw = (img.height, img.width)
        img, _ = resize_pair(img, None, self.img_size)
        return img, orig_hw, path

    def load_label(self, image_path: str, image_hw: tuple[int, int]) -> np.ndarray | None:
        """Encoded label of an image at its own size (None for a test image without one)."""
        lbl_path = self.label_path(image_path)
        if self.split == "test" and not os.path.isfile(lbl_path):
            return None
        ids = read_label_ids(lbl_path)
        if tuple(ids.shape[:2]) != tuple(image_hw):
            raise DatasetError(
                f"{lbl_path}: label size {ids.shape[1]}x{ids.shape[0]} (WxH) does not "
                f"match image {image_path} of size {image_hw[1]}x{image_hw[0]}"
            )
        return encode_labels(ids, self.num_classes)

    def __getitem__(self, key: Key) -> dict[str, Any]:
        epoch, index = parse_key(key, len(self))
        img, orig_hw, path = self.load_image(index)
        if self.split != "train":
            sample: dict[str, Any] = {"img": to_chw_tensor(np.asarray(img))}
            label = self.load_label(path, orig_hw)
            if label is not None:
                sample["label"] = torch.from_numpy(label)
        else:
            rng, gen = sample_rngs(self.seed, self.domain, epoch, index)
            label = None
            if self.has_labels:  # monitoring only (pseudo-label accuracy); never a training target
                _, label = resize_pair(img, self.load_label(path, orig_hw), self.img_size)
            sample = augment_or_whole(self.augment, img, label, rng, gen)
            sample["img_full"] = to_chw_tensor(np.asarray(img))
            if self.soft_labels_folder is not None:
                sample["soft_label"] = self.load_soft_label(path)
        sample["path"] = path
        sample["index"] = index
        return sample
