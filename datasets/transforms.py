"""Joint image / label augmentation for training (docs/METHOD.md section 1, "Augmentation").

All randomness comes from the ``random.Random`` and ``torch.Generator`` passed in, so a
sample is a pure function of its key (docs/DESIGN.md, "Deterministic sampling").
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import functional as tvf


def _jitter_range(value: float, name: str, hue: bool = False) -> tuple[float, float] | None:
    """torchvision ``ColorJitter`` range of one factor; ``None`` when it is off."""
    value = float(value)
    if value < 0:
        raise ValueError(f"colour jitter {name} must be >= 0, got {value}")
    if hue:
        if value > 0.5:
            raise ValueError(f"colour jitter hue must be <= 0.5, got {value}")
        return None if value == 0 else (-value, value)
    return None if value == 0 else (max(0.0, 1.0 - value), 1.0 + value)


def pil_rgb(img: np.ndarray | Image.Image) -> Image.Image:
    """A uint8 HxWx3 array (or an RGB PIL image) as an RGB PIL image, as ``ToPILImage`` gives."""
    if isinstance(img, Image.Image):
        if img.mode != "RGB":
            raise ValueError(f"expected an RGB image, got PIL mode {img.mode}")
        return img
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"expected a uint8 HxWx3 image, got {img.dtype} {img.shape}")
    return Image.fromarray(img)


def resize_label(label: np.ndarray, size_wh: Sequence[int]) -> np.ndarray:
    """PIL ``Image.resize(size, Image.NEAREST)`` of an HxW label array (skipped if same size)."""
    w, h = int(size_wh[0]), int(size_wh[1])
    if label.shape[:2] == (h, w):
        return label
    return np.array(Image.fromarray(label).resize((w, h), Image.NEAREST))


def _vertical_first(src_wh: tuple[int, int], size_wh: tuple[int, int]) -> bool:
    """Whether Pillow may resize this vertically first: the height shrinks by more pixels
    than the width (Pillow 13 does so when it is more than twice as many; older Pillow never)."""
    (width, height), (w, h) = src_wh, size_wh
    return h < height and height - h > width - w


def _source_rows(height: int, h: int, y0: int, y1: int) -> tuple[int, int]:
    """Source rows ``[r0, r1)`` that output rows ``[y0, y1)`` of a bilinear resize of
    ``height`` rows to ``h`` read (with a margin of two rows)."""
    scale = height / h
    support = max(1.0, scale)  # the bilinear filter's reach in source rows
    return (max(0, math.floor(y0 * scale - support) - 2),
            min(height, math.ceil(y1 * scale + support) + 2))


def resize_crop(img: Image.Image, size_wh: Sequence[int], box: Sequence[int],
                src_wh: Sequence[int] | None = None) -> Image.Image:
    """``img.resize(size_wh, Image.BILINEAR).crop(box)``, bit for bit, computing only what
    the crop needs.

    PIL resizes in two passes, horizontal then vertical (except in the case noted below),
    through a uint8 image; each output pixel's filter depends only on the input and output
    sizes. The horizontal pass runs on the source rows the crop's rows read (rows are
    independent), and only the crop's columns are kept; these rows are placed at their own
    height in an image of the source's height, whose vertical resize to the full output
    height gives the crop's rows exactly (the rows left black are outside every filter
    window the crop uses). A resize box (``resize(..., box=)``) would be cheaper still, but
    PIL passes its corners as 32-bit floats, which shifts the filter positions and changes
    some pixels.

    ``src_wh``: the size of the whole source image when ``img`` holds only its top rows
    (at least :meth:`JointAugment.rows_needed` of them).
    """
    w, h = int(size_wh[0]), int(size_wh[1])
    x0, y0, x1, y1 = (int(v) for v in box)
    width, height = img.size if src_wh is None else (int(src_wh[0]), int(src_wh[1]))
    if (w, h) == (width, height):
        return img.crop((x0, y0, x1, y1))
    if _vertical_first((width, height), (w, h)):
        # Leave these to Pillow; with the aspect ratio kept, a landscape image gets here
        # only by rounding.
        return img.resize((w, h), Image.BILINEAR).crop((x0, y0, x1, y1))
    r0, r1 = _source_rows(height, h, y0, y1)
    rows = img.crop((0, r0, width, r1)).resize((w, r1 - r0), Image.BILINEAR)
    tall = Image.new(img.mode, (x1 - x0, height))
    tall.paste(rows.crop((x0, 0, x1, r1 - r0)), (0, r0))
    return tall.resize((x1 - x0, h), Image.BILINEAR).crop((0, y0, x1 - x0, y1))


def nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """The source index of each output pixel along one axis of PIL's ``Image.NEAREST``
    resize from ``n_in`` to ``n_out`` pixels, as PIL computes it (PIL resizes the indices)."""
    ramp = Image.fromarray(np.arange(n_in, dtype=np.int32)[None, :])
    return np.asarray(ramp.resize((n_out, 1), Image.NEAREST))[0]


def to_chw_tensor(img_hwc: np.ndarray) -> torch.Tensor:
    """uint8 HWC numpy image -> contiguous uint8 CHW tensor."""
    return torch.from_numpy(np.ascontiguousarray(img_hwc.transpose(2, 0, 1)))


class JointAugment:
    """Random resize, random crop, horizontal flip, then colour jitter on the crop.

    ``resize`` is the base width of the random resize (``--resize``), ``crop_wh`` the
    crop ``(W, H)`` (``--rcrop``), ``clrjit`` the ColorJitter ``(brightness, contrast,
    saturation, hue)`` (``--clrjit_params``). ``enabled=False`` (``--noaug``) keeps the
    whole image: no resize, crop or flip (colour jitter still follows ``clrjit``).

    Pixels are the original's, bit for bit: PIL's bilinear resize of the whole image then
    the crop (label: PIL's nearest), PIL's flip, then torchvision's ``ColorJitter`` on the
    PIL crop (PIL ``ImageEnhance`` and PIL's HSV hue). Only the rows and columns the crop
    needs are computed (:func:`resize_crop`).
    """

    def __init__(
        self,
        resize: int = 2200,
        crop_wh: Sequence[int] = (896, 512),
        hflip: float | bool = 0.5,
        clrjit: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
        enabled: bool = True,
    ) -> None:
        if len(crop_wh) != 2 or min(int(v) for v in crop_wh) <= 0:
            raise ValueError(f"crop_wh must be two positive ints (W, H), got {crop_wh}")
        if len(clrjit) != 4:
            raise ValueError(f"clrjit needs 4 values (b, c, s, h), got {clrjit}")
        if enabled and int(resize) <= 0:
            raise ValueError(f"resize must be positive, got {resize}")
        self.resize = int(resize)
        self.crop_wh = (int(crop_wh[0]), int(crop_wh[1]))
        # --hflip is a probability in the original (default 0.5); True/False mean 0.5/0.
        self.hflip = (0.5 if hflip else 0.0) if isinstance(hflip, bool) else float(hflip)
        self.clrjit = tuple(float(v) for v in clrjit)
        self.enabled = bool(enabled)
        names = ("brightness", "contrast", "saturation", "hue")
        self._ranges = tuple(
            _jitter_range(v, n, hue=(n == "hue")) for v, n in zip(self.clrjit, names)
        )

    def __repr__(self) -> str:
        return (
            f"JointAugment(resize={self.resize}, crop_wh={self.crop_wh}, hflip={self.hflip}, "
            f"clrjit={self.clrjit}, enabled={self.enabled})"
        )

    @property
    def jitter_enabled(self) -> bool:
        """Whether colour jitter does anything."""
        return any(r is not None for r in self._ranges)

    def sample_size(self, rng: random.Random, height: int, width: int) -> tuple[int, int]:
        """Draw the random resize ``(h, w)`` (docs/METHOD.md section 1, step 1), grown to fit the crop.

        ``w = int(uniform(0.5, 1.5) * resize)``, ``h = int(w / (W / H))``. When that is
        smaller than the crop in either dimension (the original crashes) the size is
        scaled up, keeping the aspect ratio, until the crop fits.
        """
        tw, th = self.crop_wh
        ratio = width / height
        w = int(rng.uniform(0.5, 1.5) * self.resize)
        h = int(w / ratio)
        if w < tw or h < th:
            w = max(tw, math.ceil(th * ratio))
            h = max(th, int(w / ratio))
        return h, w

    def jitter_params(self, gen: torch.Generator) -> tuple[list[int], list[float | None]]:
        """Draw ``(order, factors)`` exactly as ``ColorJitter.get_params`` does.

        A random permutation of the four operations, then one uniform factor for each
        enabled one in the order brightness, contrast, saturation, hue.
        """
        order = torch.randperm(4, generator=gen).tolist()
        factors: list[float | None] = []
        for rng_range in self._ranges:
            if rng_range is None:
                factors.append(None)
            else:
                t = torch.empty(1).uniform_(rng_range[0], rng_range[1], generator=gen)
                factors.append(float(t))
        return order, factors

    def color_jitter(self, img: np.ndarray | Image.Image, gen: torch.Generator) -> Image.Image:
        """torchvision ``ColorJitter`` on a PIL image (as ``ToPILImage()`` then ``ColorJitter``).

        Same draws as ``ColorJitter.get_params`` but from ``gen``, and the same operations
        in the drawn order: torchvision's functional brightness, contrast, saturation and
        hue on the PIL image. Returns the image itself when the jitter is off (no draw).
        """
        img = pil_rgb(img)
        if not self.jitter_enabled:
            return img
        order, factors = self.jitter_params(gen)
        ops = (tvf.adjust_brightness, tvf.adjust_contrast, tvf.adjust_saturation,
               tvf.adjust_hue)
        for i in order:
            if factors[i] is not None:
                img = ops[i](img, factors[i])
        return img

    def draw(self, rng: random.Random, height: int, width: int) -> dict[str, Any]:
        """Draw the geometry of one sample, in the original's order: uniform (resize),
        randint x, randint y, random (flip). Returns the ``params`` of :meth:`__call__`."""
        if not self.enabled:
            return {"resized_hw": (height, width), "crop_box": (0, height, 0, width), "flip": False}
        tw, th = self.crop_wh
        h, w = self.sample_size(rng, height, width)
        x1 = rng.randint(0, w - tw)
        y1 = rng.randint(0, h - th)
        flip = rng.random() < self.hflip
        return {"resized_hw": (int(h), int(w)), "crop_box": (int(y1), int(y1 + th), int(x1), int(x1 + tw)),
                "flip": bool(flip)}

    def rows_needed(self, params: dict[str, Any], height: int, width: int) -> tuple[int, int]:
        """How many top rows of the ``height`` x ``width`` image and of its label the sample
        ``params`` reads (the rest need not be decoded)."""
        h, w = params["resized_hw"]
        ys, ye, _, _ = params["crop_box"]
        if not self.enabled or (h, w) == (height, width):
            return ye, ye
        lbl_rows = int(nearest_index(height, h)[ye - 1]) + 1
        if _vertical_first((width, height), (w, h)):
            return height, lbl_rows
        return _source_rows(height, h, ys, ye)[1], lbl_rows

    def apply(
        self,
        img: np.ndarray | Image.Image,
        label: np.ndarray | None,
        params: dict[str, Any],
        torch_gen: torch.Generator,
        size_hw: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Resize, crop, flip (``params`` from :meth:`draw`) and colour-jitter one sample.

        ``size_hw``: the whole image's size when ``img`` and ``label`` hold only their top
        rows (at least :meth:`rows_needed`).
        """
        pil = pil_rgb(img)
        height, width = pil.height, pil.width
        if size_hw is not None:
            height, width = int(size_hw[0]), int(size_hw[1])
        h, w = params["resized_hw"]
        ys, ye, xs, xe = params["crop_box"]
        if not self.enabled:
            crop, crop_lbl = pil, label
        else:
            crop = resize_crop(pil, (w, h), (xs, ys, xe, ye), src_wh=(width, height))
            if label is None:
                crop_lbl = None
            elif (h, w) == (height, width):
                crop_lbl = label[ys:ye, xs:xe]
            else:  # PIL's nearest resize, for the crop's pixels only
                crop_lbl = label[nearest_index(height, h)[ys:ye]][:, nearest_index(width, w)[xs:xe]]
            if params["flip"]:
                crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
                crop_lbl = None if crop_lbl is None else crop_lbl[:, ::-1]
        out_img = to_chw_tensor(np.asarray(self.color_jitter(crop, torch_gen)))
        out_lbl = None if crop_lbl is None else torch.from_numpy(np.ascontiguousarray(crop_lbl))
        return out_img, out_lbl

    def __call__(
        self,
        img: np.ndarray | Image.Image,
        label: np.ndarray | None,
        rng: random.Random,
        torch_gen: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
        """Augment a uint8 HWC image (or an RGB PIL image) and its uint8 HW label, if any.

        Returns ``(img uint8 [3, h, w], label uint8 [h, w] or None, params)`` with
        ``params = {"resized_hw": (h, w), "crop_box": (ys, ye, xs, xe), "flip": bool}``.
        Draws from ``rng`` in the original's order: uniform (resize), randint x, randint y,
        random (flip); then the colour jitter from ``torch_gen``.
        """
        pil = pil_rgb(img)
        if label is not None and label.shape[:2] != (pil.height, pil.width):
            raise ValueError(f"label shape {label.shape} does not match image {pil.height}x{pil.width}")
        params = self.draw(rng, pil.height, pil.width)
        out_img, out_lbl = self.apply(pil, label, params, torch_gen)
        return out_img, out_lbl, params
