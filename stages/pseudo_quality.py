"""How good are the pseudo labels? Their agreement with the target ground truth (monitoring only).

DecoupleNet trains its target side on pseudo labels: in phase 1 the aux classifier learns
the online-thresholded predictions at output stride 8, in phase 2 the network learns the
fused labels of each crop. When the target training images have ground truth (Cityscapes
``gtFine/train``) this module measures those labels against it. **The ground truth is read
only for these numbers; it never reaches a loss** (``--no_pseudo_eval`` stops reading it).

Definitions (per iteration, pooled over the micro-batches and the ranks):

* a pixel is **scored** when its pseudo label is kept (not the ignore label) and its ground
  truth is a training class (not ignored);
* ``pseudo_acc`` = scored pixels whose pseudo label equals the ground truth / scored pixels;
* per class ``c``: **precision** = correct pixels labelled ``c`` / scored pixels labelled
  ``c``; **kept fraction** = kept pixels of ground-truth class ``c`` / all pixels of
  ground-truth class ``c``.

Ranks are combined by summing the counts (never by averaging fractions). The counts are one
sync-free histogram per micro-batch on the training device; the loop all-reduces them in one
tensor with the iteration's losses and reads both back in one transfer.

Phase 1's pseudo labels live on the stride-8 logit grid. Logit ``i`` (of ``n`` along an
axis of ``N`` pixels) is the value the network's ``align_corners=True`` upsampling places
exactly at pixel coordinate ``i * (N - 1) / (n - 1)`` (``0`` when ``n == 1``); the ground
truth for it is the pixel nearest to that coordinate (:func:`logit_positions`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from datasets.labels import class_names
from utils import distributed as du

# The text shown wherever the numbers are logged.
MONITOR_NOTE = ("target ground truth is read only to measure pseudo-label accuracy; it never reaches a loss "
                "(--no_pseudo_eval turns it off)")


def logit_positions(pixels: int, logits: int) -> list[int]:
    """Pixel index nearest to each logit of an ``align_corners=True`` grid (see the module doc).

    ``pixels``: size ``N`` of the image axis; ``logits``: size ``n`` of the logit axis.
    Rounds half up: ``floor(i * (N - 1) / (n - 1) + 0.5)``, computed exactly in integers.
    """
    if pixels < 1 or logits < 1:
        raise ValueError(f"sizes must be positive, got pixels={pixels}, logits={logits}")
    if logits == 1:
        return [0]
    span, steps = pixels - 1, logits - 1
    return [(2 * i * span + steps) // (2 * steps) for i in range(logits)]


_GRIDS: dict[tuple, tuple[Tensor, Tensor]] = {}


def ground_truth_at_logits(gt: Tensor, logits_hw: Sequence[int]) -> Tensor:
    """``gt`` ``[..., H, W]`` sampled nearest-neighbour at the logit positions: ``[..., h, w]``."""
    key = (int(gt.shape[-2]), int(gt.shape[-1]), int(logits_hw[0]), int(logits_hw[1]), gt.device)
    if key not in _GRIDS:  # one pair of index tensors per crop size and device (training crops: one)
        _GRIDS[key] = (torch.tensor(logit_positions(key[0], key[2]), dtype=torch.int64, device=gt.device),
                       torch.tensor(logit_positions(key[1], key[3]), dtype=torch.int64, device=gt.device))
    rows, cols = _GRIDS[key]
    return gt.index_select(-2, rows).index_select(-1, cols)


def pseudo_label_counts(pseudo: Tensor, gt: Tensor, num_classes: int, ignore_label: int = 250) -> Tensor:
    """Joint counts of pseudo labels and ground truth: int64 ``[C * C + C]`` on ``pseudo``'s device.

    The first ``C * C`` entries are the confusion matrix of the scored pixels (row = pseudo
    label, column = ground truth); the last ``C`` count, per ground-truth class, the pixels
    whose pseudo label was *not* kept. Pixels whose ground truth is not in ``[0, C)`` (the
    ignore label) are not counted. No host synchronisation.
    """
    if pseudo.shape != gt.shape:
        raise ValueError(f"pseudo labels {tuple(pseudo.shape)} and ground truth {tuple(gt.shape)} differ in shape")
    c = int(num_classes)
    p = pseudo.reshape(-1).to(torch.int64)
    g = gt.reshape(-1).to(device=p.device, dtype=torch.int64)
    gt_ok = (g >= 0) & (g < c)
    kept = (p != ignore_label) & (p >= 0) & (p < c)
    discard = c * c + c
    key = torch.where(kept, p * c + g, c * c + g)
    key = torch.where(gt_ok, key, discard)
    out = torch.zeros(discard + 1, dtype=torch.int64, device=p.device)
    out.index_add_(0, key, torch.ones(1, dtype=torch.int64, device=p.device).expand(key.numel()))
    return out[:discard]


def summarize(counts: np.ndarray, num_classes: int) -> dict[str, Any]:
    """Accuracy, per-class precision and kept fraction from :func:`pseudo_label_counts` totals.

    Returns ``{"acc", "scored", "precision", "kept_fraction"}``; ``acc`` is None when no pixel
    was scored, per-class values are NaN where their denominator is 0.
    """
    c = int(num_classes)
    counts = np.asarray(counts, dtype=np.int64)
    confusion = counts[: c * c].reshape(c, c)
    dropped = counts[c * c:]
    labelled = confusion.sum(axis=1)
    correct = np.diagonal(confusion)
    kept_by_gt = confusion.sum(axis=0)
    gt_total = kept_by_gt + dropped
    scored = int(labelled.sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(labelled > 0, correct / np.maximum(labelled, 1), np.nan)
        kept_fraction = np.where(gt_total > 0, kept_by_gt / np.maximum(gt_total, 1), np.nan)
    return {"acc": (int(correct.sum()) / scored) if scored else None, "scored": scored,
            "precision": precision, "kept_fraction": kept_fraction}


class PseudoLabelMonitor:
    """Per-iteration pseudo-label accuracy of one training run (every rank holds one).

    ``observe`` adds a micro-batch's counts on the device; ``take`` hands them over (the
    training loop sums them over the ranks with its losses) and ``record`` books the totals,
    returning the ``metrics.jsonl`` entries (``collect`` does both with its own all-reduce);
    ``console_text`` / ``tensorboard`` report the totals since their previous call.
    """

    def __init__(self, num_classes: int, ignore_label: int, device: torch.device,
                 class_names: Sequence[str]) -> None:
        self.num_classes = int(num_classes)
        self.ignore_label = int(ignore_label)
        self.class_names = list(class_names)
        self.size = self.num_classes * self.num_classes + self.num_classes
        self.device = device
        self.counts = torch.zeros(self.size, dtype=torch.int64, device=device)
        self._console = np.zeros(self.size, dtype=np.int64)
        self._console_iters = 0
        self._board = np.zeros(self.size, dtype=np.int64)
        self._board_iters = 0
        self._noted = False

    def observe(self, pseudo: Tensor, gt: Tensor) -> None:
        """Count a micro-batch: pseudo labels and the ground truth at the same positions."""
        self.counts += pseudo_label_counts(pseudo.detach(), gt, self.num_classes, self.ignore_label)

    def observe_stride8(self, pseudo: Tensor, gt: Tensor) -> None:
        """Phase 1: ``pseudo`` ``[N, h, w]`` on the logit grid, ``gt`` ``[N, H, W]`` of the crop."""
        self.observe(pseudo, ground_truth_at_logits(gt.to(pseudo.device, non_blocking=True), pseudo.shape[-2:]))

    def take(self) -> Tensor:
        """This rank's counts since the previous call, on the device (a copy), and reset them.

        The training loop all-reduces them together with the losses and reads both back in one
        transfer (:meth:`engine.trainer.Trainer.train_step`), then hands the totals to :meth:`record`.
        """
        counts = self.counts.clone()
        self.counts.zero_()
        return counts

    def record(self, totals: np.ndarray) -> dict[str, float | int | None]:
        """Add one iteration's counts summed over the ranks (host int64 ``[C * C + C]``); the
        ``metrics.jsonl`` entries ``pseudo_acc`` (None when no pixel was scored) and
        ``pseudo_acc_pixels`` (the scored pixels, all ranks)."""
        host = np.asarray(totals, dtype=np.int64)
        self._console += host
        self._console_iters += 1
        self._board += host
        self._board_iters += 1
        s = summarize(host, self.num_classes)
        return {"pseudo_acc": s["acc"], "pseudo_acc_pixels": s["scored"]}

    def collect(self) -> dict[str, float | int | None]:
        """:meth:`take`, sum over the ranks (a collective), :meth:`record`: on its own, one
        all-reduce and one host transfer."""
        counts = du.all_reduce_sum(self.take(), self.device)
        return self.record(counts.cpu().numpy())

    def console_text(self) -> str:
        """``pseudo_acc = x`` pooled over the iterations since the previous call (then reset)."""
        s = summarize(self._console, self.num_classes)
        n = self._console_iters
        self._console[:] = 0
        self._console_iters = 0
        acc = "n/a" if s["acc"] is None else f"{s['acc']:.5f}"
        return f"pseudo_acc = {acc} (vs ground truth, pooled over {n} it)"

    def tensorboard(self, writer: Any, it: int) -> None:
        """Pooled since the previous call: ``pseudo/acc``, ``pseudo_precision/<class>``,
        ``pseudo_kept/<class>`` (kept fraction of the pixels of each ground-truth class)."""
        if not self._noted:
            writer.add_text("pseudo/note", MONITOR_NOTE, it)
            self._noted = True
        s = summarize(self._board, self.num_classes)
        self._board[:] = 0
        self._board_iters = 0
        if s["acc"] is not None:
            writer.add_scalar("pseudo/acc", s["acc"], it)
        for name, prec, kept in zip(self.class_names, s["precision"], s["kept_fraction"], strict=True):
            if math.isfinite(prec):
                writer.add_scalar(f"pseudo_precision/{name}", float(prec), it)
            if math.isfinite(kept):
                writer.add_scalar(f"pseudo_kept/{name}", float(kept), it)


def all_ranks_agree(flag: bool, env: du.DistEnv) -> bool:
    """True when ``flag`` is true on every rank (one small all-reduce; run at start-up only)."""
    count = torch.tensor([1 if flag else 0], dtype=torch.int64, device=env.device)
    du.all_reduce_sum(count, env.device)
    return int(count.item()) == env.world_size


def make_monitor(dataset: Any, num_classes: int, ignore_label: int, env: du.DistEnv, log: Any,
                 no_pseudo_eval: bool = False) -> PseudoLabelMonitor | None:
    """A monitor when every rank's target training set carries ground truth, else None (also
    with ``--no_pseudo_eval``).

    ``dataset.has_labels`` says whether the set found a label for every image (all or
    nothing); the ranks agree on it (one small all-reduce at start-up) so that ``collect``
    runs on all of them or on none.
    """
    if no_pseudo_eval:
        log.info("--no_pseudo_eval: target ground truth not read; no pseudo-label accuracy")
        return None
    if not all_ranks_agree(bool(getattr(dataset, "has_labels", False)), env):
        missing = getattr(dataset, "labels_missing", None)
        detail = f" ({missing} of {len(dataset)} train images have no gtFine label)" if missing else ""
        log.info("target ground truth not found for every train image%s: no pseudo-label accuracy", detail)
        return None

    log.info("pseudo_acc: %s", MONITOR_NOTE)
    return PseudoLabelMonitor(num_classes, ignore_label, env.device, class_names(num_classes))
