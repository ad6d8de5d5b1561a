"""GTA5 source dataset (docs/METHOD.md section 1, "GTA5 (source)").

Also holds the small reading helpers shared by the other loaders.
"""

from __future__ import annotations

import os
import random
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .errors import DatasetError
from .images import _load_top, _WholeDecode, open_rgb, resize_image
from .labels import encode_labels, unknown_gta5_ids
from .transforms import JointAugment, resize_label, to_chw_tensor

Key = int | tuple[int, int] | Sequence[int]

# Image and label may differ in size by a rounding error; beyond this relative aspect
# difference they cannot show the same frame and we refuse the pair.
_MAX_ASPECT_DIFF = 0.02


def parse_key(key: Any, length: int) -> tuple[int, int]:
    """Split a dataset key into ``(epoch, index)``; a plain int means epoch 0."""
    if isinstance(key, torch.Tensor):
        key = key.tolist()
    if isinstance(key, (tuple, list)):
        if len(key) != 2:
            raise TypeError(f"a dataset key is an int or (epoch, index), got {key!r}")
        epoch, index = int(key[0]), int(key[1])
    elif isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        epoch, index = 0, int(key)
    else:
        raise TypeError(f"a dataset key is an int or (epoch, index), got {key!r}")
    if not 0 <= index < length:
        raise IndexError(f"index {index} out of range for a dataset of {length} samples")
    return epoch, index


def sample_rngs(seed: int, domain: str, epoch: int, index: int
                ) -> tuple[random.Random, torch.Generator]:
    """Per-sample generators, a pure function of ``(seed, domain, epoch, index)``.

    ``random.Random`` seeded with a string hashes it with SHA-512, so this is the same in
    every process (no dependence on ``PYTHONHASHSEED`` or on the worker). The torch
    generator (colour jitter) is seeded from the first draw of the Python one.
    """
    rng = random.Random(f"{seed}|{domain}|{epoch}|{index}")
    gen = torch.Generator()
    gen.manual_seed(rng.getrandbits(63))
    return rng, gen


def image_size(path: str, what: str = "image") -> tuple[int, int]:
    """``(width, height)`` from an image file's header; DatasetError naming the file if it fails."""
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: {what} file not found")
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise DatasetError(f"{path}: cannot read {what} (corrupt or not an image)") from None


def read_image(path: str) -> np.ndarray:
    """Read an image file as uint8 RGB HxWx3; DatasetError naming the file if it fails."""
    return np.array(open_rgb(path))


def read_label_ids(path: str, rows: int | None = None) -> np.ndarray:
    """Read a single-channel label-id PNG (grey or palette) as an HxW integer array.

    Palette PNGs (GTA5) are read with PIL so that we get the palette indices, which are
    the label ids; OpenCV would expand them to colours. ``rows``: only the top rows are
    needed (the array returned may hold only those).
    """
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: label file not found")
    for top in (rows, None):
        try:
            with Image.open(path) as im:
                if im.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
                    raise DatasetError(
                        f"{path}: label must be a single-channel (grey or palette) PNG, "
                        f"got mode {im.mode}"
                    )
                _load_top(im, top)
                return np.asarray(im)
        except _WholeDecode:
            continue
        except DatasetError:
            raise
        except (OSError, ValueError, SyntaxError) as e:
            raise DatasetError(f"{path}: cannot read label ({e})") from None
    raise AssertionError("unreachable")


def check_pair_sizes(img_path: str, img_hw: tuple[int, int], lbl_path: str,
                     lbl_hw: tuple[int, int]) -> None:
    """Image and label must show the same frame (same size, or the same aspect ratio)."""
    if img_hw == lbl_hw:
        return
    a_img = img_hw[1] / img_hw[0]
    a_lbl = lbl_hw[1] / lbl_hw[0]
    if abs(a_img - a_lbl) / a_img > _MAX_ASPECT_DIFF:
        raise DatasetError(
            f"{lbl_path}: label size {lbl_hw[1]}x{lbl_hw[0]} (WxH) does not match image "
            f"{img_path} of size {img_hw[1]}x{img_hw[0]}"
        )


def resize_pair(img: Image.Image, label: np.ndarray | None, size_wh: tuple[int, int]
                ) -> tuple[Image.Image, np.ndarray | None]:
    """Resize image and label to ``size_wh`` as the original: PIL bilinear for the image,
    PIL nearest for the label; each is left as it is when it already has that size."""
    img = resize_image(img, size_wh)
    if label is not None:
        label = resize_label(label, size_wh)
    return img, label


def augment_or_whole(
    augment: JointAugment | None,
    img: Image.Image | np.ndarray,
    label: np.ndarray | None,
    rng: random.Random,
    gen: torch.Generator,
    params: dict[str, Any] | None = None,
    size_hw: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Run ``augment`` (or keep the whole image) and pack the DESIGN.md sample fields.

    ``params``: geometry already drawn with ``augment.draw`` (then ``img`` and ``label`` may
    hold only the top rows of an image of size ``size_hw``)."""
    if augment is not None and params is not None:
        out_img, out_lbl = augment.apply(img, label, params, gen, size_hw)
    elif augment is None:
        arr = np.asarray(img)
        h, w = arr.shape[:2]
        out_img = to_chw_tensor(arr)
        out_lbl = None if label is None else torch.from_numpy(np.array(label))
        params = {"resized_hw": (h, w), "crop_box": (0, h, 0, w), "flip": False}
    else:
        out_img, out_lbl, params = augment(img, label, rng, gen)
    sample: dict[str, Any] = {"img": out_img}
    if out_lbl is not None:
        sample["label"] = out_lbl
    sample["resized_hw"] = torch.tensor(params["resized_hw"], dtype=torch.int64)
    sample["crop_box"] = torch.tensor(params["crop_box"], dtype=torch.int64)
    sample["flip"] = torch.tensor(params["flip"], dtype=torch.bool)
    return sample


def require_dir(path: str, what: str) -> None:
    """DatasetError unless ``path`` is a folder."""
    if not os.path.isdir(path):
        raise DatasetError(f"{path}: {what} folder not found")


def _split_names(split_path: str) -> list[str]:
    """All image names of split.mat (train + val + test ids, 1-based), sorted."""
    import scipy.io
    from scipy.io.matlab import MatReadError

    if not os.path.isfile(split_path):
        raise DatasetError(f"{split_path}: GTA5 split file not found")
    try:
        mat = scipy.io.loadmat(split_path)
    except (MatReadError, OSError, ValueError, TypeError, KeyError, EOFError) as e:
        raise DatasetError(f"{split_path}: cannot read MATLAB split file ({e})") from None
    ids: set[int] = set()
    for key in ("trainIds", "valIds", "testIds"):
        if key not in mat:
            raise DatasetError(f"{split_path}: missing '{key}' in the split file")
        arr = np.asarray(mat[key]).reshape(-1)
        if arr.size and (not np.all(np.isfinite(arr)) or np.any(arr < 1)):
            raise DatasetError(f"{split_path}: '{key}' must hold 1-based image numbers")
        ids.update(int(v) for v in arr)
    if not ids:
        raise DatasetError(f"{split_path}: the split file lists no image")
    return [f"{i:05d}.png" for i in sorted(ids)]


class GTA5Dataset(Dataset):
    """GTA5 images and encoded labels, resized to ``img_size`` then augmented.

    ``img_size`` is ``(W, H)`` (default 1914x1052, docs/METHOD.md section 1). The order of samples
    is ``file_list`` (the class-balanced list of label names, see
    :func:`datasets.class_balance.class_balanced_list`) when given, else every image of
    ``split.mat`` (train, val and test ids together), sorted. Keys are ``int`` or
    ``(epoch, index)``; all randomness is seeded from ``(seed, "source", epoch, index)``.
    ``split`` is kept for interface symmetry: as in the original, training uses the
    train, val and test ids of ``split.mat`` together.

    Image and label files of slightly different sizes but the same aspect ratio are
    accepted (both are resized to ``img_size`` independently, as the original does);
    a pair whose aspect ratios differ by more than 2% raises :class:`DatasetError`.
    """

    domain = "source"

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "train",
        img_size: Sequence[int] = (1914, 1052),
        augment: JointAugment | None = None,
        seed: int = 1234,
        file_list: Sequence[str] | None = None,
        skip_bad_images: bool = False,
        num_classes: int = 19,
    ) -> None:
        self.root = os.fspath(root)
        self.split = split
        self.img_size = (int(img_size[0]), int(img_size[1]))
        self.augment = augment
        self.seed = int(seed)
        self.skip_bad_images = bool(skip_bad_images)
        self.num_classes = int(num_classes)
        require_dir(self.root, "GTA5 root")
        self.image_dir = os.path.join(self.root, "images")
        self.label_dir = os.path.join(self.root, "labels")
        require_dir(self.image_dir, "GTA5 images")
        require_dir(self.label_dir, "GTA5 labels")
        # split.mat is required as in the original, even when the class-balanced list gives the order.
        split_names = _split_names(os.path.join(self.root, "split.mat"))
        if file_list is None:
            names = split_names
        else:
            names = [str(n) for n in file_list]
            if not names:
                raise DatasetError(f"{self.root}: the GTA5 file list is empty")
        self._check_files(names)
        self.files = names
        self._warned: set[str] = set()

    def _check_files(self, names: list[str]) -> None:
        """Every listed name must exist in images/ and labels/ (one directory listing)."""
        images = set(os.listdir(self.image_dir))
        labels = set(os.listdir(self.label_dir))
        for name in dict.fromkeys(names):
            if name not in images:
                raise DatasetError(f"{os.path.join(self.image_dir, name)}: image not found")
            if name not in labels:
                raise DatasetError(f"{os.path.join(self.label_dir, name)}: label not found")

    def __len__(self) -> int:
        return len(self.files)

    def label_path_of(self, index: int) -> str:
        """The label file of sample ``index``."""
        return os.path.join(self.label_dir, self.files[index])

    def read_ids(self, path: str, rows: int | None = None) -> np.ndarray:
        """The label file's class ids (only its top ``rows`` rows are needed, if given)."""
        return read_label_ids(path, rows)

    def encode(self, ids: np.ndarray, path: str = "") -> np.ndarray:
        """Class ids -> train ids (uint8, ignore 250) of the label file ``path``.

        As in the original's GTA5 loader, only the ids 0..34 and 250 are label ids
        (``datasets.labels.GTA5_LABEL_IDS``; 0..34 other than the 19 classes' ids, and 250,
        become 250); any other id in the pixels read stops with a :class:`DatasetError` naming
        the file, where the original's loader raises ``ValueError``.
        """
        unknown = unknown_gta5_ids(ids)
        if unknown:
            shown = ", ".join(str(v) for v in unknown[:8]) + (" ..." if len(unknown) > 8 else "")
            raise DatasetError(f"{path or 'GTA5 label'}: label ids {shown} are not GTA5 label ids "
                               "(0..34, and 250 for ignore)")
        return encode_labels(ids, self.num_classes)

    def load_pair(self, index: int, encode: bool = True) -> tuple[Image.Image, np.ndarray, str]:
        """Image (RGB PIL image) and train ids (uint8), both resized to ``img_size``.

        ``encode=False`` keeps the file's label ids (encoding is a per-pixel map, so it
        gives the same train ids after the nearest resizes, crop and flip, on fewer pixels).
        """
        name = self.files[index]
        img_path = os.path.join(self.image_dir, name)
        lbl_path = os.path.join(self.label_dir, name)
        img = open_rgb(img_path)
        ids = self.read_ids(lbl_path)
        check_pair_sizes(img_path, (img.height, img.width), lbl_path, ids.shape[:2])
        label = self.encode(ids, lbl_path) if encode else ids
        img, label = resize_pair(img, label, self.img_size)
        return img, label, img_path

    def _load_sample(self, index: int, rng: random.Random
                     ) -> tuple[Image.Image, np.ndarray, str, dict[str, Any] | None, tuple[int, int] | None]:
        """Image and label ids (not encoded) of a training sample, and the drawn geometry.

        With augmentation and both files already at ``img_size`` (no pre-resize), the
        geometry is drawn from the file headers first and only the top rows the crop reads
        are decoded; returns ``(img, ids, path, params, (H, W))``. Otherwise
        ``(img, ids, path, None, None)`` from :meth:`load_pair`, and the augmentation draws.
        """
        aug = self.augment
        if aug is not None and aug.enabled:
            name = self.files[index]
            img_path = os.path.join(self.image_dir, name)
            lbl_path = os.path.join(self.label_dir, name)
            if image_size(img_path) == self.img_size and image_size(lbl_path, "label") == self.img_size:
                width, height = self.img_size
                params = aug.draw(rng, height, width)
                img_rows, lbl_rows = aug.rows_needed(params, height, width)
                img = open_rgb(img_path, rows=img_rows)
                ids = self.read_ids(lbl_path, rows=lbl_rows)
                return img, ids, img_path, params, (height, width)
        img, ids, path = self.load_pair(index, encode=False)
        return img, ids, path, None, None

    def _load_with_skip(self, index: int, rng: random.Random
                        ) -> tuple[Image.Image, np.ndarray, str, dict[str, Any] | None, tuple[int, int] | None, int]:
        """``_load_sample``, or with ``skip_bad_images`` the next readable index."""
        if not self.skip_bad_images:
            return (*self._load_sample(index, rng), index)
        for step in range(len(self.files)):
            i = (index + step) % len(self.files)
            state = rng.getstate()
            try:
                return (*self._load_sample(i, rng), i)
            except DatasetError as e:
                rng.setstate(state)
                name = self.files[i]
                if name not in self._warned:
                    self._warned.add(name)
                    warnings.warn(f"skipping unreadable sample: {e}", stacklevel=3)
        raise DatasetError(f"{self.root}: no readable image/label pair at all")

    def __getitem__(self, key: Key) -> dict[str, Any]:
        epoch, index = parse_key(key, len(self))
        rng, gen = sample_rngs(self.seed, self.domain, epoch, index)
        img, ids, path, params, size_hw, used = self._load_with_skip(index, rng)
        sample = augment_or_whole(self.augment, img, ids, rng, gen, params, size_hw)
        sample["label"] = torch.from_numpy(self.encode(sample["label"].numpy(), self.label_path_of(used)))
        sample["path"] = path
        sample["index"] = used
        return sample
