"""Launching a script: one-line user errors, ``main_entry``, the per-process workers, start-up
checks, stopping on a signal (docs/RELIABILITY.md, "Signals, preemption, SLURM"), seeding and
the run folder (log, args and environment records, tensorboard)."""

from __future__ import annotations

import functools
import glob
import logging
import os
import random
import re
import shlex
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import numpy as np
import torch

from datasets.errors import DatasetError
from engine import provenance
from engine.backends import deterministic_environment, set_deterministic
from engine.common import LOG, NonFiniteLossError, RunError, check_versions
from engine.options import TRAINING_STAGES, OptionError
from engine.state import LATEST, find_latest, resolve_resume_from
from utils import distributed as du
from utils import signals, slurm
from utils.checkpoint import CheckpointError
from utils.files import remove_stale_temp_files

USER_ERRORS = (DatasetError, CheckpointError, OptionError, NonFiniteLossError, RunError, FileNotFoundError,
               du.LaunchError, slurm.SlurmError)
# The scripts that stop on SIGUSR1 / SIGTERM at a boundary, save and exit (the others end at once).
STOPPABLE_STAGES = (*TRAINING_STAGES, "soft_label")


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


def resume_command(argv: list[str] | None = None, stage: str = "phase1") -> str:
    """The command line of this process (``argv``) with the flag that continues it: ``--resume_from
    auto`` for a training stage (replacing any ``--resume_from``), ``--skip_existing`` for the soft labels."""
    if argv is None:
        argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    if stage == "soft_label":
        return shlex.join(argv if "--skip_existing" in argv else [*argv, "--skip_existing"])
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


def continue_flag(stage: str) -> str:
    return "--skip_existing" if stage == "soft_label" else "--resume_from auto"


def torchrun_argv() -> list[str] | None:
    """The torchrun command that started this worker (its parent's, Linux), or ``None``."""
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return None
    launcher = any(a == "torch.distributed.run" or os.path.basename(a) == "torchrun" for a in argv[:3])
    return argv if launcher and sys.argv[0] in argv else None


def _continue_hint(stage: str = "phase1") -> str:
    if du.under_torchrun():
        argv = torchrun_argv()
        if argv is None:
            return f"continue with the same torchrun command and {continue_flag(stage)}"
        return f"continue with: {resume_command(argv, stage)}"
    return f"continue with: {resume_command(None, stage)}"


def stop_message(args: Any, signal_name: str, saved: str) -> str:
    """The one line of a run that stopped on a signal after saving: in a SLURM job the job is
    requeued (when submitted with ``--requeue``) and this says so; elsewhere how to continue."""
    flag = continue_flag(args.stage)
    head = f"stopped on {signal_name}: {saved}"
    job = slurm.job_id()
    if job is None:
        return f"{head}; {_continue_hint(args.stage)}"
    outcome = slurm.requeue(job)
    if outcome.startswith("requeued"):
        return f"{head}; {outcome}, which continues with {flag}"
    return f"{head}; {outcome}: submit it again with {flag} in its command"


def saved_on_disk(args: Any) -> str:
    """What a run stopped on a signal left, read from its files (for the ``--dist`` parent, whose
    ranks said it in the log): the iteration of ``latest.pth``, or the number of soft labels."""
    if args.stage == "soft_label":
        count = len(glob.glob(os.path.join(glob.escape(args.output_folder), "*.npy")))
        return f"{count} soft labels are in {args.output_folder}"
    path = find_latest(args.snapshot_dir)
    if path is None:
        return f"no {LATEST} in {args.snapshot_dir}"
    try:  # mmap: only the few bytes of the iteration are read
        it = int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["iteration"])
    except (OSError, RuntimeError, KeyError, ValueError) as exc:
        return f"{path} cannot be read ({exc})"
    return f"after iteration {it - 1}, {path} holds the state to continue from iteration {it}"


def stop_run(env: du.DistEnv, args: Any, saved: str) -> NoReturn:
    """End a run after a stop request, once every rank has saved what ``saved`` describes (all
    ranks call, after the same iteration or batch): one line from the job's first process (rank 0,
    or the ``--dist`` parent, which prints it when the ranks have ended), then
    :class:`utils.signals.StopRequested` on every rank (exit code :data:`utils.signals.EXIT_STOPPED`).

    Further stop signals are ignored from here on: everything is saved, and SLURM's requeue sends
    SIGTERM to every process of the job, which ends by itself a moment later. The line (and the
    requeue) come before the last barrier, so no rank exits, which ``srun --kill-on-bad-exit``
    would answer by killing the others, before the job is requeued.
    """
    name = signals.requested() or "a signal to another rank"
    signals.ignore_further()
    du.barrier(env.device)
    if env.is_main and env.launcher != "dist":
        print(stop_message(args, name, saved), file=sys.stderr, flush=True)
    elif env.is_main:
        LOG.info("stopped on %s: %s", name, saved)
    du.barrier(env.device)
    raise signals.StopRequested(name, saved, continue_flag(args.stage))


def apply_requeue(args: Any) -> None:
    """In a SLURM job that was requeued (``SLURM_RESTART_COUNT`` >= 1), continue what the first
    run began: a training stage without ``--resume_from`` resumes with ``--resume_from auto``,
    ``generate_soft_label.py`` keeps the soft labels already written (``--skip_existing``)."""
    if not slurm.restart_count():
        return
    if args.stage in TRAINING_STAGES and not args.resume_from:
        args.resume_from = "auto"
    elif args.stage == "soft_label":
        args.skip_existing = True


def main_entry(worker: Callable[[int, Any], None], args: Any) -> int:
    """Launch ``worker`` (see :func:`utils.distributed.launch`) turning failures into one line.

    Returns the process exit code: 0; 2 for a user error; 1 when a rank died or lost its peers
    (the line names the rank, the signal and the command that continues the run);
    :data:`utils.signals.EXIT_STOPPED` (3) when the run stopped on SIGUSR1 / SIGTERM after saving
    (:func:`stop_run`). No traceback unless ``--debug``.
    The versions of torch and torchvision (:func:`engine.common.check_versions`) and the files
    named on the command line that every rank needs (``--resume``) are checked first, then the
    launch environment and the GPUs asked for (:func:`utils.distributed.launch`), before anything
    is written. ``--deterministic`` sets ``CUBLAS_WORKSPACE_CONFIG`` here, before CUDA initialises and
    before the ranks are spawned (:func:`engine.backends.deterministic_environment`).
    """
    debug = args.debug
    restore = signals.install() if args.stage in STOPPABLE_STAGES else None
    try:
        check_versions()
        apply_requeue(args)
        check_start_files(args)
        # vars(): a caller may pass only the arguments main_entry took before --deterministic existed
        deterministic_environment(bool(vars(args).get("deterministic", False)))
        du.launch(worker, args)
    except signals.StopRequested:  # this process's rank 0 printed the line
        return signals.EXIT_STOPPED
    except du.RanksStopped as exc:  # --dist: every spawned rank saved and exited
        signals.ignore_further()
        print(stop_message(args, exc.signal_name, saved_on_disk(args)), file=sys.stderr, flush=True)
        return signals.EXIT_STOPPED
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
        print(f"error: {exc.describe()}; {_continue_hint(args.stage)}", file=sys.stderr)
        return 1
    except du.PeerLost as exc:  # this rank (torchrun) lost the other ranks
        rank = os.environ.get("RANK", "?")
        print(f"error: rank {rank} lost contact with the other ranks, one of them probably died ({exc}); "
              f"{_continue_hint(args.stage)}", file=sys.stderr)
        return 1
    finally:
        if restore is not None:
            restore()
    return 0


def _run_guarded(fn: Callable[[du.DistEnv, Any], None], spawn_rank: int, args: Any) -> None:
    set_deterministic(args.deterministic)  # process-wide: in every rank, before any work
    if spawn_rank >= 0 and args.stage in STOPPABLE_STAGES:  # a spawned rank: a process of its own
        signals.install()
    env = du.init_distributed(spawn_rank, args)
    try:
        fn(env, args)
    except signals.StopRequested:
        if spawn_rank >= 0:  # the --dist parent prints the line once every rank has ended
            sys.exit(signals.EXIT_STOPPED)
        raise
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
    LOG.info("%s: rank %d/%d on %s, process group %s, launcher %s, amp=%s (training), inference_amp=%s", name,
             env.rank, env.world_size, env.device, group, env.launcher, args.amp, args.inference_amp)
    if slurm.restart_count() and args.stage in STOPPABLE_STAGES:
        LOG.info("SLURM job %s, requeued %d time(s): continuing with %s", slurm.job_id(), slurm.restart_count(),
                 continue_flag(args.stage))
    for path in stale:
        LOG.info("removed stale temporary file %s", path)
    return writer
