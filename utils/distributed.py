"""Distributed helpers: one process, ``--dist --gpus`` spawning, or ``torchrun`` (``env://``)."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


@dataclass
class DistEnv:
    """Where this process runs and who its peers are."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or (dist.is_available() and dist.is_initialized())

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def find_free_port() -> int:
    """A free TCP port on the loopback interface (the original's way of picking one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch(worker: Callable[[int, Any], None], args: Any) -> None:
    """Run ``worker(spawn_rank, args)`` once per process.

    * ``torchrun`` (``RANK``/``WORLD_SIZE`` in the environment): this process is one rank.
    * ``--dist``: spawn one process per entry of ``--gpus`` on a free loopback port.
    * otherwise: a single process (first GPU of ``--gpus``, or the CPU with ``--cpu``).
    """
    if under_torchrun() or not getattr(args, "dist", False) or len(args.gpus) == 1:
        worker(-1, args)
        return
    args.dist_url = f"tcp://127.0.0.1:{find_free_port()}"
    # When one rank fails, torch logs "Terminating process N via signal SIGTERM" for its peers
    # before re-raising; keep a user error to its one line (the exception itself is not hidden).
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)
    mp.spawn(worker, nprocs=len(args.gpus), args=(args,), join=True)


def init_distributed(spawn_rank: int, args: Any) -> DistEnv:
    """Initialise the process group for this process and pick its device.

    NCCL on CUDA, gloo on the CPU. ``spawn_rank`` is -1 for torchrun or single-process runs.
    """
    use_cuda = torch.cuda.is_available() and not args.cpu
    if under_torchrun():
        rank = int(os.environ["RANK"])
        world = int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
        init_method = "env://"
    elif spawn_rank >= 0:
        rank, world, local = spawn_rank, len(args.gpus), spawn_rank
        init_method = args.dist_url
    else:
        rank, world, local = 0, 1, 0
        init_method = None
    if use_cuda:
        gpu = args.gpus[local] if spawn_rank >= 0 or init_method is None else local
        device = torch.device("cuda", gpu)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo", init_method=init_method, world_size=world, rank=rank
        )
    return DistEnv(rank=rank, world_size=world, local_rank=local, device=device)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj
