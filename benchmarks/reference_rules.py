"""Faithful, slow re-implementations of the original DecoupleNet rules.

These functions mirror what the original code does with plain Python lists and full
sorts. They exist only as a yardstick: the benchmarks time them against our
implementations and the tests cross-check our results against them. Do not use them in
training.

* :func:`reference_update`: the phase-1 class-wise confidence banks (docs/METHOD.md section 3).
* :func:`original_get_thresholds`: the offline class thresholds (docs/METHOD.md section 5).
* :class:`OriginalLoader`: the original's per-sample data-loader work (GTA5 and Cityscapes
  training samples), the yardstick of ``benchmarks/bench_data.py``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch


def reference_update(
    conf_bank: dict[int, list[float]],
    thresholds: np.ndarray,
    conf: torch.Tensor | np.ndarray,
    pred: torch.Tensor | np.ndarray,
    p: float,
    bank_length: int,
) -> np.ndarray:
    """Update the per-class confidence banks like the original (docs/METHOD.md section 3).

    For every class ``c`` present in ``pred``: the confidences of the pixels predicted
    ``c`` (row-major order) are appended to ``conf_bank[c]``, then
    ``thresholds[c] = sorted(conf_bank[c], reverse=True)[int(len(conf_bank[c]) * p)]``,
    then only the newest ``bank_length`` values are kept. Absent classes keep their
    threshold. ``conf_bank`` and ``thresholds`` are modified in place; ``thresholds`` is
    also returned.
    """
    import torch  # imported here so that the offline benchmark's child stays torch-free

    conf_t = torch.as_tensor(conf)
    pred_t = torch.as_tensor(pred)
    for c in range(len(thresholds)):
        mask = pred_t == c
        if int(mask.sum()) == 0:
            continue
        bank = conf_bank.setdefault(c, [])
        bank.extend(conf_t[mask].float().cpu().tolist())
        thresholds[c] = sorted(bank, reverse=True)[int(len(bank) * p)]
        conf_bank[c] = bank[-bank_length:]
    return thresholds


def original_get_thresholds(folder: str, p: float, num_classes: int = 19) -> np.ndarray:
    """The original ``datasets/get_thresholds.py`` rule, operation for operation (docs/METHOD.md section 5).

    Per file: ``scipy.special.softmax`` over the classes, ``argmax`` and ``max``; for each
    class present (``np.unique``), the list of that class is extended with the *NumPy float32
    scalars* of its pixels (``list.extend(prob[classes == c])``, as the original: one Python
    object per pixel, so memory grows with the number of files); every list is sorted in
    place, descending; ``thr[c] = pool_c[int(p * len(pool_c))]``. One deliberate difference:
    float16 files are converted to float32 before the softmax (the original would compute
    the softmax in float16); for float32 files the computation is the original's. Raises
    ``KeyError`` when a class never wins (the original crashes there too).
    """
    from scipy.special import softmax  # the original's softmax

    cls2prob: dict[int, list] = {}
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".npy"):
            continue
        f = np.load(os.path.join(folder, name))
        f = softmax(f.astype(np.float32, copy=False), axis=0)
        classes = f.argmax(0)
        prob = f.max(0)
        for c in np.unique(classes):
            cls2prob.setdefault(int(c), []).extend(prob[classes == c])
    for pool in cls2prob.values():
        pool.sort(reverse=True)
    # np.array of the pools' float32 scalars: float32, the dtype the original saves
    return np.array([cls2prob[c][int(p * len(cls2prob[c]))] for c in range(num_classes)])


# ---- the original's data loaders (cost yardstick of benchmarks/bench_data.py) -------------

# Label ids the original's GTA5 loader sets to 250, then the 19 it maps to train ids 0..18.
_VOID_IDS = (0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30, 34, -1)
_VALID_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)


class OriginalLoader:
    """The work the original does for one training sample, operation for operation.

    Written from the original's loaders (``GTA5_loader`` / ``Cityscapes_train_loader``
    ``__getitem__``, their joint augmentation and ``transform``), to time it: PIL decoding
    and resizes (the no-op resize to the stored size is a PIL copy), the per-id label
    loops on the whole label, random resize / crop / flip of PIL images, the FixMatch
    ``RandAugmentMC(2, 10)`` "strong" image that training never uses, its float64
    conversion, ``ToPILImage`` + ``ColorJitter`` on the crop, the float64 conversions and
    ``np.unique`` label checks of ``transform``; for Cityscapes also the whole image as
    float64 (``img_full``), the zero label the original makes when no pseudo label exists,
    and in phase 2 the soft label upsampled (bilinear, align_corners) to the whole image,
    resized to the random size, cropped and flipped inside the worker. Draws come from
    the ``random.Random`` / NumPy generator / torch generator passed in (the original uses
    the global ones: the same cost).
    """

    def __init__(self, resize: int = 2200, crop_wh: tuple[int, int] = (896, 512), hflip: float = 0.5,
                 clrjit: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0), seed: int = 0) -> None:
        import random

        import torch
        from torchvision.transforms import ColorJitter

        self.resize, self.crop_wh, self.hflip = resize, crop_wh, hflip
        self.jitter = ColorJitter(*clrjit)
        self.rng = random.Random(seed)
        self.np_rng = np.random.RandomState(seed)
        self.torch_gen = torch.Generator().manual_seed(seed)
        self.class_map = dict(zip(_VALID_IDS, range(19)))

    # -- pieces ---------------------------------------------------------------------------

    def _augment(self, img: np.ndarray, mask: np.ndarray, lpsoft: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray, Any, dict]:
        """Joint random resize, crop and flip of PIL images (and the soft label tensor)."""
        import torch
        import torch.nn.functional as F
        from PIL import Image

        img = Image.fromarray(img, mode="RGB")
        mask = Image.fromarray(mask, mode="L")
        if lpsoft is not None:
            lpsoft = F.interpolate(torch.from_numpy(lpsoft)[None], size=[img.size[1], img.size[0]],
                                   mode="bilinear", align_corners=True)[0]
        prop = img.size[0] / img.size[1]
        w = int(self.rng.uniform(0.5, 1.5) * self.resize)
        h = int(w / prop)
        img, mask = img.resize((w, h), Image.BILINEAR), mask.resize((w, h), Image.NEAREST)
        if lpsoft is not None:
            lpsoft = F.interpolate(lpsoft[None], size=[h, w], mode="bilinear", align_corners=True)[0]
        tw, th = self.crop_wh
        x1, y1 = self.rng.randint(0, w - tw), self.rng.randint(0, h - th)
        if lpsoft is not None:
            lpsoft = lpsoft[:, y1:y1 + th, x1:x1 + tw]
        img, mask = img.crop((x1, y1, x1 + tw, y1 + th)), mask.crop((x1, y1, x1 + tw, y1 + th))
        if self.rng.random() < self.hflip:
            if lpsoft is not None:
                lpsoft = lpsoft.index_select(2, torch.arange(lpsoft.size(2) - 1, -1, -1).long())
            img, mask = img.transpose(Image.FLIP_LEFT_RIGHT), mask.transpose(Image.FLIP_LEFT_RIGHT)
        return np.array(img), np.array(mask, dtype=np.uint8), lpsoft, {"RandomSized": (h, w)}

    def _strong(self, img: Any) -> Any:
        """FixMatch RandAugmentMC(n=2, m=10): flip with p 0.5, two ops from the FixMatch pool
        (each applied with p 0.5, magnitude drawn in [1, 10)), then a grey cutout of a third
        of the short side."""
        import PIL.ImageDraw
        import PIL.ImageEnhance
        import PIL.ImageOps
        from PIL import Image

        grey = (127, 127, 127)

        def affine(im: Any, coeffs: tuple) -> Any:
            return im.transform(im.size, Image.AFFINE, coeffs, resample=Image.BILINEAR, fillcolor=grey)

        def signed(v: float) -> float:
            return -v if self.rng.random() < 0.5 else v

        pool = [
            lambda im, v: PIL.ImageOps.autocontrast(im),
            lambda im, v: PIL.ImageEnhance.Brightness(im).enhance(v * 0.9 / 10 + 0.05),
            lambda im, v: PIL.ImageEnhance.Color(im).enhance(v * 0.9 / 10 + 0.05),
            lambda im, v: PIL.ImageEnhance.Contrast(im).enhance(v * 0.9 / 10 + 0.05),
            lambda im, v: PIL.ImageOps.equalize(im),
            lambda im, v: im,
            lambda im, v: PIL.ImageOps.posterize(im, int(v * 4 / 10) + 4),
            lambda im, v: im.rotate(signed(int(v * 30 / 10)), resample=Image.BILINEAR, fillcolor=grey),
            lambda im, v: PIL.ImageEnhance.Sharpness(im).enhance(v * 0.9 / 10 + 0.05),
            lambda im, v: affine(im, (1, signed(v * 0.3 / 10), 0, 0, 1, 0)),
            lambda im, v: affine(im, (1, 0, 0, signed(v * 0.3 / 10), 1, 0)),
            lambda im, v: PIL.ImageOps.solarize(im, 256 - int(v * 256 / 10)),
            lambda im, v: affine(im, (1, 0, int(signed(v * 0.3 / 10) * im.size[0]), 0, 1, 0)),
            lambda im, v: affine(im, (1, 0, 0, 0, 1, int(signed(v * 0.3 / 10) * im.size[1]))),
        ]
        if self.rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        for op in self.rng.choices(pool, k=2):
            v = self.np_rng.randint(1, 10)
            if self.rng.random() < 0.5:
                img = op(img, v)
        w, h = img.size
        cut = min(w, h) // 3
        x0 = int(max(0, self.np_rng.uniform(0, w) - cut / 2.0))
        y0 = int(max(0, self.np_rng.uniform(0, h) - cut / 2.0))
        img = img.copy()
        PIL.ImageDraw.Draw(img).rectangle((x0, y0, int(min(w, x0 + cut)), int(min(h, y0 + cut))), grey)
        return img

    @staticmethod
    def _transform(img: Any, lbl: np.ndarray) -> tuple[Any, Any]:
        """The loaders' ``transform``: float64 image / 255 (CHW), label checks with np.unique."""
        import torch

        img = np.array(img).astype(np.float64)
        img -= np.zeros(3)
        img = img.astype(float) / 255.0
        img = img.transpose(2, 0, 1)
        classes = np.unique(lbl)
        lbl = np.array(lbl).astype(float).astype(int)
        if not np.all(classes == np.unique(lbl)):
            raise AssertionError("label changed")
        if not np.all(np.unique(lbl[lbl != 250]) < 19):
            raise ValueError("Segmentation map contained invalid class values")
        return torch.from_numpy(img).float(), torch.from_numpy(lbl).long()

    def _jitter(self, img: np.ndarray) -> Any:
        """``Compose([ToPILImage(), ColorJitter(...)])``; draws from the loader's generator."""
        import torch
        from torchvision.transforms import ToPILImage

        state = torch.get_rng_state()
        torch.set_rng_state(self.torch_gen.get_state())
        try:
            out = self.jitter(ToPILImage()(img))
        finally:
            self.torch_gen.set_state(torch.get_rng_state())
            torch.set_rng_state(state)
        return out

    # -- samples --------------------------------------------------------------------------

    def gta5(self, img_path: str, lbl_path: str, size: tuple[int, int] = (1914, 1052)) -> dict:
        """One GTA5 training sample."""
        from PIL import Image

        img = Image.open(img_path).resize(size, Image.BILINEAR)
        lbl = Image.open(lbl_path).resize(size, Image.NEAREST)
        img, lbl = np.asarray(img, dtype=np.uint8), np.asarray(lbl, dtype=np.uint8)
        lbl = np.array(lbl, dtype=np.uint8)
        for i in _VOID_IDS:
            lbl[lbl == i] = 250
        for i in _VALID_IDS:
            lbl[lbl == i] = self.class_map[i]
        img, lbl, _, params = self._augment(img, lbl)
        out = {"img_strong": self._transform(self._strong(Image.fromarray(img)), lbl)[0], "params": params}
        out["img"], out["label"] = self._transform(self._jitter(img), lbl)
        return out

    def cityscapes(self, img_path: str, soft_path: str | None = None,
                   size: tuple[int, int] = (2048, 1024)) -> dict:
        """One Cityscapes training sample (phase 2: with the soft label at ``soft_path``)."""
        import torch
        from PIL import Image

        img = Image.open(img_path)
        lbl = Image.fromarray(np.zeros(img.size[:2]))  # no pseudo label file: zeros, as the original
        img, lbl = img.resize(size, Image.BILINEAR), lbl.resize(size, Image.NEAREST)
        img, lbl = np.array(img, dtype=np.uint8), np.array(lbl, dtype=np.uint8)
        img_full = img.copy().astype(np.float64)
        img_full -= np.zeros(3)
        img_full = (img_full.astype(float) / 255.0).transpose(2, 0, 1)
        lbl_full = lbl.copy()
        lpsoft = None if soft_path is None else np.load(soft_path)
        img, lbl, lpsoft, params = self._augment(img, lbl, lpsoft)
        out = {"img_strong": self._transform(self._strong(Image.fromarray(img)), lbl)[0], "params": params}
        out["img"], out["label"] = self._transform(self._jitter(img), lbl)
        out["img_full"] = torch.from_numpy(img_full).float()
        out["lbl_full"] = torch.from_numpy(lbl_full).long()
        if lpsoft is not None:
            out["lpsoft"] = lpsoft
        return out
