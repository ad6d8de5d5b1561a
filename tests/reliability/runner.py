"""Running the project's scripts for the reliability tests, and what they check on the results.

:class:`ScriptRunner` talks to ``tests/reliability/zygote.py`` (one pre-loaded server per test
session that forks a real child process per script run), so that ~40 runs do not each pay the
10-second import of torch. Every run gets ``OMP_NUM_THREADS=1`` (two cores are shared, and
runs that are compared bit for bit must use the same thread count).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import select
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import REPO

ZYGOTE = Path(__file__).with_name("zygote.py")
RUN_TIMEOUT_S = 300
BASE_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@dataclass
class Result:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    def describe(self) -> str:
        return (f"`{' '.join(self.args)}` exited with {self.returncode}\n--- stdout ---\n{self.stdout[-6000:]}\n"
                f"--- stderr ---\n{self.stderr[-6000:]}")


class ScriptRunner:
    """``start(args, env)`` / ``wait(job)`` / ``run(args, env)``: ``python ARGS`` in the repository root."""

    def __init__(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="reliability_runs_")
        env = dict(os.environ, **BASE_ENV)
        env.pop("DECOUPLENET_FAULT", None)
        self.proc = subprocess.Popen([sys.executable, str(ZYGOTE)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     cwd=REPO, env=env)
        self.ids = itertools.count()
        self.jobs: dict[str, list[str]] = {}
        self.pids: dict[str, int] = {}
        self.done: dict[str, int] = {}
        self.buffer = b""
        self._read_until(lambda msg: msg.get("ready"), what="the script server to start")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        for name in os.listdir(self.folder):
            os.unlink(os.path.join(self.folder, name))
        os.rmdir(self.folder)

    def _read_until(self, stop, what: str, timeout: float = RUN_TIMEOUT_S) -> dict:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while True:
            while b"\n" in self.buffer:
                line, self.buffer = self.buffer.split(b"\n", 1)
                msg = json.loads(line)
                if "pid" in msg:
                    self.pids[msg["id"]] = msg["pid"]
                if "returncode" in msg:
                    self.done[msg["id"]] = msg["returncode"]
                if stop(msg):
                    return msg
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise RuntimeError(f"the script server ended (exit {self.proc.wait()}) while waiting for {what}")
                self.buffer += chunk

    def start(self, args: Sequence[object], env: Mapping[str, str] | None = None,
              cwd: str | os.PathLike[str] = REPO) -> str:
        job = str(next(self.ids))
        argv = [str(a) for a in args]
        full_env = dict(os.environ, **BASE_ENV)
        full_env.pop("DECOUPLENET_FAULT", None)
        full_env.update(env or {})
        req = {"id": job, "argv": argv, "env": full_env, "cwd": str(cwd),
               "stdout": os.path.join(self.folder, f"{job}.out"), "stderr": os.path.join(self.folder, f"{job}.err")}
        self.proc.stdin.write((json.dumps(req) + "\n").encode())
        self.proc.stdin.flush()
        self.jobs[job] = argv
        return job

    def pid(self, job: str) -> int:
        """The process id of a started run (waits for the server to report it)."""
        if job not in self.pids:
            self._read_until(lambda msg: msg.get("id") == job and "pid" in msg, what=f"run {job} to start")
        return self.pids[job]

    def signal(self, job: str, sig: int) -> None:
        """Send ``sig`` to a started run's process."""
        os.kill(self.pid(job), sig)

    def output(self, job: str) -> str:
        """The stdout a running (or ended, not yet collected) run has written so far."""
        path = Path(self.folder) / f"{job}.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait(self, job: str, timeout: float = RUN_TIMEOUT_S) -> Result:
        if job not in self.done:
            self._read_until(lambda msg: msg.get("id") == job and "returncode" in msg, what=f"run {job}", timeout=timeout)
        out, err = (Path(self.folder) / f"{job}.{ext}" for ext in ("out", "err"))
        result = Result(self.jobs.pop(job), self.done.pop(job), out.read_text(errors="replace"),
                        err.read_text(errors="replace"))
        out.unlink()
        err.unlink()
        self.pids.pop(job, None)
        return result

    def run(self, args: Sequence[object], env: Mapping[str, str] | None = None,
            cwd: str | os.PathLike[str] = REPO, expect: int | None = 0) -> Result:
        """Run to the end; with ``expect`` the exit code must be that (message: the output)."""
        result = self.wait(self.start(args, env, cwd))
        if expect is not None:
            assert result.returncode == expect, result.describe()
        return result

    def run_many(self, runs: Sequence[tuple[Sequence[object], Mapping[str, str] | None]], parallel: int = 3
                 ) -> list[Result]:
        """Run ``(args, env)`` pairs, at most ``parallel`` at a time; results in the given order."""
        results: list[Result | None] = [None] * len(runs)
        running: list[tuple[int, str]] = []
        for i, (args, env) in enumerate(runs):
            if len(running) >= parallel:
                j, job = running.pop(0)
                results[j] = self.wait(job)
            running.append((i, self.start(args, env)))
        for j, job in running:
            results[j] = self.wait(job)
        return results  # type: ignore[return-value]


class Watched:
    """A plain subprocess (a launcher: ``torchrun``, ``--dist``) in the repository root whose output
    is read as it comes, so that a test can wait for a line and then signal it.

    ``env`` entries are added to the current environment (less any ``DECOUPLENET_FAULT*``) and
    :data:`BASE_ENV`."""

    def __init__(self, argv: Sequence[object], env: Mapping[str, str] | None = None) -> None:
        self.argv = [str(a) for a in argv]
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("DECOUPLENET_FAULT")}
        full_env.update(BASE_ENV)
        full_env.update(env or {})
        self.proc = subprocess.Popen(self.argv, cwd=REPO, env=full_env, text=True, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.out: list[str] = []
        self.err: list[str] = []
        self.readers = [threading.Thread(target=self._read, args=(stream, into), daemon=True)
                        for stream, into in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for reader in self.readers:
            reader.start()

    @staticmethod
    def _read(stream, into: list[str]) -> None:
        into.extend(stream)  # line by line, as they come

    def text(self) -> str:
        return "".join(self.out) + "".join(self.err)

    def wait_for(self, needle: str, timeout: float = RUN_TIMEOUT_S) -> None:
        """Until ``needle`` is in the output so far; fails if the process ends first or on timeout."""
        wait_until(lambda: needle in self.text(), f"{needle!r} in the output of {' '.join(self.argv)}", timeout,
                   lambda: self.ended() and needle not in self.text(), self.describe)

    def ended(self) -> bool:
        """The process has exited and all its output is read."""
        return self.proc.poll() is not None and not any(r.is_alive() for r in self.readers)

    def wait(self, timeout: float = RUN_TIMEOUT_S) -> Result:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for reader in self.readers:
            reader.join()
        return Result(self.argv, self.proc.returncode, "".join(self.out), "".join(self.err))

    def describe(self) -> str:
        return f"`{' '.join(self.argv)}` (exit {self.proc.poll()})\n--- output ---\n{self.text()[-6000:]}"


def wait_until(done: Callable[[], bool], what: str, timeout: float, failed: Callable[[], bool] = lambda: False,
               describe: Callable[[], str] = lambda: "", interval: float = 0.1) -> None:
    """Poll ``done`` every ``interval`` s; an AssertionError naming ``what`` on timeout or when ``failed``."""
    deadline = time.monotonic() + timeout
    while not done():
        if failed() or time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}\n{describe()}")
        time.sleep(interval)


# ---------------------------------------------------------------------------- checks
def one_error_line(result: Result, *needles: str, code: int = 2) -> str:
    """Exit ``code``, exactly one non-empty stderr line holding every needle, no traceback."""
    assert result.returncode == code, result.describe()
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n" + result.describe()
    assert "Traceback" not in result.stderr + result.stdout, result.describe()
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in the error line {lines[0]!r}"
    return lines[0]


def digest(path: str | os.PathLike[str]) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def temp_files(folder: str | os.PathLike[str]) -> list[str]:
    """Names of atomic-write temporary files (``.<name>.<random>.tmp``) in ``folder``."""
    return sorted(p.name for p in Path(folder).iterdir() if p.name.endswith(".tmp"))
