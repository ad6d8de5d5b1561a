"""The project's one way to write a file, and reading ``.npy`` headers.

Every file a run writes (checkpoints, ``latest.pth``, soft labels, thresholds, label info,
``split.mat``, evaluation outputs, json files) goes through :func:`atomic_open`: the data go to a
temporary file ``.<basename>.<random>.tmp`` in the same folder, which is flushed, fsynced and
renamed over the final name, and the folder is fsynced. A crash at any moment leaves either the
old file or the new one, never a partial file under the final name. Writers that take a file
name rather than a file object (``cv2.VideoWriter``, ``predict.py``'s videos) get such a
temporary name from :func:`atomic_path`.

The temporary file is created with mode 0666, which the kernel reduces by the process umask
exactly as for ``open(path, "w")`` (0644 under the usual umask 022); the rename keeps that mode.
``tempfile.mkstemp`` is not used: its 0600 would survive the rename, and a checkpoint written
through it could not be read by a lab's other users.

No torch import, so light tools (``datasets/get_thresholds.py``) can use it; ``torch.save``
goes through :func:`utils.checkpoint.atomic_save`.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from typing import IO, Any, BinaryIO

import numpy as np

from utils import faults

_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
TEMP_SUFFIX = ".tmp"


def temp_prefix(path: str) -> str:
    """Temporary files of :func:`atomic_open` are ``.<basename>.<random>.tmp`` next to ``path``."""
    return f".{os.path.basename(path)}."


def _create_temp_file(folder: str, prefix: str, suffix: str = TEMP_SUFFIX) -> tuple[int, str]:
    """Create ``<folder>/<prefix><random><suffix>`` exclusively; returns ``(fd, path)`` as
    ``tempfile.mkstemp`` does, but with the mode of an ordinary file (0666 minus the umask)."""
    for _ in range(100):
        path = os.path.join(folder, f"{prefix}{secrets.token_hex(6)}{suffix}")
        try:
            return os.open(path, _FLAGS, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary file name", folder)


def _fsync_folder(folder: str) -> None:
    """Make a rename in ``folder`` durable; best effort (some file systems refuse)."""
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


@contextlib.contextmanager
def _replaced_when_done(path: str, suffix: str = TEMP_SUFFIX) -> Iterator[tuple[int, str]]:
    """``(fd, temporary path)`` beside ``path``; the temporary file is renamed over ``path`` when
    the block ends (the caller has flushed and fsynced it), or removed when the block raises."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = _create_temp_file(folder, temp_prefix(path), suffix)
    try:
        yield fd, tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_folder(folder)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """``with atomic_open(path) as f: ...`` writes ``path`` atomically (see the module docstring).

    ``f`` is a binary file object (``mode="w"``: a text one). When the block raises, the temporary
    file is removed and ``path`` is left as it was.
    """
    path = os.fspath(path)
    with _replaced_when_done(path) as (fd, tmp), os.fdopen(fd, mode) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())
        faults.during_write(path, f.fileno(), tmp)  # tests only: nothing unless $DECOUPLENET_FAULT asks


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[str]:
    """``with atomic_path(path) as tmp: writer(tmp)``, for writers that take a file name
    (``cv2.VideoWriter``): ``tmp`` is a temporary file beside ``path`` (created empty with the
    ordinary mode) whose name ends in ``path``'s extension, since such writers choose the format
    by it (``.<basename>.<random>.tmp<extension>``). When the block ends, the writer must have
    closed the file; it is fsynced and renamed over ``path``. When the block raises, it is removed
    and ``path`` is left as it was.
    """
    path = os.fspath(path)
    with _replaced_when_done(path, TEMP_SUFFIX + os.path.splitext(path)[1]) as (fd, tmp):
        os.close(fd)
        yield tmp
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.fsync(fd)
            faults.during_write(path, fd, tmp)  # tests only
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[Any], object], mode: str = "wb") -> None:
    """``write(f)`` into :func:`atomic_open`'s file object ``f``."""
    with atomic_open(path, mode) as f:
        write(f)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """``data`` as the whole content of ``path``, written atomically."""
    with atomic_open(path) as f:
        f.write(data)


def atomic_save_npy(array: np.ndarray, path: str | os.PathLike[str]) -> None:
    """``np.save`` made atomic; ``path`` must end with ``.npy`` (``np.save`` adds nothing to a file object)."""
    with atomic_open(path) as f:
        np.save(f, array)


def remove_stale_temp_files(folder: str) -> list[str]:
    """Delete the temporary files a killed :func:`atomic_open` left in ``folder`` (``.*.tmp``).

    Call on rank 0 at start-up, before anything is written into ``folder``. Returns the paths removed.
    """
    removed = []
    for path in glob.glob(os.path.join(glob.escape(folder), f".*{TEMP_SUFFIX}")):
        try:
            os.unlink(path)
            removed.append(path)
        except OSError:
            pass
    return removed


def read_npy_header(f: BinaryIO) -> tuple[tuple[int, ...], bool, np.dtype]:
    """``(shape, fortran_order, dtype)`` from the header of an open ``.npy`` file, which is left
    positioned at the array data. Raises ``ValueError`` for a file that is not ``.npy``."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)


def move_folder(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Rename the folder ``src`` to ``dst`` (one rename: all of it or nothing); an old ``dst`` goes first."""
    if os.path.isdir(dst):
        shutil.rmtree(dst)
    os.replace(src, dst)
    _fsync_folder(os.path.dirname(os.path.abspath(os.fspath(dst))))
