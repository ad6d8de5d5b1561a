"""Test-only fault injection: the one module that reads ``$DECOUPLENET_FAULT``.

The reliability tests (tests/reliability/) kill or break a run at chosen moments to check that it
resumes. Without the variable every hook here does nothing. ``DECOUPLENET_FAULT=KIND:ARG[:N]``:

    kill_before_rename:PATTERN[:N]  SIGKILL after the N-th (default 1st) atomic write of a file whose
                                    basename matches PATTERN (fnmatch) is fully written, before the rename
    kill_mid_write:PATTERN[:N]      SIGKILL with only half of that file's bytes in the temporary file
    enospc:PATTERN[:N]              OSError(ENOSPC) in that write, before the rename
    kill_at_iter:K                  SIGKILL at the start of training iteration K
    nan_at_iter:K                   the total loss of iteration K times NaN
    nan_from_iter:K                 the total loss of iteration K and of every later one times NaN
    hold_at_iter:K                  at the start of iteration K, wait until this process was asked to
                                    stop (SIGUSR1 / SIGTERM, utils/signals.py; at most 60 s)
    hold_mid_write:PATTERN[:N]      hold that write open, its data in the temporary file, until this
                                    process gets one more stop signal (at most 60 s), then finish it

The two holds let a test send its signal at a known moment: during iteration K, or while a file
is being written. Under DDP ``DECOUPLENET_FAULT_RANK=R`` limits the fault to rank R (default:
every rank). A fault fires in the first attempt only: not in a torchrun restart
(``TORCHELASTIC_RESTART_COUNT`` > 0) nor in a requeued SLURM job (``SLURM_RESTART_COUNT`` > 0),
so that the restarted run can finish.

Two hooks: the atomic writer (:func:`utils.files.atomic_open`) calls :func:`during_write`, the
training loop (:class:`engine.trainer.Trainer`) calls :func:`at_iteration`.
"""

from __future__ import annotations

import errno
import fnmatch
import functools
import os
import signal
import sys
import time
from collections.abc import MutableMapping
from typing import Any

from utils import signals

FAULT_ENV = "DECOUPLENET_FAULT"
FAULT_RANK_ENV = "DECOUPLENET_FAULT_RANK"
WRITE_FAULTS = ("kill_before_rename", "kill_mid_write", "enospc", "hold_mid_write")
HOLD_LIMIT_S = 60.0  # a hold gives up waiting for its signal after this long
_matching_writes = [0]  # atomic writes whose file matched the fault's pattern so far


def _process_rank() -> int:
    """This process's rank: the process group's when one is initialised, else ``$RANK`` (0)."""
    # Not imported: a process that never loaded torch.distributed has no process group, and
    # light tools (datasets/get_thresholds.py) write files without importing torch.
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


@functools.lru_cache(maxsize=1)
def injected_fault() -> tuple[str, str, int] | None:
    """``(kind, arg, n)`` parsed once from ``$DECOUPLENET_FAULT``, or ``None`` (also when the
    fault targets another rank, or this is a torchrun restart)."""
    kind, _, rest = os.environ.get(FAULT_ENV, "").partition(":")
    arg, _, n = rest.partition(":")
    if not kind or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0" \
            or os.environ.get("SLURM_RESTART_COUNT", "0") not in ("", "0"):
        return None
    target = os.environ.get(FAULT_RANK_ENV, "")
    if target and int(target) != _process_rank():
        return None
    return kind, arg, int(n or 1)


def _write_fault(path: str) -> str | None:
    """The fault kind to inject into this atomic write of ``path`` (counts the matching writes)."""
    fault = injected_fault()
    if fault is None or fault[0] not in WRITE_FAULTS:
        return None
    if not fnmatch.fnmatchcase(os.path.basename(path), fault[1]):
        return None
    _matching_writes[0] += 1
    return fault[0] if _matching_writes[0] == fault[2] else None


def hold_until_signal(more_than: int = 0) -> None:
    """Wait until this process has received more than ``more_than`` stop signals (at most
    :data:`HOLD_LIMIT_S`), so that a test knows its signal arrived during the hold."""
    deadline = time.monotonic() + HOLD_LIMIT_S
    while signals.received() <= more_than and time.monotonic() < deadline:
        time.sleep(0.02)


def during_write(path: str, fd: int, temp_path: str) -> None:
    """The writer's hook: called once the data of ``path`` are in the temporary file ``temp_path``
    (open as ``fd``) and synced, before the rename. Raises ``OSError(ENOSPC)``, SIGKILLs this
    process (after cutting the temporary file to half its size) or holds the write open until a
    stop signal arrives, when the fault asks for it."""
    fault = _write_fault(path)
    if fault == "hold_mid_write":
        hold_until_signal(signals.received())
    if fault == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), temp_path)
    if fault == "kill_mid_write":
        os.ftruncate(fd, os.fstat(fd).st_size // 2)
    if fault in ("kill_mid_write", "kill_before_rename"):
        os.kill(os.getpid(), signal.SIGKILL)


def _nan_at(it: int, kind: str, first: int) -> bool:
    return (kind == "nan_at_iter" and it == first) or (kind == "nan_from_iter" and it >= first)


def at_iteration(it: int, losses: MutableMapping[str, Any] | None = None) -> None:
    """The training loop's hook. Without ``losses`` (the start of iteration ``it``): SIGKILL for
    ``kill_at_iter:it``, the wait for a stop signal of ``hold_at_iter:it``. With the losses of one
    of the iteration's passes: ``losses["total"]`` becomes NaN (in place) for ``nan_at_iter:it``
    and ``nan_from_iter:K`` with ``K <= it``."""
    fault = injected_fault()
    if fault is None:
        return
    kind, arg = fault[0], fault[1]
    if kind not in ("kill_at_iter", "nan_at_iter", "nan_from_iter", "hold_at_iter"):
        return
    if losses is None:
        if kind == "kill_at_iter" and it == int(arg):
            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "hold_at_iter" and it == int(arg):
            hold_until_signal()
    elif _nan_at(it, kind, int(arg)):
        losses["total"] = losses["total"] * float("nan")
