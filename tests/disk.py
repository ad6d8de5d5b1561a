"""How much disk the suite's temporary files take, watched while it runs (tests/conftest.py).

A training run of the tiny tests still writes full ResNet-101 checkpoints (about 200 MB each,
450 MB for ``latest.pth``), so a suite that kept them could fill a small disk. The watcher samples
the size of pytest's temporary folder and the free space of its disk every few seconds and the
session ends with one line: the peak, the lowest free space and the tests running at those moments.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

GIB = 2**30
SAMPLE_S = 2.0


def tree_bytes(root: Path) -> int:
    """Bytes of the regular files under ``root`` (files that vanish meanwhile count as 0)."""
    total = 0
    stack = [str(root)]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_blocks * 512
            except OSError:
                pass
    return total


def free_bytes(path: Path) -> int:
    """Free bytes of the disk of ``path`` (of its nearest existing parent once pytest removed it)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


class DiskWatch:
    """A daemon thread noting the peak size of ``root`` and the lowest free space of its disk."""

    def __init__(self, root: Path, current: Callable[[], str]) -> None:
        self.root = root
        self.current = current  # the test running now
        self.free_at_start = free_bytes(root)
        self.peak = (0, current())
        self.lowest_free = (self.free_at_start, current())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="disk-watch", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        used, free, now = tree_bytes(self.root), free_bytes(self.root), self.current()
        if used > self.peak[0]:
            self.peak = (used, now)
        if free < self.lowest_free[0]:
            self.lowest_free = (free, now)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self._sample()

    def stop(self) -> str:
        self._stop.set()
        self._thread.join(timeout=30)
        self._sample()
        return (f"temporary files: peak {self.peak[0] / GIB:.2f} GiB (during {self.peak[1]}); disk free: "
                f"{self.free_at_start / GIB:.1f} GiB at the start, lowest {self.lowest_free[0] / GIB:.1f} GiB "
                f"(during {self.lowest_free[1]})")
