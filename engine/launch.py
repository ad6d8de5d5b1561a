"""Launching a script: one-line user errors, ``main_entry``, the per-process workers, start-up
checks, seeding and the run folder (log, args and environment records, tensorboard)."""

from __future__ import annotations

import functools
import logging
import os
import random
import re
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from datasets.errors import DatasetError
from engine import provenance
from engine.backends import deterministic_environment, set_deterministic
from engine.common import LOG, NonFiniteLossError, RunError, check_versions
from engine.options import TRAINING_STAGES, OptionError
from engine.state import resolve_resume_from
from utils import distributed as du
from utils.checkpoint import CheckpointError
from utils.files import remove_stale_temp_files

USER_ERRORS = (DatasetError, CheckpointError, OptionError, NonFiniteLossError, RunError, FileNotFoundError)


# ---------------------------------------------------------------------------- entry point
def _user_message(text: str) -> str | None:
    """The last ``<UserErrorType>: message`` line of ``text`` (a traceback quoted in a message).

    A user error raised in a DataLoader worker comes back re-raised with the worker's whole
    traceback as its message; one raised in an ``mp.spawn`` rank comes back inside the rank's
    traceback. In both the original message is the last such line.
    """
    names = "|".join(e.__name__ for e in USER_ERRORS)
    found = re.findall(rf"^(?:[\w.]+\.)?(?:{names}): (.+)$", text, re.MULTILINE)
    return found[-1].strip() if found else None


def resume_command(argv: list[str] | None = None) -> str:
    """The command line of this process with ``--resume_from auto`` (replacing any ``--resume_from``)."""
    import shlex

    if argv is None:
        argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--resume_from":
            skip = True
        elif not arg.startswith("--resume_from="):
            out.append(arg)
    return shlex.join([*out, "--resume_from", "auto"])


def _continue_hint() -> str:
    if du.under_torchrun():
        return "continue with the same torchrun command and --resume_from auto"
    return f"continue with: {resume_command()}"


def main_entry(worker: Callable[[int, Any], None], args: Any) -> int:
    """Launch ``worker`` (see :func:`utils.distributed.launch`) turning failures into one line.

    Returns the process exit code: 0; 2 for a user error; 1 when a rank died or lost its peers
    (the line names the rank, the signal and the command that continues the run). No traceback
    unless ``--debug``.
    The versions of torch and torchvision (:func:`engine.common.check_versions`) and the files
    named on the command line that every rank needs (``--resume``) are checked first, before
    anything is written. ``--deterministic`` sets ``CUBLAS_WORKSPACE_CONFIG`` here, before CUDA
    initialises and before the ranks are spawned (:func:`engine.backends.deterministic_environment`).
    """
    debug = args.debug
    try:
        check_versions()
        check_start_files(args)
        deterministic_environment(args.deterministic)
        du.launch(worker, args)
    except USER_ERRORS as exc:
        if debug:
            raise
        text = str(exc)
        if "Original Traceback" in text:  # raised in a DataLoader worker
            text = _user_message(text) or text.strip().splitlines()[0]
        print(f"error: {text}", file=sys.stderr)
        return 2
    except du.RankFailure as exc:  # a spawned rank (--dist) failed
        if debug:
            for rank, tb in enumerate(exc.tracebacks):
                if tb:
                    print(f"-- rank {rank}:\n{tb}", file=sys.stderr)
            raise
        for tb in [exc.traceback, *exc.tracebacks]:  # a user error in any rank: its one line
            message = _user_message(tb) if tb else None
            if message:
                print(f"error: {message}", file=sys.stderr)
                return 2
        if exc.traceback:  # a bug in that rank: its traceback, as if it had run here
            print(f"{exc.traceback.rstrip()}\nerror: {exc}", file=sys.stderr)
            return 1
        print(f"error: {exc.describe()}; {_continue_hint()}", file=sys.stderr)
        return 1
    except du.PeerLost as exc:  # this rank (torchrun) lost the other ranks
        rank = os.environ.get("RANK", "?")
        print(f"error: rank {rank} lost contact with the other ranks, one of them probably died ({exc}); "
              f"{_continue_hint()}", file=sys.stderr)
        return 1
    return 0


def _run_guarded(fn: Callable[[du.DistEnv, Any], None], spawn_rank: int, args: Any) -> None:
    set_deterministic(args.deterministic)  # process-wide: in every rank, before any work
    env = du.init_distributed(spawn_rank, args)
    try:
        fn(env, args)
    except RuntimeError as exc:
        lost = du.peer_failure(exc)
        if lost is None:
            raise
        du.abandon()  # the peers are gone: do not wait for them
        if args.debug:
            raise
        if spawn_rank >= 0:  # a victim of another rank's failure: the launcher names the culprit
            sys.exit(du.EXIT_PEER_LOST)
        raise lost from None
    finally:
        du.cleanup()


def training_worker(fn: Callable[[du.DistEnv, Any], None]) -> Callable[[int, Any], None]:
    """Wrap ``fn(env, args)`` as a per-process worker: init distributed, run, always tear down.

    A ``functools.partial`` of module-level functions, so ``mp.spawn`` can pickle it.
    """
    return functools.partial(_run_guarded, fn)


# ---------------------------------------------------------------------------- run set-up


def require_resume_file(path: str) -> None:
    """A non-empty ``--resume`` ``path`` (given or the script's default) must be a file: one line
    naming the flag and the path otherwise. An empty ``--resume`` is left to the caller."""
    if path and not os.path.isfile(path):
        raise RunError(f"--resume {path}: file not found (pass the checkpoint to start from with --resume PATH)")


def check_start_files(args: Any) -> None:
    """Start-up checks before any process is spawned or any file written.

    ``--resume`` is needed unless a training stage continues from a training state
    (``--resume_from``), which supplies every weight.
    """
    if args.stage in TRAINING_STAGES and args.resume_from and resolve_resume_from(args) is not None:
        return
    require_resume_file(args.resume)


def seed_everything(seed: int, rank: int = 0) -> None:
    """Per-rank seeds for ``random``, NumPy and torch (data randomness is keyed separately)."""
    s = seed + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def setup_run(args: Any, env: du.DistEnv, name: str) -> Any:
    """Create the snapshot folder, the rank-0 log file and the tensorboard writer. Every rank calls it.

    Returns the tensorboardX writer (or ``None``). The resolved arguments and the world size go
    to ``<name>_args.json``; the code, library versions, GPUs, nodes, determinism and dataset
    fingerprints to ``<name>_env.json`` (:mod:`engine.provenance`; every rank's part gathered).
    """
    folder = args.snapshot_dir
    stale: list[str] = []
    if env.is_main:
        try:
            os.makedirs(folder, exist_ok=True)
            probe = os.path.join(folder, ".write_test")
            with open(probe, "w") as f:
                f.write("ok")
            os.unlink(probe)
        except OSError as exc:
            raise RunError(f"--snapshot-dir {folder}: not writable ({exc.strerror})") from None
        stale = remove_stale_temp_files(folder)  # left by a run killed while writing a file
    du.barrier(env.device)
    ranks = du.gather_to_main(provenance.rank_record(env.rank, str(env.device)), env.device)
    LOG.handlers.clear()
    LOG.propagate = False
    LOG.setLevel(logging.INFO if env.is_main else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%y-%m-%d %H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    LOG.addHandler(console)
    writer = None
    if env.is_main:
        fh = logging.FileHandler(os.path.join(folder, f"{name}.log"), encoding="utf-8")
        fh.setFormatter(fmt)
        LOG.addHandler(fh)
        # world_size: from the environment, where <name>_args.json has always had it
        record = {**provenance.args_record(args), "world_size": env.world_size}
        data = provenance.data_fingerprints(provenance.dataset_roots(args))
        provenance.write_records(os.path.join(folder, name), record, provenance.environment(name, ranks, data))
        if args.tensorboard:
            from tensorboardX import SummaryWriter

            writer = SummaryWriter(folder)
    group = torch.distributed.get_backend() if env.group else "none"
    LOG.info("%s: rank %d/%d on %s, process group %s, amp=%s (training), inference_amp=%s", name, env.rank,
             env.world_size, env.device, group, args.amp, args.inference_amp)
    for path in stale:
        LOG.info("removed stale temporary file %s", path)
    return writer
