"""The process-wide switches of torch a run sets: the CUDA backends (``--cudnn_benchmark``,
``--tf32``), applied by :mod:`engine.network` when the network goes to its GPU, and determinism
(``--deterministic``), applied in every process before it does any work (docs/RELIABILITY.md,
"What makes runs comparable").

``--deterministic`` (:func:`deterministic_environment` in the launching process, then
:func:`set_deterministic` in each rank):

* ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` in the environment before CUDA initialises and before any
  rank is spawned, so every rank inherits it (cuBLAS is deterministic only with a fixed
  workspace; ``:16:8`` given by the user is kept, any other value is replaced, with one line);
* ``torch.backends.cudnn.deterministic = True``, ``torch.backends.cudnn.benchmark = False``
  (with ``--cudnn_benchmark`` it is an error: autotuning picks algorithms by timing, so two runs
  may compute with different ones);
* ``torch.use_deterministic_algorithms(True, warn_only=True)``: the deterministic kernels where
  PyTorch has them (on CUDA: ``index_add`` of the metrics and thresholds, ``cumsum``,
  ``scatter_add``, the convolutions' backward), and a warning, not an error, for the ops this
  code uses on CUDA that have none: the backward of the bilinear upsampling of the logits
  (``upsample_bilinear2d_backward_out_cuda``) and the reduction of the 2-D cross entropy
  (``nll_loss2d_forward_out_cuda_template``). Strict mode would stop every GPU training run at
  its first iteration; so on GPUs a ``--deterministic`` run is not bit-reproducible, only closer
  to it. On the CPU every op the code uses is deterministic already (CPU runs are bit-identical
  without the flag); the flag then costs the filling of new tensors
  (``torch.utils.deterministic.fill_uninitialized_memory``).
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch

CUBLAS_VARIABLE = "CUBLAS_WORKSPACE_CONFIG"
CUBLAS_WORKSPACE = ":4096:8"
_CUBLAS_DETERMINISTIC = (":4096:8", ":16:8")  # the two values cuBLAS documents as reproducible


def backend_settings(tf32: str, cudnn_benchmark: bool) -> dict[str, bool | None]:
    """The CUDA backend flags a run sets (``None``: left as PyTorch has it, which is the original's).

    * ``cudnn_benchmark``: ``True`` with ``--cudnn_benchmark``; otherwise untouched (PyTorch's
      default, off: the original's line ``cudnn.benchmark = True`` is commented out).
    * ``cudnn_tf32`` / ``matmul_tf32``: ``--tf32 on`` allows TensorFloat-32 in both, ``off`` in
      neither; ``default`` leaves PyTorch's choice (convolutions TF32, matmuls float32).
    """
    allow = {"on": True, "off": False}.get(tf32)
    return {"cudnn_benchmark": True if cudnn_benchmark else None,
            "cudnn_tf32": allow, "matmul_tf32": allow}


def _describe_backends() -> str:
    deterministic = ", cuDNN deterministic" if torch.backends.cudnn.deterministic else ""
    # Reading the legacy flags raises when other code set them through the newer fp32_precision API.
    with contextlib.suppress(RuntimeError):
        return (f"cuDNN benchmark {'on' if torch.backends.cudnn.benchmark else 'off'}{deterministic}, TF32 "
                f"convolutions {'on' if torch.backends.cudnn.allow_tf32 else 'off'}, TF32 matmuls "
                f"{'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}")
    return f"cuDNN benchmark {'on' if torch.backends.cudnn.benchmark else 'off'}{deterministic}, TF32 set by other code"


def configure_backends(tf32: str, cudnn_benchmark: bool, device: torch.device) -> str | None:
    """Apply :func:`backend_settings` (``--tf32``, ``--cudnn_benchmark``) on a CUDA ``device``
    (process-wide flags); a no-op on the CPU.

    The legacy ``allow_tf32`` switches are used on every torch version: on torch 2.14 they give no
    deprecation warning, they exist on the oldest supported torch, and mixing them with the newer
    ``fp32_precision`` API makes later reads raise (inductor's convolution templates still read
    ``torch.backends.cudnn.allow_tf32``). Returns the resulting settings in words (``None`` on the CPU).
    """
    if device.type != "cuda":
        return None
    wanted = backend_settings(tf32, cudnn_benchmark)
    if wanted["cudnn_benchmark"] is not None:
        torch.backends.cudnn.benchmark = wanted["cudnn_benchmark"]
    if wanted["cudnn_tf32"] is not None:
        torch.backends.cudnn.allow_tf32 = wanted["cudnn_tf32"]
    if wanted["matmul_tf32"] is not None:
        torch.backends.cuda.matmul.allow_tf32 = wanted["matmul_tf32"]
    return _describe_backends()


def deterministic_environment(deterministic: bool) -> None:
    """``--deterministic``: ``CUBLAS_WORKSPACE_CONFIG`` for this process and the ranks it spawns.

    Call in the launching process before CUDA initialises (``main_entry`` does, before the ranks
    are spawned; under torchrun every rank is such a process). A value of the user's other than
    the two reproducible ones is replaced, with one ``warning:`` line on stderr.
    """
    if not deterministic:
        return
    given = os.environ.get(CUBLAS_VARIABLE)
    if given in _CUBLAS_DETERMINISTIC:
        return
    if given is not None:
        print(f"warning: --deterministic: {CUBLAS_VARIABLE}={given} is not one of the reproducible "
              f"{' '.join(_CUBLAS_DETERMINISTIC)}; using {CUBLAS_WORKSPACE}", file=sys.stderr)
    os.environ[CUBLAS_VARIABLE] = CUBLAS_WORKSPACE


def set_deterministic(deterministic: bool) -> None:
    """``--deterministic`` in this process: cuDNN deterministic without autotuning and
    ``torch.use_deterministic_algorithms(True, warn_only=True)`` (see the module docstring).
    ``CUBLAS_WORKSPACE_CONFIG`` is :func:`deterministic_environment`'s, called before. Without the
    flag nothing is changed (PyTorch's defaults, the original's)."""
    if not deterministic:
        return
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)
