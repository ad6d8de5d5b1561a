"""Where would each tensor live on a GPU run? A simulation on the CPU, for the tests.

On the CPU the run's device (``env.device``) *is* the default device, so ``tensor.device`` cannot
tell a tensor placed on ``env.device`` from one placed by default: ``torch.tensor([n])`` without
``device=`` is on the CPU in both cases, and gloo all-reduces it without complaint, while NCCL
on a GPU run rejects it. :class:`Placement` tells them apart by following every tensor from its
creation, as a ``TorchFunctionMode`` that sees every torch call made while it is active. A tensor
is marked as *host-placed* (where a CUDA run would hold it: in host memory) when it is

* made from no tensor (``torch.tensor``, ``zeros``, ``arange``, ``from_numpy``, ...) without an
  explicit ``device=``, or with ``device="cpu"`` written out as a string;
* the result of ``.cpu()``, or of ``.to()`` towards ``"cpu"`` or a host-placed tensor;
* the result of an operation whose tensor inputs are all host-placed (a device tensor among
  them makes a device result, as CUDA does when a 0-dim host tensor meets a device tensor).

``.to(device)`` (a ``torch.device``, ``.cuda()``, or a device-placed tensor) makes a
device-placed tensor; an in-place operation or one returning its input keeps that input's
place; assigning ``param.data = t`` gives the parameter ``t``'s place. On the CPU ``.cpu()`` and
``.to(cpu)`` return their input itself; here they return a copy when the place changes, as a GPU
run would, so that reading a device tensor back to the host does not mark the device tensor.
Tensors the mode did not see made (before it started, or inside PyTorch's C++: gradients,
``nn.Parameter`` objects until ``module.to(device)``) have no place and do not count among an
operation's inputs; a collective check fails only on a host-placed tensor, so it errs on the
side of passing.

The same tracking counts **host syncs**: reading a device-placed tensor's values on the host
(``item``, ``tolist``, ``bool``/``float``/``int``, ``numpy``, ``.cpu()``, ``.to("cpu")``,
printing it) and operations whose output size depends on device values (``nonzero``,
``masked_select``, ``unique``, boolean-mask indexing), which a GPU run must wait for. Reading a
host-placed tensor, or one without a place, is not counted.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

_MARK = "_test_host_placed"
Tensor = torch.Tensor

_READS = {Tensor.item, Tensor.tolist, Tensor.__bool__, Tensor.__float__, Tensor.__int__, Tensor.__index__,
          Tensor.numpy, Tensor.__repr__, Tensor.__format__}
_DATA_DEPENDENT = {Tensor.nonzero, torch.nonzero, Tensor.masked_select, torch.masked_select, Tensor.unique,
                   torch.unique, torch.unique_consecutive, Tensor.unique_consecutive, torch.argwhere, Tensor.argwhere}
_NEW = {Tensor.new_tensor, Tensor.new_zeros, Tensor.new_ones, Tensor.new_full, Tensor.new_empty}


def place(t: Tensor) -> bool | None:
    """True: host-placed, False: device-placed, None: not seen made (see the module docstring)."""
    return getattr(t, _MARK, None)


def on_host(t: Tensor) -> bool:
    """Whether ``t`` was marked host-placed by a :class:`Placement` (see the module docstring)."""
    return place(t) is True


def on_device(t: Tensor) -> bool:
    return place(t) is False


def _mark(t: Any, host: bool | None) -> None:
    if isinstance(t, Tensor) and host is not None:
        try:
            setattr(t, _MARK, host)
        except (AttributeError, RuntimeError):  # a few internal tensor types take no attributes
            pass


def _device_arg(args: tuple, kwargs: dict) -> Any:
    """The target of ``.to(...)``: a device, a device string, a tensor, or None (dtype only)."""
    for a in (*args[1:], kwargs.get("device"), kwargs.get("other")):
        if isinstance(a, (torch.device, str, Tensor)):
            return a
    return None


def _caller() -> str:
    """``file:line`` of the nearest frame outside torch and this module (for the reports)."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if os.sep + "torch" + os.sep not in name and not name.endswith("placement.py"):
            return f"{os.path.relpath(name)}:{frame.f_lineno} ({frame.f_code.co_name})"
        frame = frame.f_back
    return "?"


class Placement(TorchFunctionMode):
    """Marks host-placed tensors and counts host syncs while active (``with Placement() as p:``).

    ``syncs``: one ``(what, caller)`` per host sync since the last :meth:`reset`, while
    ``counting`` is true (it is by default).
    """

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[tuple[str, str]] = []
        self.counting = True

    def reset(self) -> None:
        self.syncs = []

    def _sync(self, what: str) -> None:
        if self.counting:
            self.syncs.append((what, _caller()))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name == "__set__" and getattr(func, "__self__", None) is Tensor.data:  # p.data = t: p takes t's place
            _mark(args[0], place(args[1]))
            return func(*args, **kwargs)
        self_t = args[0] if args and isinstance(args[0], Tensor) else None
        if self_t is not None and on_device(self_t):
            if func in _READS or func in _DATA_DEPENDENT:
                self._sync(name)
            elif func is Tensor.__getitem__ and any(isinstance(i, Tensor) and i.dtype == torch.bool
                                                     for i in tree_flatten(args[1])[0]):
                self._sync("boolean-mask indexing")
        if func in (Tensor.cpu, Tensor.to, Tensor.cuda):
            target = _device_arg(args, kwargs) if func is Tensor.to else None
            if func is Tensor.cpu or (isinstance(target, str) and target.startswith("cpu")):
                host = True
            elif func is Tensor.cuda or isinstance(target, (torch.device, str)):
                host = False
            elif isinstance(target, Tensor):
                host = on_host(target)
            else:  # dtype or memory format only: stays where it is
                host = place(self_t)
            if host and on_device(self_t):
                self._sync("cpu" if func is Tensor.cpu else "to(host)")
            out = func(*args, **kwargs)
            if out is self_t and host is not None and place(self_t) is not host:
                out = self_t.clone()  # a GPU run returns a new tensor on the other side
            _mark(out, host)
            return out
        out = func(*args, **kwargs)
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)]
        if not outputs:
            return out
        if any(o is i for o in outputs for i in inputs):  # in place, or an input returned: keeps its place
            return out
        if func in _NEW or "device" in kwargs and kwargs["device"] is not None:
            device = kwargs.get("device")
            host = (isinstance(device, str) and device.startswith("cpu")) if device is not None else on_host(args[0])
        elif inputs:  # a device input makes a device result; unseen inputs do not count
            places = {place(t) for t in inputs}
            host = False if False in places else True if True in places else None
        else:  # made from no tensor and no device=: placed by default
            host = True
        for o in outputs:
            _mark(o, host)
        return out
