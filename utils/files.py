"""Temporary files for atomic writes, with the permissions of an ordinary new file.

``tempfile.mkstemp`` creates its file with mode 0600 whatever the umask, and a rename keeps
that mode: a checkpoint written through it could not be read by a lab's other users. Here the
file is created with mode 0666, which the kernel reduces by the process umask exactly as for
``open(path, "w")`` (0644 under the usual umask 022). No torch import, so light tools
(``datasets/get_thresholds.py``) can use it.
"""

from __future__ import annotations

import errno
import os
import secrets

_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)


def create_temp_file(folder: str, prefix: str, suffix: str) -> tuple[int, str]:
    """Create ``<folder>/<prefix><random><suffix>`` exclusively; returns ``(fd, path)`` as
    ``tempfile.mkstemp`` does, but with the mode of an ordinary file (0666 minus the umask)."""
    for _ in range(100):
        path = os.path.join(folder, f"{prefix}{secrets.token_hex(6)}{suffix}")
        try:
            return os.open(path, _FLAGS, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary file name", folder)
