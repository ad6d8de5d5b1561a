"""What makes two runs comparable: ``<stage>_env.json`` beside ``<stage>_args.json``
(docs/RELIABILITY.md, "What makes runs comparable").

The record (:func:`environment`) holds the git commit of the code and whether its tracked files
were modified, the versions of Python, NumPy, torch, torchvision, CUDA, cuDNN and NCCL, the GPUs
(one entry per rank), the world size and the number of nodes, whether deterministic algorithms
were on, and a fingerprint of every dataset root the run reads
(:func:`datasets.fingerprint.fingerprint`).

Importing this module does not import torch: ``datasets/get_thresholds.py``, which uses NumPy
only, writes the same record, with the versions of the torch installed (from the package
metadata) and ``torch_loaded: false`` (no CUDA, cuDNN or NCCL version: it does not use them).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from datasets.fingerprint import fingerprint
from utils.files import atomic_write

FORMAT = "decouplenet-env/1"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project's folder, not the cwd
_GIT_TIMEOUT_S = 10
_MAX_CHANGES = 50


def write_json(path: str, record: Mapping[str, Any]) -> None:
    """``record`` as indented JSON (sorted keys), written atomically."""
    atomic_write(path, lambda f: f.write(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n"), mode="w")


def args_record(args: Any) -> dict[str, Any]:
    """The parsed arguments as JSON values (tuples become lists)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}


def _git(*argv: str) -> str | None:
    try:
        proc = subprocess.run(["git", "-C", REPO, *argv], capture_output=True, text=True, timeout=_GIT_TIMEOUT_S,
                              check=False)
    except (OSError, subprocess.SubprocessError):  # no git, or it hangs
        return None
    return proc.stdout if proc.returncode == 0 else None


def git_state() -> dict[str, Any]:
    """``commit`` (``git rev-parse HEAD`` of the project's folder), ``modified`` (tracked files
    differ from it, staged or not) and ``changes`` (``git status --porcelain`` lines, at most
    50); all ``None`` without git or outside a repository. Untracked files are not counted:
    datasets, snapshots and soft labels often live inside the checkout."""
    head = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if head else None
    if head is None or status is None:
        return {"commit": None, "modified": None, "changes": None}
    changes = [line for line in status.splitlines() if line.strip()]
    return {"commit": head.strip(), "modified": bool(changes), "changes": changes[:_MAX_CHANGES]}


def _package_version(name: str) -> str | None:
    module = sys.modules.get(name)
    if module is not None and hasattr(module, "__version__"):
        return str(module.__version__)
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, Any]:
    """Python, NumPy, torch, torchvision; CUDA (of the torch build), cuDNN and NCCL when torch is
    loaded (``None`` where the build or the machine has none)."""
    out: dict[str, Any] = {"python": platform.python_version(), "numpy": _package_version("numpy"),
                           "torch": _package_version("torch"), "torchvision": _package_version("torchvision"),
                           "cuda": None, "cudnn": None, "nccl": None, "torch_loaded": "torch" in sys.modules}
    torch = sys.modules.get("torch")
    if torch is None:
        return out
    out["cuda"] = torch.version.cuda
    try:
        out["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except (RuntimeError, OSError):
        out["cudnn"] = None
    try:
        nccl = torch.cuda.nccl.version()
        out["nccl"] = ".".join(str(v) for v in nccl) if isinstance(nccl, tuple) else str(nccl)
    except (AttributeError, RuntimeError, OSError, TypeError):  # a CPU build, or no NCCL library
        out["nccl"] = None
    return out


def rank_record(rank: int, device: str) -> dict[str, Any]:
    """What one process contributes: its host, device, GPU name and compute capability, and the
    determinism in effect there (torch's switches and ``CUBLAS_WORKSPACE_CONFIG``)."""
    record: dict[str, Any] = {"rank": rank, "host": socket.gethostname(), "device": device, "gpu": None,
                              "capability": None, "deterministic": None, "deterministic_warn_only": None,
                              "cudnn_deterministic": None,
                              "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}
    torch = sys.modules.get("torch")
    if torch is None:
        return record
    if device.startswith("cuda"):
        record["gpu"] = torch.cuda.get_device_name(device)
        record["capability"] = ".".join(str(v) for v in torch.cuda.get_device_capability(device))
    record.update(deterministic=torch.are_deterministic_algorithms_enabled(),
                  deterministic_warn_only=torch.is_deterministic_algorithms_warn_only_enabled(),
                  cudnn_deterministic=bool(torch.backends.cudnn.deterministic))
    return record


def environment(stage: str, ranks: Sequence[Mapping[str, Any]], data: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The ``<stage>_env.json`` record from every rank's :func:`rank_record` (rank order) and the
    fingerprints ``data`` (role -> :func:`datasets.fingerprint.fingerprint`)."""
    gpus = [r["gpu"] for r in ranks if r["gpu"]]
    flags = [r["deterministic"] for r in ranks]
    return {
        "format": FORMAT,
        "stage": stage,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": list(sys.argv),
        "git": git_state(),
        "versions": versions(),
        "world_size": len(ranks),
        "nodes": len({r["host"] for r in ranks}),
        "gpu_count": len(gpus),
        "gpus": gpus,
        "deterministic": None if None in flags else all(flags),
        "ranks": list(ranks),
        "data": dict(data),
    }


def dataset_roots(args: Any) -> dict[str, tuple[str, str]]:
    """The dataset roots a script reads, role -> (root, kind): training reads the source
    (``--src_rootpath``, kind ``--src_dataset``) and the target (``--tgt_rootpath``);
    ``generate_soft_label.py`` and ``evaluate.py`` read the target only."""
    roots = {"target": (args.tgt_rootpath, "cityscapes")}
    if args.stage in ("phase1", "phase2", "source_only"):
        roots = {"source": (args.src_rootpath, args.src_dataset), **roots}
    return roots


def data_fingerprints(roots: Mapping[str, tuple[str, str]]) -> dict[str, dict[str, Any]]:
    """:func:`datasets.fingerprint.fingerprint` of every root of :func:`dataset_roots`."""
    return {role: fingerprint(root, kind) for role, (root, kind) in roots.items()}


def write_records(stem: str, args: Mapping[str, Any], env: Mapping[str, Any]) -> None:
    """``<stem>_args.json`` and ``<stem>_env.json``, each written atomically."""
    write_json(f"{stem}_args.json", args)
    write_json(f"{stem}_env.json", env)
