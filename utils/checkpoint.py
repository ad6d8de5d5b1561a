"""Checkpoint I/O: atomic writes and safe (``weights_only``) loads."""

from __future__ import annotations

import errno
import fnmatch
import functools
import glob
import os
import re
import signal
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from utils.files import create_temp_file


class CheckpointError(ValueError):
    """A checkpoint does not fit the network (unknown layout, missing/unexpected key, shape), or a
    file is not the kind of checkpoint it should be."""

# ---------------------------------------------------------------------------- fault injection
# For the reliability tests only; no effect unless the variable is set. ``KIND:ARG[:N]``:
#   kill_before_rename:PATTERN[:N]  SIGKILL after the N-th (default 1st) atomic write of a file whose
#                                   basename matches PATTERN (fnmatch) is fully written, before the rename
#   kill_mid_write:PATTERN[:N]      SIGKILL with only half of that file's bytes in the temporary file
#   enospc:PATTERN[:N]              OSError(ENOSPC) after the temporary file is created
#   kill_at_iter:K / nan_at_iter:K  (engine.trainer.Trainer) SIGKILL at the start of iteration K /
#                                   total loss times NaN at iteration K
# Under DDP ``DECOUPLENET_FAULT_RANK=R`` limits the fault to rank R (default: every rank). Under
# torchrun a fault fires in the first attempt only (``TORCHELASTIC_RESTART_COUNT`` 0), so that
# the restarted group can finish.
FAULT_ENV = "DECOUPLENET_FAULT"
FAULT_RANK_ENV = "DECOUPLENET_FAULT_RANK"
_fault_writes = [0]  # atomic writes that matched the file pattern so far


def _process_rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


@functools.lru_cache(maxsize=1)
def injected_fault() -> tuple[str, str, int] | None:
    """``(kind, arg, n)`` parsed once from ``$DECOUPLENET_FAULT``, or ``None`` (also when the
    fault targets another rank, or this is a torchrun restart)."""
    kind, _, rest = os.environ.get(FAULT_ENV, "").partition(":")
    arg, _, n = rest.partition(":")
    if not kind or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return None
    target = os.environ.get(FAULT_RANK_ENV, "")
    if target and int(target) != _process_rank():
        return None
    return kind, arg, int(n or 1)


def _file_fault(path: str) -> str | None:
    """The fault kind to inject into this atomic write of ``path`` (counts matching writes)."""
    fault = injected_fault()
    if fault is None or fault[0] not in ("kill_before_rename", "kill_mid_write", "enospc"):
        return None
    if not fnmatch.fnmatchcase(os.path.basename(path), fault[1]):
        return None
    _fault_writes[0] += 1
    return fault[0] if _fault_writes[0] == fault[2] else None


def temp_prefix(path: str) -> str:
    """Temporary files of :func:`atomic_write` are ``.<basename>.<random>.tmp`` next to ``path``."""
    return f".{os.path.basename(path)}."


def remove_stale_temp_files(folder: str) -> list[str]:
    """Delete the temporary files a killed :func:`atomic_write` left in ``folder`` (``.*.tmp``).

    Call on rank 0 at start-up, before anything is written into ``folder``. Returns the paths removed.
    """
    removed = []
    for path in glob.glob(os.path.join(glob.escape(folder), ".*.tmp")):
        try:
            os.unlink(path)
            removed.append(path)
        except OSError:
            pass
    return removed


def atomic_write(path: str, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write ``path`` via ``write(fileobj)`` into a temporary file in the same folder, flush,
    fsync, then rename over ``path``. A crash at any moment leaves either the old file or the
    new one, never a partial file under the final name. The file gets the permissions of an
    ordinary new file (0666 minus the umask: 0644 under umask 022), not ``mkstemp``'s 0600."""
    folder = os.path.dirname(os.path.abspath(path))
    fault = _file_fault(path)
    fd, tmp = create_temp_file(folder, temp_prefix(path), ".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            if fault == "enospc":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), tmp)
            write(f)
            f.flush()
            if fault == "kill_mid_write":
                os.ftruncate(f.fileno(), os.fstat(f.fileno()).st_size // 2)
            os.fsync(f.fileno())
            if fault in ("kill_mid_write", "kill_before_rename"):
                os.kill(os.getpid(), signal.SIGKILL)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` made atomic (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_save_npy(array: np.ndarray, path: str) -> None:
    """``np.save`` made atomic; ``path`` must end with ``.npy``."""
    atomic_write(path, lambda f: np.save(f, array))


def _load_failure(exc: Exception) -> str:
    """One line on why ``torch.load(weights_only=True)`` failed (its message spans paragraphs)."""
    text = str(exc).strip()
    refused = re.search(r"GLOBAL ([\w.]+)", text)
    if refused:
        return f"refusing to load {refused.group(1)!r}: only tensors and plain data are allowed"
    if "Weights only load failed" in text:
        detail = [ln.strip() for ln in text.partition("WeightsUnpickler error:")[2].splitlines() if ln.strip()]
        return "refused by the weights-only unpickler" + (f": {detail[0]}" if detail else "")
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def safe_load(path: str, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with a clear error naming the file.

    ``weights_only=True`` refuses pickles that would construct arbitrary objects, so a crafted
    file cannot execute code. Our own training states only hold tensors, numbers, strings and
    plain containers.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint file not found")
    with warnings.catch_warnings(record=True) as caught:  # a refused file: the error line says it all
        warnings.simplefilter("always")
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{path}: not a loadable checkpoint ({_load_failure(exc)})") from exc
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return state
