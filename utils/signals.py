"""Stop requests: SIGUSR1 or SIGTERM make a run stop at an iteration boundary, save and exit
(docs/RELIABILITY.md, "Signals, preemption, SLURM").

The handler only records the request: the training loop reads it in the iteration's all-reduce
(:meth:`engine.trainer.Trainer.train_step`), so that every rank stops after the same iteration,
writes ``latest.pth`` through the one writer and exits with :data:`EXIT_STOPPED`. A signal that
arrives while a file is being written therefore waits for that write.

One request may arrive several times within moments: SLURM signals every process of a job step,
``srun`` and ``torchrun`` forward the signal they got to their tasks, and a ``--dist`` parent
forwards it to its ranks (:func:`forward_to`). Signals within :data:`SAME_REQUEST_S` seconds of
the first count as that one request. A later SIGUSR1 or SIGTERM (a second request, or SLURM's
SIGTERM at the time limit after an early ``--signal=USR1@120``) ends the process at once, as
before this module existed: the files written so far are complete (atomic writes), the one being
written is not renamed into place. SIGINT (Ctrl-C) keeps Python's behaviour.

Processes forked from the one that installed the handlers (DataLoader workers) ignore the
signals: their rank decides when they end.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from types import FrameType
from typing import ClassVar

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
EXIT_STOPPED = 3  # exit code of a run that stopped on a signal after saving (docs/RELIABILITY.md)
SAME_REQUEST_S = 2.0  # signals this close to the first one are the same request


class StopRequested(Exception):
    """Raised once every rank has saved after a stop request; ``main_entry`` turns it into one
    line (how to continue, or that the SLURM job was requeued) and :data:`EXIT_STOPPED`.

    ``saved`` says what was kept, e.g. ``"latest.pth holds iterations 0..41"``; ``resume_flag`` is
    the flag that continues the run (``--resume_from auto`` or ``--skip_existing``)."""

    def __init__(self, signal_name: str, saved: str, resume_flag: str) -> None:
        self.signal_name, self.saved, self.resume_flag = signal_name, saved, resume_flag
        super().__init__(f"stopped on {signal_name}: {saved}")


class _State:
    pid: int | None = None  # the process whose handlers these are
    first: float | None = None  # monotonic time of the first signal of the request
    name: str | None = None  # that signal's name
    count = 0  # signals received (every delivery)
    forward: ClassVar[list[int]] = []  # processes the signals are passed on to (a --dist parent's ranks)


def _handle(signum: int, frame: FrameType | None) -> None:
    if os.getpid() != _State.pid:  # a forked DataLoader worker: its rank decides
        return
    for pid in _State.forward:
        try:
            os.kill(pid, signum)
        except (ProcessLookupError, PermissionError):
            pass
    now = time.monotonic()
    _State.count += 1
    if _State.first is None:
        _State.first, _State.name = now, signal.Signals(signum).name
    elif now - _State.first >= SAME_REQUEST_S:  # a second request: end now, as without this module
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def install() -> Callable[[], None]:
    """Handle SIGUSR1 and SIGTERM in this process (main thread only) from now on, with no request
    recorded yet. Returns a function that puts back the previous handlers."""
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    _State.pid, _State.first, _State.name, _State.count, _State.forward = os.getpid(), None, None, 0, []
    for s in STOP_SIGNALS:
        signal.signal(s, _handle)

    def restore() -> None:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        _State.pid, _State.forward = None, []

    return restore


def ignore_further() -> None:
    """From now on ignore SIGUSR1 and SIGTERM in this process (after the stop's save: nothing is
    left to protect, and the process ends by itself a moment later)."""
    if _State.pid == os.getpid():
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)


def forward_to(pids: list[int]) -> None:
    """Pass every signal this process gets on to ``pids`` as well (a ``--dist`` parent: its ranks)."""
    _State.forward = list(pids)


def requested() -> str | None:
    """The name of the signal that asked this process to stop (``"SIGTERM"``), or ``None``."""
    return _State.name if _State.pid == os.getpid() else None


def received() -> int:
    """How many stop signals this process has received so far (every delivery counts)."""
    return _State.count if _State.pid == os.getpid() else 0
