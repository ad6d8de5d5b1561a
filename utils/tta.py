"""Test-time augmentation (docs/METHOD.md section 7), written once for every array library.

:func:`combine_passes` is the rule: one pass per scale and, with flip, one more on the mirrored
image; each pass's logits are brought to the output size (and a mirrored pass's flipped back);
one plain pass gives its logits, several give the sum of their softmax. The array operations
come in as :class:`TTAOps`, so that PyTorch (``engine.validation.tta_probabilities``) and NumPy
with onnxruntime (``stages.prediction_onnx``) run the same rule. No torch import here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TTAOps:
    """The four array operations of :func:`combine_passes` (arrays are ``[N, C, H, W]``).

    Attributes:
        rescale: ``rescale(x, s)``, the input resized by the factor ``s`` (bilinear,
            ``align_corners=True``; the output size is ``floor(size * s)``, as
            ``F.interpolate(scale_factor=s)``).
        upsample: ``upsample(logits, (h, w))``, logits resized to ``(h, w)`` in float32
            (bilinear, ``align_corners=True``).
        mirror: the array flipped along the width.
        softmax: softmax over the classes (axis 1).
    """

    rescale: Callable[[Any, float], Any]
    upsample: Callable[[Any, tuple[int, int]], Any]
    mirror: Callable[[Any], Any]
    softmax: Callable[[Any], Any]


def scaled_size(hw: tuple[int, int], scale: float) -> tuple[int, int]:
    """``(floor(h * s), floor(w * s))``: the size ``F.interpolate(scale_factor=s)`` gives."""
    return math.floor(float(hw[0]) * scale), math.floor(float(hw[1]) * scale)


def combine_passes(img: Any, out_hw: tuple[int, int], forward: Callable[[Any], Any], ops: TTAOps,
                   scales: tuple[float, ...] = (1.0,), flip: bool = False,
                   plain: Callable[[Any], None] | None = None) -> Any:
    """The class scores whose argmax is the prediction of ``img`` (docs/METHOD.md section 7).

    ``forward`` maps an input batch to the network's logits (any size). One pass per scale
    (``ops.rescale``) and, with ``flip``, one more on its left-right mirror; each pass's logits
    are upsampled (``ops.upsample``) to ``out_hw`` and a mirrored pass's are flipped back along
    the width. A single plain pass returns its logits; several passes return the sum of their
    softmax. ``plain`` receives the upsampled logits of the plain pass (scale 1.0, not
    mirrored), if there is one.
    """
    total = None
    several = len(scales) > 1 or flip
    for s in scales:
        x = img if s == 1.0 else ops.rescale(img, s)
        for mirrored in (False, True) if flip else (False,):
            logits = ops.upsample(forward(ops.mirror(x) if mirrored else x), out_hw)
            if mirrored:
                logits = ops.mirror(logits)  # back along the width, so pixels line up again
            elif s == 1.0 and plain is not None:
                plain(logits)
            p = ops.softmax(logits) if several else logits
            total = p if total is None else total + p
    return total
