"""DataLoaders and moving their batches to the device."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from utils import distributed as du


def make_loader(dataset, sampler, batch_size: int, num_workers: int, env: du.DistEnv,
                drop_last: bool = False) -> DataLoader:
    """A DataLoader with pinned memory on CUDA and persistent workers."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=env.device.type == "cuda",
        persistent_workers=num_workers > 0,
        drop_last=drop_last,
        prefetch_factor=2 if num_workers > 0 else None,
        worker_init_fn=du.die_with_parent if num_workers > 0 else None,
        # The loader draws its workers' base seed when an iterator starts; from a generator of its
        # own, so starting the streams after a resume leaves the global RNG as an uninterrupted run
        # has it (samples are seeded by their keys, not by this seed).
        generator=torch.Generator(),
    )


def to_device_image(img: Tensor, device: torch.device, channels_last: bool = False) -> Tensor:
    """uint8 ``[N,3,H,W]`` -> float ``/255`` on ``device`` (docs/METHOD.md section 1: no mean/std)."""
    x = img.to(device, non_blocking=True).float().div_(255.0)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def to_device_label(label: Tensor, device: torch.device) -> Tensor:
    return label.to(device, non_blocking=True).long()


def workers_per_rank(num_workers: int, env: du.DistEnv) -> int:
    """A rank's share of ``--num-workers`` (the total over ranks, as the original divides it)."""
    return max(0, num_workers // env.world_size)
