"""Joint image / label augmentation for training (SPEC section 1, "Augmentation").

All randomness comes from the ``random.Random`` and ``torch.Generator`` passed in, so a
sample is a pure function of its key (docs/DESIGN.md, "Deterministic sampling").
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import torch


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


def _blend_u8(img: np.ndarray, other: np.ndarray | float, ratio: float) -> np.ndarray:
    """torchvision's uint8 ``_blend``: ``ratio * img + (1 - ratio) * other``, clamped,
    truncated to uint8 (computed in float32 as torch does)."""
    out = img.astype(np.float32) * np.float32(ratio)
    if not (isinstance(other, float) and other == 0.0):
        out += np.float32(1.0 - ratio) * np.asarray(other, dtype=np.float32)
    np.clip(out, 0.0, 255.0, out=out)
    return out.astype(np.uint8)


def _grey_u8(img: np.ndarray) -> np.ndarray:
    """torchvision ``rgb_to_grayscale`` of a uint8 HWC image, as uint8 [H, W, 1]."""
    f = img.astype(np.float32)
    grey = np.float32(0.2989) * f[..., 0] + np.float32(0.587) * f[..., 1]
    grey += np.float32(0.114) * f[..., 2]
    return grey.astype(np.uint8)[..., None]


def _hue_u8(img: np.ndarray, factor: float) -> np.ndarray:
    """Hue rotation of a uint8 HWC RGB image by ``factor`` turns (OpenCV float HSV)."""
    f = img.astype(np.float32) / np.float32(255.0)
    hsv = cv2.cvtColor(f, cv2.COLOR_RGB2HSV)  # H in degrees [0, 360)
    hue = hsv[..., 0] / np.float32(360.0) + np.float32(factor)
    hsv[..., 0] = np.mod(hue, np.float32(1.0)) * np.float32(360.0)
    rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    # torchvision's float -> uint8 conversion: multiply by 256 - 1e-3 and truncate.
    rgb *= np.float32(255.999)
    np.clip(rgb, 0.0, 255.0, out=rgb)
    return rgb.astype(np.uint8)


def to_chw_tensor(img_hwc: np.ndarray) -> torch.Tensor:
    """uint8 HWC numpy image -> contiguous uint8 CHW tensor."""
    return torch.from_numpy(np.ascontiguousarray(img_hwc.transpose(2, 0, 1)))


class JointAugment:
    """Random resize, random crop, horizontal flip, then colour jitter on the crop.

    ``resize`` is the base width of the random resize (``--resize``), ``crop_wh`` the
    crop ``(W, H)`` (``--rcrop``), ``clrjit`` the ColorJitter ``(brightness, contrast,
    saturation, hue)`` (``--clrjit_params``). ``enabled=False`` (``--noaug``) keeps the
    whole image: no resize, crop or flip (colour jitter still follows ``clrjit``).
    Colour jitter runs on NumPy / OpenCV by default (:meth:`color_jitter_hwc`, about
    20x faster); ``exact_jitter=True`` uses torchvision's tensor functions instead
    (:meth:`color_jitter`). Both draw the same factors from the torch generator.
    """

    def __init__(
        self,
        resize: int = 2200,
        crop_wh: Sequence[int] = (896, 512),
        hflip: float | bool = 0.5,
        clrjit: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
        enabled: bool = True,
        exact_jitter: bool = False,
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
        self.exact_jitter = bool(exact_jitter)
        names = ("brightness", "contrast", "saturation", "hue")
        self._ranges = tuple(
            _jitter_range(v, n, hue=(n == "hue")) for v, n in zip(self.clrjit, names)
        )

    def __repr__(self) -> str:
        return (
            f"JointAugment(resize={self.resize}, crop_wh={self.crop_wh}, hflip={self.hflip}, "
            f"clrjit={self.clrjit}, enabled={self.enabled}, "
            f"exact_jitter={self.exact_jitter})"
        )

    @property
    def jitter_enabled(self) -> bool:
        """Whether colour jitter does anything."""
        return any(r is not None for r in self._ranges)

    def sample_size(self, rng: random.Random, height: int, width: int) -> tuple[int, int]:
        """Draw the random resize ``(h, w)`` (SPEC section 1, step 1), grown to fit the crop.

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

    def color_jitter_hwc(self, img: np.ndarray, gen: torch.Generator) -> np.ndarray:
        """Colour jitter of a uint8 HWC image with NumPy / OpenCV (the fast path).

        Same draws and same operations as torchvision's ``ColorJitter`` on uint8
        tensors (brightness, contrast and saturation are the same float32 blends,
        truncated to uint8 after each step; hue goes through OpenCV's float HSV), about
        30 times faster on the CPU; pixels may differ from torchvision's by a grey level
        or two where rounding falls differently.
        """
        if not self.jitter_enabled:
            return img
        order, factors = self.jitter_params(gen)
        out = np.ascontiguousarray(img)
        for i in order:
            f = factors[i]
            if f is None:
                continue
            if i == 0:
                out = _blend_u8(out, 0.0, f)
            elif i == 1:
                mean = float(_grey_u8(out).astype(np.float32).mean(dtype=np.float32))
                out = _blend_u8(out, mean, f)
            elif i == 2:
                out = _blend_u8(out, _grey_u8(out), f)
            else:
                out = _hue_u8(out, f)
        return out

    def color_jitter(self, img: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """torchvision ``ColorJitter`` on a uint8 [3, h, w] tensor, drawing from ``gen``.

        Same draws as ``ColorJitter.get_params``: a random permutation of the four
        operations, then one uniform factor for each enabled one in the order
        brightness, contrast, saturation, hue; the operations run in permuted order.
        Uses ``torchvision.transforms.functional`` (as ``ColorJitter`` does): its tensor
        saturation rounds differently from the v2 kernels by up to one grey level.
        """
        if not self.jitter_enabled:
            return img
        from torchvision.transforms import functional as tvf

        order, factors = self.jitter_params(gen)
        ops = (tvf.adjust_brightness, tvf.adjust_contrast, tvf.adjust_saturation,
               tvf.adjust_hue)
        for i in order:
            if factors[i] is not None:
                img = ops[i](img, factors[i])
        return img.contiguous()

    def __call__(
        self,
        img: np.ndarray,
        label: np.ndarray | None,
        rng: random.Random,
        torch_gen: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
        """Augment a uint8 HWC image (and its uint8 HW label, if any).

        Returns ``(img uint8 [3, h, w], label uint8 [h, w] or None, params)`` with
        ``params = {"resized_hw": (h, w), "crop_box": (ys, ye, xs, xe), "flip": bool}``.
        Draws from ``rng`` in SPEC order: uniform (resize), randint x, randint y,
        random (flip, only when ``hflip``).
        """
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(f"expected a uint8 HxWx3 image, got {img.dtype} {img.shape}")
        height, width = img.shape[:2]
        if label is not None and label.shape[:2] != (height, width):
            raise ValueError(f"label shape {label.shape} does not match image {img.shape}")
        if not self.enabled:
            h, w = height, width
            ys, ye, xs, xe = 0, height, 0, width
            flip = False
            crop_img, crop_lbl = img, label
        else:
            tw, th = self.crop_wh
            h, w = self.sample_size(rng, height, width)
            x1 = rng.randint(0, w - tw)
            y1 = rng.randint(0, h - th)
            ys, ye, xs, xe = y1, y1 + th, x1, x1 + tw
            flip = rng.random() < self.hflip
            if (h, w) != (height, width):
                img = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
                if label is not None:
                    # INTER_NEAREST_EXACT picks the same pixels as PIL's NEAREST.
                    label = cv2.resize(label, (w, h), interpolation=cv2.INTER_NEAREST_EXACT)
            crop_img = img[ys:ye, xs:xe]
            crop_lbl = None if label is None else label[ys:ye, xs:xe]
            if flip:
                crop_img = crop_img[:, ::-1]
                crop_lbl = None if crop_lbl is None else crop_lbl[:, ::-1]
        if self.exact_jitter:
            out_img = self.color_jitter(to_chw_tensor(crop_img), torch_gen)
        else:
            out_img = to_chw_tensor(self.color_jitter_hwc(crop_img, torch_gen))
        out_lbl = None if crop_lbl is None else torch.from_numpy(np.ascontiguousarray(crop_lbl))
        params = {
            "resized_hw": (int(h), int(w)),
            "crop_box": (int(ys), int(ye), int(xs), int(xe)),
            "flip": bool(flip),
        }
        return out_img, out_lbl, params
