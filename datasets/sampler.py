"""Samplers: an endless, exactly resumable training stream and an evaluation shard.

See docs/DESIGN.md, "Deterministic sampling".
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The order of epoch ``epoch``: a permutation drawn from ``default_rng((seed, epoch))``."""
    return np.random.default_rng((seed, epoch)).permutation(num_samples)


class StreamSampler(Sampler):
    """Endless stream of keys ``(epoch, index)`` for one rank.

    The global stream position ``p`` maps to ``epoch = p // N`` and
    ``index = perm(seed, epoch)[p % N]`` (identity order when ``shuffle`` is false).
    Iteration ``it`` on rank ``r`` takes positions ``it * B + r * b + j`` for
    ``j < b`` (``b`` = batch size per rank, ``B = b * world_size``), so resuming at
    iteration ``k`` is ``start_iter=k`` and gives exactly the tail of a fresh stream.
    Use it with ``DataLoader(batch_size=b)``; it never ends, so the training loop
    decides when to stop.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size_per_rank: int,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 1234,
        shuffle: bool = True,
        start_iter: int = 0,
    ) -> None:
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if batch_size_per_rank <= 0:
            raise ValueError(f"batch_size_per_rank must be positive, got {batch_size_per_rank}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"bad rank {rank} for world_size {world_size}")
        if start_iter < 0:
            raise ValueError(f"start_iter must be >= 0, got {start_iter}")
        super().__init__()
        self.num_samples = int(num_samples)
        self.batch_size_per_rank = int(batch_size_per_rank)
        self.world_size = int(world_size)
        self.rank = int(rank)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.start_iter = int(start_iter)

    def key_at(self, position: int, perm_cache: dict[int, np.ndarray] | None = None
               ) -> tuple[int, int]:
        """Key ``(epoch, index)`` at global stream position ``position``."""
        epoch, offset = divmod(int(position), self.num_samples)
        if not self.shuffle:
            return epoch, offset
        if perm_cache is None:
            perm = epoch_permutation(self.num_samples, self.seed, epoch)
        else:
            if epoch not in perm_cache:
                perm_cache.clear()  # the stream only moves forward: keep one epoch
                perm_cache[epoch] = epoch_permutation(self.num_samples, self.seed, epoch)
            perm = perm_cache[epoch]
        return epoch, int(perm[offset])

    def __iter__(self) -> Iterator[tuple[int, int]]:
        b = self.batch_size_per_rank
        total = b * self.world_size
        cache: dict[int, np.ndarray] = {}
        it = self.start_iter
        while True:
            base = it * total + self.rank * b
            for j in range(b):
                yield self.key_at(base + j, cache)
            it += 1


class ShardSampler(Sampler):
    """Evaluation shard: rank ``r`` of ``W`` gets ``r, r + W, r + 2W, ...``.

    No padding: over all ranks every index appears exactly once (unlike
    ``DistributedSampler``, which pads and double-counts; docs/METHOD.md section 3).
    """

    def __init__(self, num_samples: int, world_size: int = 1, rank: int = 0) -> None:
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"bad rank {rank} for world_size {world_size}")
        super().__init__()
        self.num_samples = int(num_samples)
        self.world_size = int(world_size)
        self.rank = int(rank)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.num_samples, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.num_samples, self.world_size))
