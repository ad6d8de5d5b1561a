"""SLURM: ``srun`` tasks as ranks, the job requeuing itself, and sbatch command lines
(docs/RELIABILITY.md, "Signals, preemption, SLURM").

* :func:`srun_task` reads an ``srun`` step's task the way torchvision's ``init_distributed_mode``
  does: rank, world size and local rank from ``SLURM_PROCID``, ``SLURM_NTASKS`` and
  ``SLURM_LOCALID``; the rendezvous address from the first host of the step's (else the job's)
  node list, the port from the job id unless ``MASTER_ADDR`` / ``MASTER_PORT`` are set.
* :func:`requeue` asks SLURM to requeue the job, if it was submitted with ``--requeue``.
* :class:`SbatchJob` and :func:`sbatch_command` build the ``sbatch`` command line of one job
  (requeue-safe: ``--requeue``, ``--signal``, ``--open-mode=append``), :func:`submit` runs it.

No torch import: the pipeline runner uses it to submit jobs.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

PORT_BASE, PORT_SPAN = 15000, 10000  # the rendezvous port of a job: PORT_BASE + job id % PORT_SPAN
DEFAULT_SIGNAL = "USR1@120"  # --signal of our jobs: SIGUSR1 to every task 120 s before the time limit
SCONTROL_TIMEOUT_S = 30.0


class SlurmError(ValueError):
    """A SLURM variable is missing or malformed, or a SLURM command failed; the message names it."""


@dataclass(frozen=True)
class SrunTask:
    """This process as one task of an ``srun`` step with several tasks (one rank per task)."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int

    @property
    def init_method(self) -> str:
        return f"tcp://{self.master_addr}:{self.master_port}"


def _int(environ: Mapping[str, str], name: str, lowest: int = 0) -> int:
    value = environ.get(name)
    if value is None:
        raise SlurmError(f"{name}: not set, but this process is a task of an srun step (SLURM_STEP_ID is set)")
    try:
        number = int(value)
    except ValueError:
        raise SlurmError(f"{name}={value!r}: not an integer") from None
    if number < lowest:
        raise SlurmError(f"{name}={value!r}: must be >= {lowest}")
    return number


def step_tasks(environ: Mapping[str, str] = os.environ) -> int:
    """How many tasks this process's ``srun`` step has; 0 outside a step (a batch script, ``salloc``,
    no SLURM). The batch script itself has ``SLURM_NTASKS`` and ``SLURM_PROCID=0`` but no
    ``SLURM_STEP_ID``; an ``srun`` step has both ``SLURM_STEP_ID`` and ``SLURM_STEP_NUM_TASKS``."""
    if "SLURM_STEP_ID" not in environ and "SLURM_STEPID" not in environ:
        return 0
    name = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in environ else "SLURM_NTASKS"
    return _int(environ, name, lowest=1)


def first_host(nodelist: str) -> str:
    """The first host of a SLURM host list: ``gpu[03-05,9],cpu1`` -> ``gpu03``,
    ``rack[1-2]-n[01-04]`` -> ``rack1-n01``."""
    text = nodelist.strip()
    depth, end = 0, len(text)
    for i, ch in enumerate(text):  # the first entry: up to the first comma outside brackets
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            end = i
            break
    entry = text[:end]

    def first_of_range(match: re.Match) -> str:
        return re.split(r"[,-]", match.group(1), maxsplit=1)[0]

    host = re.sub(r"\[([^\]]*)\]", first_of_range, entry)
    if not host or any(c in host for c in "[], "):
        raise SlurmError(f"cannot read the first host of the node list {nodelist!r}")
    return host


def job_port(job_id: int) -> int:
    """The rendezvous port of job ``job_id``: the same for every task and for every requeue of the
    job, different for jobs that share a node (below Linux's ephemeral ports, 32768 and up)."""
    return PORT_BASE + job_id % PORT_SPAN


def srun_task(environ: Mapping[str, str] = os.environ) -> SrunTask | None:
    """This process as a task of an ``srun`` step of several tasks, or ``None`` (no such step).

    Raises :class:`SlurmError` naming the variable when one is missing, malformed or contradicts
    another (a half-set or mixed environment)."""
    tasks = step_tasks(environ)
    if tasks <= 1:
        return None
    rank = _int(environ, "SLURM_PROCID")
    world = _int(environ, "SLURM_NTASKS", lowest=1)
    if world != tasks:
        raise SlurmError(f"SLURM_NTASKS={world} but the srun step has SLURM_STEP_NUM_TASKS={tasks} tasks "
                         f"(a mixed environment: was SLURM_NTASKS exported by hand?)")
    if rank >= world:
        raise SlurmError(f"SLURM_PROCID={rank}: must be below SLURM_NTASKS={world}")
    local = _int(environ, "SLURM_LOCALID")
    addr = environ.get("MASTER_ADDR")
    if not addr:
        name = "SLURM_STEP_NODELIST" if environ.get("SLURM_STEP_NODELIST") else "SLURM_JOB_NODELIST"
        nodes = environ.get(name) or environ.get("SLURM_NODELIST")
        if not nodes:
            raise SlurmError("SLURM_JOB_NODELIST: not set, and no MASTER_ADDR (where rank 0 listens)")
        addr = first_host(nodes)
    if environ.get("MASTER_PORT"):
        port = _int(environ, "MASTER_PORT", lowest=1)
        if port > 65535:
            raise SlurmError(f"MASTER_PORT={port}: not a TCP port")
    else:
        port = job_port(_int(environ, "SLURM_JOB_ID"))
    return SrunTask(rank, world, local, addr, port)


def job_id(environ: Mapping[str, str] = os.environ) -> str | None:
    """The id of the SLURM job this process runs in, or ``None``."""
    return environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID") or None


def restart_count(environ: Mapping[str, str] = os.environ) -> int:
    """How often this job was requeued (``SLURM_RESTART_COUNT``; 0 for its first run or outside SLURM)."""
    try:
        return int(environ.get("SLURM_RESTART_COUNT", "0") or 0)
    except ValueError:
        return 0


def _scontrol(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["scontrol", *argv], capture_output=True, text=True, timeout=SCONTROL_TIMEOUT_S,
                          check=False)


def requeue(job: str) -> str:
    """Requeue SLURM job ``job`` (``scontrol requeue``) if it was submitted with ``--requeue``.

    Returns one sentence saying what happened; never raises. SLURM ends the job's processes
    (SIGTERM, then SIGKILL after ``KillWait``) and starts the job again from its batch script,
    after a delay of its own (about two minutes)."""
    try:
        shown = _scontrol("show", "job", "-o", job)
        if shown.returncode != 0:
            return f"SLURM job {job} not requeued: scontrol show job failed ({shown.stderr.strip() or shown.returncode})"
        fields = dict(w.split("=", 1) for w in shown.stdout.split() if "=" in w)
        if fields.get("Requeue") != "1":
            return f"SLURM job {job} not requeued: it was submitted without --requeue"
        done = _scontrol("requeue", job)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"SLURM job {job} not requeued: {exc}"
    if done.returncode != 0:
        return f"SLURM job {job} not requeued: scontrol requeue failed ({done.stderr.strip() or done.returncode})"
    return f"requeued SLURM job {job}"


# ---------------------------------------------------------------------------- sbatch
@dataclass(frozen=True)
class SbatchJob:
    """One sbatch job running ``command`` (argv), requeue-safe.

    ``tasks_per_node`` > 1 runs the command as an ``srun`` step of one task per GPU (each task one
    rank, no ``--dist``); otherwise as one ``srun`` task (which may itself spawn ranks with
    ``--dist``). Either way the command is an ``srun`` step, so that ``--signal`` (without ``B:``)
    reaches it and all its processes. ``dependency`` is a job id the job waits for
    (``afterok``; with ``--kill-on-invalid-dep=yes`` a failed dependency cancels this job).
    ``log`` is the job's output file, appended to across requeues (``%j`` is the job id).
    ``extra`` holds further sbatch options (``--partition=gpu``, ``--account=lab``)."""

    command: Sequence[str]
    job_name: str
    log: str
    dependency: str | None = None
    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int | None = None
    time: str | None = None
    signal: str = DEFAULT_SIGNAL
    requeue: bool = True
    chdir: str | None = None
    extra: Sequence[str] = field(default_factory=tuple)


def sbatch_command(job: SbatchJob) -> list[str]:
    """The ``sbatch`` argv that submits ``job`` (``--parsable``: sbatch prints only the job id).

    For a dry run print ``shlex.join(sbatch_command(job))``."""
    if not job.command:
        raise SlurmError(f"sbatch job {job.job_name!r}: empty command")
    argv = ["sbatch", "--parsable", f"--job-name={job.job_name}", f"--output={job.log}", "--open-mode=append",
            f"--nodes={job.nodes}", f"--ntasks-per-node={job.tasks_per_node}"]
    if job.gpus_per_node:
        argv.append(f"--gpus-per-node={job.gpus_per_node}")
    if job.cpus_per_task:
        argv.append(f"--cpus-per-task={job.cpus_per_task}")
    if job.time:
        argv.append(f"--time={job.time}")
    if job.signal:
        argv.append(f"--signal={job.signal}")
    argv.append("--requeue" if job.requeue else "--no-requeue")
    if job.dependency:
        argv += [f"--dependency=afterok:{job.dependency}", "--kill-on-invalid-dep=yes"]
    if job.chdir:
        argv.append(f"--chdir={job.chdir}")
    argv += list(job.extra)
    # The command runs as a job step: --signal without B: reaches the step's processes only.
    # srun is given --cpus-per-task itself (since SLURM 22.05 it does not take the job's).
    step = ["srun", "--kill-on-bad-exit=1"] if job.nodes * job.tasks_per_node > 1 else ["srun", "--ntasks=1"]
    if job.cpus_per_task:
        step.append(f"--cpus-per-task={job.cpus_per_task}")
    argv += ["--wrap", shlex.join([*step, *job.command])]
    return argv


def submit(job: SbatchJob, environ: Mapping[str, str] | None = None) -> str:
    """Submit ``job``; returns its job id. Raises :class:`SlurmError` with sbatch's own message."""
    argv = sbatch_command(job)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=SCONTROL_TIMEOUT_S, check=False,
                              env=dict(environ) if environ is not None else None)
    except (OSError, subprocess.SubprocessError) as exc:
        raise SlurmError(f"sbatch: {exc}") from None
    out = done.stdout.strip()
    if done.returncode != 0 or not out:
        raise SlurmError(f"sbatch failed for job {job.job_name!r}: {done.stderr.strip() or done.returncode}")
    return out.split(";", 1)[0]  # "ID" or "ID;cluster"
