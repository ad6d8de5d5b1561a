"""Class names, label-id encodings and the colour palette (docs/METHOD.md section 1).

Only NumPy is needed here, so this module is cheap to import.
"""

from __future__ import annotations

import numpy as np

IGNORE_LABEL = 250

CLASS_NAMES_19: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic_light",
    "traffic_sign", "vegetation", "terrain", "sky", "person", "rider", "car",
    "truck", "bus", "train", "motorcycle", "bicycle",
)

# SYNTHIA subsets of the 19 classes (docs/METHOD.md section 1), in train-id order.
CLASS_NAMES_16: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic_light",
    "traffic_sign", "vegetation", "sky", "person", "rider", "car", "bus",
    "motorcycle", "bicycle",
)
CLASS_NAMES_13: tuple[str, ...] = (
    "road", "sidewalk", "building", "traffic_light", "traffic_sign", "vegetation",
    "sky", "person", "rider", "car", "bus", "motorcycle", "bicycle",
)

# Cityscapes label ids of the training classes, in train-id order (docs/METHOD.md section 1).
CITYSCAPES_IDS: dict[int, tuple[int, ...]] = {
    19: (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33),
    16: (7, 8, 11, 12, 13, 17, 19, 20, 21, 23, 24, 25, 26, 28, 32, 33),
    13: (7, 8, 11, 19, 20, 21, 23, 24, 25, 26, 28, 32, 33),
}

# The label ids the original's GTA5 loader accepts (docs/METHOD.md section 1): its void_classes
# (0..6, 9, 10, 14..16, 18, 29, 30, 34), which it sets to 250, and its valid_classes (the 19 ids
# above), which become train ids, i.e. 0..34; and 250, which it leaves as the ignore label. It
# leaves any other id as it is, and its transform then stops ("Segmentation map contained
# invalid class values").
GTA5_LABEL_IDS: tuple[int, ...] = (*range(35), IGNORE_LABEL)

# SYNTHIA-RAND-CITYSCAPES class ids in train-id order (docs/METHOD.md section 1). This is the
# mapping of the ProDA / CBST lineage for SYNTHIA-RAND-CITYSCAPES (id 3 road, 4 sidewalk,
# 2 building, 21 wall, 5 fence, 7 pole, 15 traffic light, 9 traffic sign, 6 vegetation,
# 1 sky, 10 person, 17 rider, 8 car, 19 bus, 12 motorcycle, 11 bicycle).
SYNTHIA_IDS: dict[int, tuple[int, ...]] = {
    16: (3, 4, 2, 21, 5, 7, 15, 9, 6, 1, 10, 17, 8, 19, 12, 11),
    13: (3, 4, 2, 15, 9, 6, 1, 10, 17, 8, 19, 12, 11),
}

PALETTE: tuple[tuple[int, int, int], ...] = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (0, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70),
    (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)


def class_names(num_classes: int) -> tuple[str, ...]:
    """Return the class names for 19, 16 or 13 classes."""
    names = {19: CLASS_NAMES_19, 16: CLASS_NAMES_16, 13: CLASS_NAMES_13}
    if num_classes not in names:
        raise ValueError(f"num_classes must be 19, 16 or 13, got {num_classes}")
    return names[num_classes]


def class_palette(num_classes: int = 19) -> tuple[tuple[int, int, int], ...]:
    """Palette of the ``num_classes`` classes (the 19-class colours of those classes)."""
    return tuple(PALETTE[CLASS_NAMES_19.index(n)] for n in class_names(num_classes))


def _lookup_table(ids: tuple[int, ...]) -> np.ndarray:
    """256-entry table: label id -> train id, every other id -> IGNORE_LABEL."""
    lut = np.full(256, IGNORE_LABEL, dtype=np.uint8)
    lut[np.asarray(ids, dtype=np.int64)] = np.arange(len(ids), dtype=np.uint8)
    return lut


def _apply_lut(label_ids: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Map ``label_ids`` through ``lut``; ids outside 0..255 become IGNORE_LABEL."""
    arr = np.asarray(label_ids)
    if arr.dtype == np.uint8:
        return lut[arr]
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.issubdtype(arr.dtype, np.floating):
            raise TypeError(f"label ids must be integers, got dtype {arr.dtype}")
        arr = arr.astype(np.int64)
    inside = (arr >= 0) & (arr < 256)
    # 255 is never a class id in these tables, so it stands in for "out of range".
    return lut[np.where(inside, arr, 255).astype(np.uint8)]


def encode_labels(label_ids: np.ndarray, num_classes: int = 19) -> np.ndarray:
    """Cityscapes / GTA5 label ids -> train ids (uint8, ignore 250); docs/METHOD.md section 1."""
    if num_classes not in CITYSCAPES_IDS:
        raise ValueError(f"num_classes must be 19, 16 or 13, got {num_classes}")
    return _apply_lut(label_ids, _lookup_table(CITYSCAPES_IDS[num_classes]))


_GTA5_KNOWN = np.zeros(256, dtype=bool)
_GTA5_KNOWN[list(GTA5_LABEL_IDS)] = True


def unknown_gta5_ids(label_ids: np.ndarray) -> list[int]:
    """The distinct ids of ``label_ids`` that are not in :data:`GTA5_LABEL_IDS`, sorted (``[]``
    when every id is one)."""
    arr = np.asarray(label_ids)
    if arr.dtype == np.uint8:
        unknown = ~_GTA5_KNOWN[arr]  # a table look-up: cheap enough for every training crop
    else:
        unknown = ~np.isin(arr, GTA5_LABEL_IDS)
    if not unknown.any():
        return []
    return [int(v) for v in np.unique(arr[unknown])]


def synthia_encode_labels(label_ids: np.ndarray, num_classes: int = 16) -> np.ndarray:
    """SYNTHIA-RAND-CITYSCAPES class ids -> train ids (uint8, ignore 250); docs/METHOD.md section 1."""
    if num_classes not in SYNTHIA_IDS:
        raise ValueError(f"SYNTHIA num_classes must be 16 or 13, got {num_classes}")
    return _apply_lut(label_ids, _lookup_table(SYNTHIA_IDS[num_classes]))


def decode_train_ids(train_ids: np.ndarray, num_classes: int = 19) -> np.ndarray:
    """Train ids -> Cityscapes label ids (uint8); IGNORE_LABEL and unknown ids -> 0."""
    table = np.zeros(256, dtype=np.uint8)
    ids = CITYSCAPES_IDS[num_classes]
    table[: len(ids)] = np.asarray(ids, dtype=np.uint8)
    return table[np.asarray(train_ids, dtype=np.uint8)]


def colorize(train_ids: np.ndarray, num_classes: int = 19) -> np.ndarray:
    """Train ids [H, W] -> RGB image [H, W, 3] uint8; ignore (and unknown ids) -> black."""
    table = np.zeros((256, 3), dtype=np.uint8)
    table[:num_classes] = np.asarray(class_palette(num_classes), dtype=np.uint8)
    arr = np.asarray(train_ids)
    if arr.dtype != np.uint8:
        arr = np.where((arr >= 0) & (arr < 256), arr, IGNORE_LABEL).astype(np.uint8)
    return table[arr]


def overlay(image: np.ndarray, train_ids: np.ndarray, num_classes: int = 19, alpha: float = 0.5) -> np.ndarray:
    """The palette colours of ``train_ids`` [H, W] blended over the RGB ``image`` [H, W, 3]:
    ``(1 - alpha) * image + alpha * colour``, rounded to uint8 (:func:`colorize`'s colours)."""
    mixed = image.astype(np.float32) * (1.0 - alpha) + colorize(train_ids, num_classes).astype(np.float32) * alpha
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
