"""Phase-1 online class thresholds from class-wise confidence banks (docs/METHOD.md section 3).

The original keeps one Python list of confidences per class, appends the confidences of
the pixels predicted as that class, takes
``thr[c] = sorted(bank_c, descending)[int(len(bank_c) * p)]`` and then keeps only the
newest ``conf_bank_length`` values, all on the host with a full sort per class per
iteration. :class:`OnlineClassThresholds` gives exactly the same thresholds, but keeps
the banks on the training device and never synchronises with the host.

How it works (all tensors of fixed shape, no data-dependent Python control flow):

* Each confidence (float32) is mapped to an order-preserving 32-bit integer key; the
  key's high 16 bits pick a level-1 bin, its low 16 bits a level-2 bin.
* Each bank is a ring buffer of ``bank_length`` slots per class, stored as the two key
  halves (``-1`` marks an empty slot), plus a fill count and a write head per class. A
  level-1 histogram ``[C, 65536]`` of the stored keys is kept up to date incrementally.
* An update adds the new keys to a copy of the level-1 histogram, finds by cumulative
  sum and ``searchsorted`` the bin holding the wanted rank, builds a level-2 histogram
  of only the keys inside that bin (bank + new values), and reads the exact key off it
  (a two-level radix select). This is the value at index ``int(len * p)`` of the
  descending sort of bank + new values, as the original.
* Then the new values are written into the ring (only the newest ``bank_length`` per
  class when more arrive at once), evicting the oldest, and the histogram is adjusted.
"""

from __future__ import annotations

import torch
from torch import Tensor

_BINS = 1 << 16  # bins per class at each of the two radix levels
_HALF = 1 << 15  # offset that maps the signed high half of a key to [0, 65536)


def _float_to_key(x: Tensor) -> Tensor:
    """Map float32 values to int32 keys with the same order (for non-NaN values)."""
    bits = x.contiguous().view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _key_to_float(key: Tensor) -> Tensor:
    """Inverse of :func:`_float_to_key`."""
    bits = key ^ ((key >> 31) & 0x7FFFFFFF)
    return bits.view(torch.float32)


def _split_key(key: Tensor) -> tuple[Tensor, Tensor]:
    """Level-1 bin (high half, in [0, 65536)) and level-2 bin (low half) of int32 keys."""
    return (key >> 16) + _HALF, key & 0xFFFF


def _join_key(hi: Tensor, lo: Tensor) -> Tensor:
    """Inverse of :func:`_split_key` (int32 keys)."""
    return (((hi - _HALF) << 16) | lo).to(torch.int32)


def _add_counts(hist: Tensor, index: Tensor, weight: int = 1) -> Tensor:
    """Add ``weight`` at every ``index`` of the flat ``hist`` in place (no host sync on CUDA)."""
    src = torch.full((1,), weight, dtype=hist.dtype, device=hist.device).expand(index.numel())
    return hist.index_add_(0, index.reshape(-1), src)


class OnlineClassThresholds:
    """Class-wise confidence banks and thresholds of phase 1 (docs/METHOD.md section 3).

    Args:
        num_classes: number of classes ``C``.
        p: the rank fraction ``--conf_p`` (0 <= p < 1); the threshold of class ``c`` is
            the value at index ``int(len(bank_c) * p)`` of the bank sorted descending.
        bank_length: ``--conf_bank_length``, the number of newest values kept per class.
        device: where the banks live; should be the training device.

    The thresholds start at 0. :meth:`update` needs no host synchronisation.
    """

    def __init__(
        self,
        num_classes: int,
        p: float = 0.8,
        bank_length: int = 100000,
        device: str | torch.device = "cpu",
    ) -> None:
        if not 0.0 <= p < 1.0:
            raise ValueError(f"p must be in [0, 1), got {p}")
        if bank_length < 1:
            raise ValueError(f"bank_length must be positive, got {bank_length}")
        if not 1 <= num_classes < _HALF:
            raise ValueError(f"num_classes must be in [1, {_HALF}), got {num_classes}")
        self.num_classes = int(num_classes)
        self.p = float(p)
        self.bank_length = int(bank_length)
        self.device = torch.device(device)
        c, n, dev = self.num_classes, self.bank_length, self.device
        # Flat stores with one extra "dummy" slot at the end that absorbs discarded writes.
        self._hi = torch.full((c * n + 1,), -1, dtype=torch.int32, device=dev)
        self._lo = torch.zeros(c * n + 1, dtype=torch.int32, device=dev)
        self._hist = torch.zeros(c * _BINS + 1, dtype=torch.int32, device=dev)
        self._count = torch.zeros(c, dtype=torch.int64, device=dev)
        self._head = torch.zeros(c, dtype=torch.int64, device=dev)
        self._thr = torch.zeros(c, dtype=torch.float32, device=dev)
        self._bin_base = torch.arange(c, dtype=torch.int32, device=dev) * _BINS

    # ------------------------------------------------------------------ thresholds
    @property
    def thresholds(self) -> Tensor:
        """The current threshold vector (float32 ``[C]`` on the bank's device)."""
        return self._thr

    @thresholds.setter
    def thresholds(self, value: Tensor) -> None:
        """Replace the thresholds, e.g. by their all-reduce average over ranks."""
        value = torch.as_tensor(value)
        if value.shape != (self.num_classes,):
            raise ValueError(f"thresholds must have shape ({self.num_classes},), got {tuple(value.shape)}")
        self._thr = value.to(device=self.device, dtype=torch.float32).clone()

    # ------------------------------------------------------------------ update
    def update(self, conf: Tensor, pred: Tensor) -> Tensor:
        """Add one iteration's confidences and recompute the thresholds (docs/METHOD.md section 3).

        Args:
            conf: max softmax probability per pixel, any shape (e.g. ``[N, H, W]``).
            pred: predicted class per pixel, same shape, values in ``[0, C)``.

        Returns:
            The threshold vector (float32 ``[C]``), the same tensor as :attr:`thresholds`.
            Classes absent from ``pred`` keep their threshold. Values are taken in the
            row-major order of ``conf[pred == c]``.
        """
        if conf.shape != pred.shape:
            raise ValueError(f"conf {tuple(conf.shape)} and pred {tuple(pred.shape)} differ in shape")
        c_num, length, dev = self.num_classes, self.bank_length, self.device
        conf = conf.detach().to(device=dev, dtype=torch.float32).reshape(-1)
        pred = pred.detach().to(device=dev, dtype=torch.int64).reshape(-1)
        m = pred.numel()
        hi_new, lo_new = _split_key(_float_to_key(conf))

        # Rank of every new value within its class (row-major order) and per-class counts.
        order = torch.argsort(pred, stable=True)
        n_new = _add_counts(torch.zeros(c_num, dtype=torch.int64, device=dev), pred)
        start = torch.cumsum(n_new, 0) - n_new
        rank = torch.empty_like(pred)
        rank[order] = torch.arange(m, device=dev) - start[pred[order]]

        # Wanted position: descending index k = int(n * p); ascending index r = n - 1 - k.
        n_tot = self._count + n_new
        k = torch.floor(n_tot.to(torch.float64) * self.p).to(torch.int64)
        k = torch.minimum(k, n_tot - 1)
        r = (n_tot - 1 - k).clamp_min(0).to(torch.int32).unsqueeze(1)

        # Level 1: histogram of the bank (kept up to date) plus the new values.
        base = pred.to(torch.int32) * _BINS
        hist1 = self._hist.clone()
        _add_counts(hist1, base + hi_new)
        hist1 = hist1[:-1].view(c_num, _BINS)
        cum1 = torch.cumsum(hist1, 1, dtype=torch.int32)
        b1 = torch.searchsorted(cum1, r, right=True).clamp_max(_BINS - 1)
        r2 = r - (cum1.gather(1, b1) - hist1.gather(1, b1))
        b1 = b1.to(torch.int32)

        # Level 2: histogram of the low halves of the keys that fall into bin b1 of their class.
        dummy = c_num * _BINS
        hist2 = torch.zeros(c_num * _BINS + 1, dtype=torch.int32, device=dev)
        bank_hi = self._hi[:-1].view(c_num, length)
        bank_lo = self._lo[:-1].view(c_num, length)
        _add_counts(hist2, torch.where(bank_hi == b1, bank_lo, dummy))
        in_bin = hi_new == b1.squeeze(1)[pred]
        _add_counts(hist2, torch.where(in_bin, base + lo_new, dummy))
        cum2 = torch.cumsum(hist2[:-1].view(c_num, _BINS), 1, dtype=torch.int32)
        b2 = torch.searchsorted(cum2, r2, right=True).clamp_max(_BINS - 1)
        new_thr = _key_to_float(_join_key(b1.squeeze(1), b2.squeeze(1).to(torch.int32)))
        self._thr = torch.where(n_new > 0, new_thr, self._thr)

        # Write the newest `length` values of each class into its ring, evicting the oldest.
        keep = rank >= n_new[pred] - length
        slot = pred * length + (self._head[pred] + rank) % length
        slot = torch.where(keep, slot, c_num * length)
        old_hi = self._hi[slot]
        _add_counts(self._hist, torch.where(keep & (old_hi >= 0), base + old_hi, dummy), -1)
        _add_counts(self._hist, torch.where(keep, base + hi_new, dummy))
        self._hi[slot] = hi_new
        self._lo[slot] = base + lo_new
        self._head = (self._head + n_new) % length
        self._count = torch.clamp_max(self._count + n_new, length)
        return self._thr

    # ------------------------------------------------------------------ inspection / state
    def _bank_values(self) -> Tensor:
        """All ring slots as float32 values ``[C, L]`` (empty slots hold 0)."""
        c_num, length = self.num_classes, self.bank_length
        hi = self._hi[:-1].view(c_num, length)
        lo = self._lo[:-1].view(c_num, length) - self._bin_base.unsqueeze(1)
        values = _key_to_float(_join_key(hi, lo))
        return torch.where(hi >= 0, values, torch.zeros_like(values))

    def banks(self) -> list[Tensor]:
        """Bank contents per class, oldest first (for inspection and tests; syncs)."""
        values = self._bank_values()
        out = []
        for c in range(self.num_classes):
            count, head = int(self._count[c]), int(self._head[c])
            row = values[c]
            out.append(row[:count].clone() if count < self.bank_length else torch.roll(row, -head))
        return out

    def state_dict(self) -> dict[str, Tensor]:
        """Banks (ring layout, float32 ``[C, L]``), fill counts, write heads, thresholds.

        Plain tensors only, so ``torch.load(..., weights_only=True)`` can read them back.
        """
        return {
            "bank": self._bank_values().clone(),
            "count": self._count.clone(),
            "head": self._head.clone(),
            "thresholds": self._thr.clone(),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore what :meth:`state_dict` returned (the same ``num_classes`` and ``bank_length``)."""
        c_num, length, dev = self.num_classes, self.bank_length, self.device
        bank = torch.as_tensor(state["bank"]).to(device=dev, dtype=torch.float32)
        if bank.shape != (c_num, length):
            raise ValueError(f"bank has shape {tuple(bank.shape)}, expected ({c_num}, {length})")
        count = torch.as_tensor(state["count"]).to(device=dev, dtype=torch.int64)
        head = torch.as_tensor(state["head"]).to(device=dev, dtype=torch.int64)
        self.thresholds = state["thresholds"]
        self._count = count.clone()
        self._head = head.clone()
        hi, lo = _split_key(_float_to_key(bank))
        valid = torch.arange(length, device=dev).unsqueeze(0) < count.unsqueeze(1)
        self._hi[:-1] = torch.where(valid, hi, -1).reshape(-1)
        self._lo[:-1] = (lo + self._bin_base.unsqueeze(1)).reshape(-1)
        self._hist.zero_()
        _add_counts(self._hist, torch.where(valid, hi + self._bin_base.unsqueeze(1), c_num * _BINS))
