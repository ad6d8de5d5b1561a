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
import time
from collections.abc import Mapping, Sequence
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

    def wait(self, job: str, timeout: float = RUN_TIMEOUT_S) -> Result:
        if job not in self.done:
            self._read_until(lambda msg: msg.get("id") == job and "returncode" in msg, what=f"run {job}", timeout=timeout)
        out, err = (Path(self.folder) / f"{job}.{ext}" for ext in ("out", "err"))
        result = Result(self.jobs.pop(job), self.done.pop(job), out.read_text(errors="replace"),
                        err.read_text(errors="replace"))
        out.unlink()
        err.unlink()
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
