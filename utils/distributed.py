"""Distributed helpers: one process, ``--dist --gpus`` spawning, ``torchrun`` (``env://``) or an
``srun`` step of several tasks (one rank per task, :mod:`utils.slurm`).

Which launcher a process runs under (:func:`launcher`, docs/RELIABILITY.md "Launchers"):
torchrun's ``RANK`` and ``WORLD_SIZE`` first; then an ``srun`` step of several tasks; then
``--dist`` spawning; else one process. A half-set or mixed environment is a :class:`LaunchError`
naming the variable, and so is asking for GPUs that torch does not see (:func:`check_devices`).

Failure handling (see docs/RELIABILITY.md):

* every collective has a timeout (``--dist_timeout``), so a rank that stops answering ends the
  job instead of hanging it;
* under single-node ``torchrun`` the process group's keys live under a per-restart prefix, so a
  restarted group never reads the addresses of the previous attempt's (dead) workers;
* DataLoader workers die with their rank (``PR_SET_PDEATHSIG``), so a killed rank closes its
  sockets and pipes at once and its peers and the launcher notice;
* a spawned rank that dies or fails is reported by :func:`launch` as a :class:`RankFailure`.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import os
import pickle
import re
import signal
import socket
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from utils import signals, slurm


@dataclass
class DistEnv:
    """Where this process runs and who its peers are."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    group: bool = False  # a process group exists (torchrun or --dist, even with one rank): DDP and collectives run
    launcher: str = "single"  # "single", "dist" (--dist, spawned or one rank), "torchrun" or "srun"

    def __post_init__(self) -> None:
        self.group = self.group or self.world_size > 1  # several ranks always share a group

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def find_free_port() -> int:
    """A free TCP port on the loopback interface (the original's way of picking one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


class LaunchError(ValueError):
    """The launch environment or the device flags do not fit together; the message names the
    variable or flag (a user error: one line, exit code 2)."""


def _env_int(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise LaunchError(f"{name}={environ[name]!r}: not an integer") from None


def launcher(args: Any, environ: Mapping[str, str] = os.environ) -> str:
    """How this process was launched: ``"torchrun"``, ``"srun"``, ``"dist"`` or ``"single"``.

    * ``torchrun``: ``RANK`` and ``WORLD_SIZE`` are set (also under ``srun torchrun``);
    * ``srun``: a task of an ``srun`` step of several tasks (``SLURM_STEP_ID`` set,
      ``SLURM_STEP_NUM_TASKS`` > 1), without ``--dist``: each task is one rank. A batch script
      (``sbatch``) has ``SLURM_NTASKS`` and ``SLURM_PROCID`` but no step, so ``--dist`` there
      spawns its ranks as anywhere else, and so does one ``srun`` task (``srun --ntasks=1``);
    * ``dist``: ``--dist`` (one process per entry of ``--gpus``);
    * ``single``: one process.

    Raises :class:`LaunchError` (or :class:`utils.slurm.SlurmError`) naming the variable for a
    half-set torchrun environment (one of ``RANK`` / ``WORLD_SIZE``), ``RANK`` / ``WORLD_SIZE``
    set by hand inside an ``srun`` step of several tasks, ``--dist`` in every task of such a step,
    and a missing or malformed SLURM variable.
    """
    have = [v for v in ("RANK", "WORLD_SIZE") if v in environ]
    if len(have) == 1:
        other = "WORLD_SIZE" if have[0] == "RANK" else "RANK"
        raise LaunchError(f"{have[0]} is set but {other} is not (a half-set torchrun environment): unset {have[0]} "
                          f"or start the script with torchrun")
    tasks = slurm.step_tasks(environ)
    if have:
        if tasks > 1 and "TORCHELASTIC_RUN_ID" not in environ:
            raise LaunchError(f"RANK and WORLD_SIZE are set, but not by torchrun, in an srun step of {tasks} tasks: "
                              f"unset them (each srun task is one rank) or start torchrun in each task")
        rank, world = _env_int(environ, "RANK"), _env_int(environ, "WORLD_SIZE")
        if world < 1 or not 0 <= rank < world:
            raise LaunchError(f"RANK={rank}, WORLD_SIZE={world}: RANK must lie in 0..WORLD_SIZE-1")
        return "torchrun"
    if tasks > 1:
        if args.dist:
            raise LaunchError(f"--dist: this process is one of {tasks} tasks of an srun step, and --dist would "
                              f"spawn {len(args.gpus)} ranks in each; drop --dist (srun starts one rank per task) "
                              f"or start one task (srun --ntasks=1) that spawns them")
        slurm.srun_task(environ)  # every variable it needs, checked now
        return "srun"
    return "dist" if args.dist else "single"


def cuda_usable() -> bool:
    """``torch.cuda.is_available()`` without its warning on stderr (a driver too old, ...):
    :func:`check_devices` says why in its one line."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.cuda.is_available()


def no_gpu_reason() -> str:
    """Why torch sees no GPU, as far as torch says: a CPU-only build, ``CUDA_VISIBLE_DEVICES``
    hiding every GPU, or the message of CUDA's initialisation (no driver, driver too old)."""
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return f"torch {torch.__version__} is a CPU-only build"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and (visible.strip() == "" or visible.strip().startswith("-1")):
        return f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            torch.cuda.init()
        except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError or AssertionError; its text is the reason
            text = str(exc)
        else:
            text = ""
    text = text or next((str(w.message) for w in caught), "")
    first = (text.strip().splitlines() or ["torch.cuda.is_available() is False"])[0]
    return first.rstrip(".")


def _visible() -> str:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return "" if visible is None else f", CUDA_VISIBLE_DEVICES={visible}"


def check_devices(args: Any, kind: str, environ: Mapping[str, str] = os.environ) -> None:
    """Without ``--cpu`` a run asks for GPUs; refuse (:class:`LaunchError`, one line) when torch
    sees none, or fewer than asked for: ``--gpus`` under ``--dist`` (every entry) or in one
    process (its first entry), ``LOCAL_RANK`` under torchrun, ``SLURM_LOCALID`` under srun
    (each task seeing exactly one GPU, as with ``--gpus-per-task=1``, is fine).
    ``kind`` is :func:`launcher`'s answer."""
    if args.cpu:
        return
    gpus = ",".join(str(g) for g in args.gpus)
    if not cuda_usable():
        asked = {"torchrun": "no --cpu: this torchrun worker", "srun": "no --cpu: this srun task"}.get(
            kind, f"--gpus {gpus}{' --dist' if kind == 'dist' else ''} without --cpu")
        raise LaunchError(f"{asked} asks for a GPU, but torch sees no GPU ({no_gpu_reason()}); "
                          f"--cpu trains on the CPU")
    count = torch.cuda.device_count()
    if kind == "torchrun":
        local = _env_int(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else _env_int(environ, "RANK")
        if local >= count:
            raise LaunchError(f"LOCAL_RANK={local}: torch sees {count} GPU(s) on this node{_visible()}; start at most "
                              f"{count} torchrun process(es) per node (--nproc_per_node)")
    elif kind == "srun":
        local = _env_int(environ, "SLURM_LOCALID")
        if count > 1 and local >= count:
            raise LaunchError(f"SLURM_LOCALID={local}: torch sees {count} GPUs on this node{_visible()}; start at "
                              f"most one srun task per GPU (--ntasks-per-node={count})")
    else:
        used = args.gpus if kind == "dist" else args.gpus[:1]
        if len(used) > count:
            raise LaunchError(f"--gpus {gpus} --dist: asks for {len(used)} GPUs, torch sees {count}{_visible()}")
        missing = [str(g) for g in used if not 0 <= g < count]
        if missing:
            raise LaunchError(f"--gpus {gpus}: no GPU {','.join(missing)}; torch sees {count} "
                              f"(ids 0..{count - 1}{_visible()})")


DEFAULT_TIMEOUT_S = 300.0  # --dist_timeout: longest wait of one rank for the others in a collective


class RankFailure(RuntimeError):
    """A spawned rank died (``signal_name``), exited non-zero (``exit_code``) or raised (``traceback``).

    Raised by :func:`launch` once every rank has ended. ``tracebacks`` holds every rank's
    traceback (empty where none), for the user-error line of any rank.
    """

    def __init__(self, rank: int, exit_code: int | None = None, signal_name: str | None = None,
                 traceback: str = "", tracebacks: list[str] | None = None, peer_lost: bool = False) -> None:
        self.rank, self.exit_code, self.signal_name = rank, exit_code, signal_name
        self.traceback = traceback
        self.tracebacks = tracebacks or []
        self.peer_lost = peer_lost
        if signal_name:
            what = f"was killed by {signal_name}"
        elif peer_lost:
            what = "lost contact with the other ranks (one stopped answering within --dist_timeout)"
        elif exit_code is not None:
            what = f"exited with code {exit_code}"
        else:
            what = "failed"
        super().__init__(f"rank {rank} {what}")

    def describe(self) -> str:
        """``rank R was killed by SIGKILL (possibly out of memory)`` and the like."""
        text = str(self)
        if self.signal_name == "SIGKILL":
            text += " (possibly out of memory)"
        return text


class PeerLost(RuntimeError):
    """This rank lost contact with the process group (a peer died, hung or timed out)."""


EXIT_PEER_LOST = 75  # exit code of a spawned rank whose peer failed (not itself the cause)

# How gloo / NCCL / the store report a peer that died or stopped answering (plain RuntimeErrors
# from the transport, DistErrors from the store and the NCCL watchdog).
_PEER_FAILURE = re.compile(
    r"Connection closed by peer|Connection reset by peer|Broken pipe|Connection refused|connectFullMesh"
    r"|[Tt]imed out|[Tt]imeout|NCCL (?:error|communicator was aborted)|remote process exited|ProcessGroup.*(?:abort|shut)",
)


def peer_failure(exc: BaseException) -> PeerLost | None:
    """``exc`` as a :class:`PeerLost` if it says another rank died or stopped answering."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    if isinstance(exc, PeerLost):
        return exc
    if isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError) and _PEER_FAILURE.search(str(exc))):
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return PeerLost(first[:300])
    return None


def _signal_name(code: int | None) -> str | None:
    """``SIGKILL`` for an exit code of -9, ``None`` for a normal exit."""
    if code is None or code >= 0:
        return None
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


class _TextOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain data only (a traceback is a ``str``): any class or function is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_traceback(path: str) -> str:
    """The traceback text a spawned rank left in its error file (a pickled ``str``)."""
    try:
        with open(path, "rb") as fh:
            text = _TextOnlyUnpickler(fh).load()
    except (OSError, EOFError, pickle.UnpicklingError):
        return ""
    return text if isinstance(text, str) else ""


class RanksStopped(RuntimeError):
    """Every spawned rank stopped on a signal after saving (exit code :data:`utils.signals.EXIT_STOPPED`)."""

    def __init__(self, signal_name: str) -> None:
        self.signal_name = signal_name
        super().__init__(f"every rank stopped on {signal_name} after saving")


def _join_spawned(ctx: Any, grace_s: float = 10.0) -> None:
    """Wait for every spawned rank; on the first failure stop the others and raise :class:`RankFailure`.

    The culprit is decided from the exit codes seen *before* the others are stopped: a rank
    killed by a signal (out-of-memory killer, a user) is preferred over a rank that exited
    because it lost its peers (:data:`EXIT_PEER_LOST`).
    """
    import multiprocessing.connection

    procs = ctx.processes
    sentinels = {p.sentinel: i for i, p in enumerate(procs)}
    failed = None
    while sentinels and failed is None:
        for sentinel in multiprocessing.connection.wait(list(sentinels)):
            i = sentinels.pop(sentinel)
            procs[i].join()
            if procs[i].exitcode not in (0, signals.EXIT_STOPPED) and failed is None:
                failed = i
    if failed is None:
        if any(p.exitcode == signals.EXIT_STOPPED for p in procs):  # every rank saved after a stop request
            raise RanksStopped(signals.requested() or "a signal to the ranks")
        return
    seen = [p.exitcode for p in procs]  # None: still running when the failure was seen
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(grace_s)
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join()
    tracebacks = [_read_traceback(path) for path in ctx.error_files]
    killed = [i for i, code in enumerate(seen) if code is not None and code < 0]
    failing = [i for i, code in enumerate(seen) if code not in (None, 0, EXIT_PEER_LOST)]
    if killed:
        failed = killed[0]
    elif failing and failed not in failing:
        failed = failing[0]
    code = seen[failed]
    if code == EXIT_PEER_LOST:
        raise RankFailure(failed, code, None, "", tracebacks, peer_lost=True)
    raise RankFailure(failed, code, _signal_name(code), tracebacks[failed], tracebacks)


def launch(worker: Callable[[int, Any], None], args: Any) -> None:
    """Run ``worker(spawn_rank, args)`` once per process.

    * ``torchrun`` or ``srun`` (:func:`launcher`): this process is one rank.
    * ``--dist``: spawn one process per entry of ``--gpus`` on a free loopback port. When a rank
      fails, the others are stopped (SIGTERM) and :class:`RankFailure` names the rank. The stop
      signals this process gets are passed on to the ranks (:func:`utils.signals.forward_to`);
      when every rank stopped after saving, :class:`RanksStopped`.
    * otherwise: a single process (first GPU of ``--gpus``, or the CPU with ``--cpu``).
    """
    if launcher(args) != "dist" or len(args.gpus) == 1:
        worker(-1, args)  # init_distributed checks the GPUs it asks for
        return
    check_devices(args, "dist")  # before any rank is spawned
    args.dist_url = f"tcp://127.0.0.1:{find_free_port()}"
    if not args.debug:
        # A killed rank cannot release its semaphores; the resource tracker cleans them up and
        # says so on stderr. Its own process inherits this filter (it takes the -W flags).
        rule = "ignore::UserWarning:multiprocessing.resource_tracker"
        if rule not in sys.warnoptions:
            sys.warnoptions.append(rule)
    ctx = mp.start_processes(worker, args=(args,), nprocs=len(args.gpus), join=False, start_method="spawn")
    signals.forward_to([p.pid for p in ctx.processes])
    try:
        _join_spawned(ctx)
    finally:
        signals.forward_to([])


def die_with_parent(_worker_id: int = 0) -> None:
    """``worker_init_fn`` of DataLoaders: SIGKILL this process when its parent (the rank) dies.

    Without it the workers of a killed rank live on for seconds, holding the rank's sockets and
    its launcher's exit pipe open, so neither the peers nor ``mp.spawn`` see the death. Linux only.
    """
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _store_for_attempt(rank: int, world: int, timeout: datetime.timedelta):
    """The ``env://`` store, under a prefix naming the torchrun restart on a single node.

    torchrun keeps one TCPStore for the whole job (its agent's) and every restarted group
    writes the same keys as the one before. gloo then may read a dead worker's address left by
    the previous attempt when the restarted peer has not yet replaced it: ``Gloo
    connectFullMesh failed ... Connection refused``, while the other ranks wait for it. A
    prefix per restart keeps each attempt's keys apart. On several nodes each agent counts its
    own restarts (a node restarted for another node's failure does not count it), so the count
    is not a safe common name there and the store is used as torch gives it.
    """
    store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timeout))
    store.set_timeout(timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or os.environ.get("GROUP_WORLD_SIZE", "1") != "1":
        return store
    return dist.PrefixStore(f"decouplenet/attempt_{attempt}", store)


def init_distributed(spawn_rank: int, args: Any) -> DistEnv:
    """Initialise the process group for this process and pick its device.

    NCCL on CUDA, gloo on the CPU. ``spawn_rank`` is -1 for torchrun, srun or single-process
    runs, whose launch environment and GPUs are checked first (:func:`launcher`,
    :func:`check_devices`: :class:`LaunchError`, one line).
    Under ``torchrun`` and with ``--dist`` a process group is created whatever the number of
    ranks: a one-GPU ``--dist`` run (one process, as the original's ``mp.spawn`` of one rank) or
    ``torchrun --nproc_per_node 1`` runs the DDP wrapper and every collective, as the original
    always does. A plain single process (neither) has no process group.
    """
    kind = "dist" if spawn_rank >= 0 else launcher(args)
    if spawn_rank < 0:  # a spawned rank's GPUs were checked before it was spawned
        check_devices(args, kind)
    use_cuda = cuda_usable() and not args.cpu
    task = slurm.srun_task() if kind == "srun" else None
    if kind == "torchrun":
        rank = int(os.environ["RANK"])
        world = int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
        init_method: str | None = "env://"
    elif task is not None:  # an srun task: rendezvous at the first node, on the job's port
        rank, world, local = task.rank, task.world_size, task.local_rank
        init_method = task.init_method
    elif spawn_rank >= 0:
        rank, world, local = spawn_rank, len(args.gpus), spawn_rank
        init_method = args.dist_url
    elif args.dist:  # --dist with one entry in --gpus: this process is the one rank
        rank, world, local = 0, 1, 0
        init_method = f"tcp://127.0.0.1:{find_free_port()}"
    else:
        rank, world, local = 0, 1, 0
        init_method = None
    if use_cuda:
        # torchrun: LOCAL_RANK indexes the visible devices; srun: SLURM_LOCALID does, unless each
        # task sees its own one GPU (--gpus-per-task=1); spawned or single: the --gpus entry
        if kind == "torchrun":
            gpu = local
        elif kind == "srun":
            gpu = 0 if torch.cuda.device_count() == 1 else local
        else:
            gpu = args.gpus[local]
        device = torch.device("cuda", gpu)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if init_method is not None:
        timeout = datetime.timedelta(seconds=float(args.dist_timeout or DEFAULT_TIMEOUT_S))
        backend = "nccl" if use_cuda else "gloo"
        if init_method == "env://":
            store = _store_for_attempt(rank, world, timeout)
            dist.init_process_group(backend=backend, store=store, world_size=world, rank=rank, timeout=timeout)
        else:
            dist.init_process_group(backend=backend, init_method=init_method, world_size=world, rank=rank,
                                    timeout=timeout)
    return DistEnv(rank=rank, world_size=world, local_rank=local, device=device, group=init_method is not None,
                   launcher=kind)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def abandon() -> None:
    """After a failed collective: forget the process group without talking to the peers.

    ``destroy_process_group`` may wait on the dead peers; the process is about to exit anyway.
    """
    if dist.is_available() and dist.is_initialized():
        with warnings.catch_warnings(), contextlib.suppress(Exception):  # the group is broken anyway
            warnings.simplefilter("ignore")
            dist.destroy_process_group()


class CollectiveDeviceError(RuntimeError):
    """A collective was handed a tensor that is not on the run's device (a bug of ours, not of the
    user's input: NCCL would reject it, gloo accepts it)."""


def _on(tensor_device: torch.device, device: torch.device) -> bool:
    return tensor_device.type == device.type and (device.index is None or tensor_device.index == device.index)


def check_collective(op: str, device: torch.device, tensor: torch.Tensor | None = None) -> None:
    """The device rule of every collective below, checked in every process, with or without a
    process group, so that a CPU run breaks it as loudly as a GPU run would.

    ``device`` is the run's device (``DistEnv.device``). A ``tensor`` must live there: NCCL, the
    backend on CUDA, takes only tensors of the rank's own GPU ("No backend type associated with
    device type cpu"), while gloo takes tensors anywhere, so a test suite that runs on the CPU
    with gloo would never see a count built as ``torch.tensor([n])`` without ``device=``. An
    object collective (``tensor`` None) on CUDA needs the rank's GPU to be the current CUDA
    device: NCCL carries the pickled bytes through it.
    """
    if tensor is not None:
        if not _on(tensor.device, device):
            raise CollectiveDeviceError(
                f"{op}: tensor on {tensor.device}, but the run's device is {device} (a collective takes tensors "
                f"on the run's device only; NCCL rejects any other)")
    elif device.type == "cuda" and torch.cuda.current_device() != device.index:
        raise CollectiveDeviceError(
            f"{op}: the current CUDA device is cuda:{torch.cuda.current_device()}, but the run's device is {device}")


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """In-place sum over ranks (no-op in a single process); ``tensor`` on the run's ``device``."""
    check_collective("all_reduce_sum", device, tensor)
    if _initialized():
        dist.all_reduce(tensor)
    return tensor


def all_reduce_mean(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """In-place mean over ranks (no-op in a single process); ``tensor`` on the run's ``device``."""
    check_collective("all_reduce_mean", device, tensor)
    if _initialized():
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


def barrier(device: torch.device) -> None:
    """Wait for every rank. Under NCCL on the rank's own GPU (``device_ids``): without it NCCL
    guesses the GPU from the rank number, which is wrong with ``--gpus 2,3``."""
    check_collective("barrier", device)
    if _initialized():
        if device.type == "cuda" and dist.get_backend() == "nccl":
            dist.barrier(device_ids=[device.index])
        else:
            dist.barrier()


def _device_tensors(obj: Any, path: str = "") -> Iterator[str]:
    """Where ``obj`` (plain containers) holds a tensor that is not on the CPU."""
    if isinstance(obj, torch.Tensor):
        if obj.device.type != "cpu":
            yield f"{path or 'object'} on {obj.device}"
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _device_tensors(v, f"{path}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _device_tensors(v, f"{path}[{i}]")


def gather_to_main(obj: Any, device: torch.device) -> list[Any] | None:
    """Every rank's ``obj`` as a list on rank 0 (``None`` on the others); ``[obj]`` without a
    process group. With a group of one rank it still goes through ``gather_object``.

    Objects travel pickled, so their tensors must be on the CPU (a CUDA tensor would be
    unpickled onto rank 0's GPU of the same index, or fail where it has none); ``device`` is the
    run's device, which NCCL carries the bytes through (:func:`check_collective`).
    """
    check_collective("gather_to_main", device)
    for where in _device_tensors(obj):
        raise CollectiveDeviceError(f"gather_to_main: {where}; objects travel pickled, keep their tensors on the CPU")
    if _initialized():
        out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(obj, out, dst=0)
        return out
    return [obj]
