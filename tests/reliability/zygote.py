"""A pre-loaded process that forks one child per script run (the reliability tests' launcher).

Importing torch and the project takes ~10 s on a loaded 2-core machine; the reliability tests
run ~40 scripts. This server imports everything once and then, per request, ``fork``s a child
that runs the real script file as ``__main__`` (``runpy``), with its own argv, environment,
working directory and stdout/stderr files. The child is a real process: it exits through the
normal interpreter shutdown with the script's exit code, and a SIGKILL kills it as it would a
``python script.py``. It never runs a torch operation before the fork (no thread pool to break).

Protocol (one JSON object per line): stdin ``{"id", "argv", "env", "cwd", "stdout", "stderr"}``;
stdout ``{"id", "pid"}`` when started and ``{"id", "returncode"}`` when it ended (negative: killed
by that signal, as ``subprocess``). End of stdin: remaining children are killed, the server exits.
"""

from __future__ import annotations

import importlib
import json
import os
import select
import signal
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import torch

PRELOAD = ["cv2", "numpy", "scipy.io", "tqdm", "PIL.Image", "datasets.build", "engine.trainer", "stages.evaluation",
           "stages.options", "stages.phase1", "stages.phase2", "stages.soft_labels"]
for _name in PRELOAD:  # what every script imports, once for all children
    importlib.import_module(_name)


def run_child(req: dict) -> None:
    """In the forked child: become ``python ARGV`` and never return to the server loop."""
    import runpy

    for fd, name, flags in ((0, os.devnull, os.O_RDONLY),
                            (1, req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                            (2, req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        new = os.open(name, flags, 0o644)
        os.dup2(new, fd)
        os.close(new)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    torch.set_num_threads(int(req["env"].get("OMP_NUM_THREADS", "1")))
    sys.argv = list(req["argv"])
    sys.orig_argv = [sys.executable, *sys.argv]  # as `python SCRIPT ARGS` has it (the lines that say how to continue)
    sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))  # as `python SCRIPT` does
    if REPO not in sys.path:
        sys.path.insert(1, REPO)
    runpy.run_path(sys.argv[0], run_name="__main__")
    # A script that returns without sys.exit: exit 0. Exceptions and SystemExit propagate to the
    # top level and end this process exactly as they end `python SCRIPT` (traceback, exit code).
    raise SystemExit(0)


def serve() -> None:
    children: dict[int, str] = {}
    pending = b""
    stdin_open = True
    while stdin_open or children:
        ready, _, _ = select.select([0] if stdin_open else [], [], [], 0.05)
        if ready:
            chunk = os.read(0, 65536)
            if not chunk:
                stdin_open = False
                for pid in children:
                    os.kill(pid, signal.SIGKILL)
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                req = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    run_child(req)  # raises SystemExit / the script's exception: never returns
                children[pid] = req["id"]
                print(json.dumps({"id": req["id"], "pid": pid}), flush=True)
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            if pid in children:
                code = os.waitstatus_to_exitcode(status)
                print(json.dumps({"id": children.pop(pid), "returncode": code}), flush=True)


if __name__ == "__main__":
    print(json.dumps({"ready": True}), flush=True)
    serve()
