"""Losses the stages share."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = 250) -> Tensor:
    """Mean cross entropy over non-ignored pixels; 0 (with a graph) when every pixel is ignored.

    Same value as ``nn.CrossEntropyLoss(ignore_index=...)`` whenever one pixel is valid, without
    the NaN the original gets on an all-ignored batch, and without a host synchronisation.
    """
    total = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum")
    valid = (target != ignore_index).sum()
    return total / valid.clamp(min=1)
