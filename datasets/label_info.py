"""Reading and writing ``gtav_label_info.p`` safely (docs/METHOD.md section 1).

The file is a pickle of ``(label_to_file, file_to_label)``: ``label_to_file[c]`` lists
the label file names that contain train id ``c`` and ``file_to_label[name]`` lists the
train ids present in ``name``. Pickles can run arbitrary code on load, so we read them
with an unpickler that only rebuilds plain containers, strings, numbers and the NumPy
arrays / scalars such files may hold.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from utils.files import atomic_open

from .errors import DatasetError
from .labels import encode_labels

# (module, name) pairs the restricted unpickler may resolve. Builtin containers and
# numbers mostly come from pickle opcodes; these are the extra globals they or NumPy
# arrays / scalars need (numpy 1.x uses ``numpy.core``, numpy 2.x ``numpy._core``).
_ALLOWED_BUILTINS = frozenset(
    {"list", "dict", "tuple", "set", "frozenset", "str", "int", "float", "bool",
     "bytes", "bytearray", "complex"}
)
_NUMPY_GLOBALS = {
    ("numpy", "ndarray"): ("ndarray",),
    ("numpy", "dtype"): ("dtype",),
    ("numpy.core.multiarray", "_reconstruct"): ("multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): ("multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"): ("multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"): ("multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"): ("numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"): ("numeric", "_frombuffer"),
}


def _numpy_global(path: tuple[str, ...]) -> Any:
    """Resolve an allowed NumPy global without importing deprecated module aliases."""
    if path[0] == "multiarray":
        try:
            from numpy._core import multiarray as mod
        except ImportError:  # numpy < 2
            from numpy.core import multiarray as mod  # type: ignore[no-redef]
        return getattr(mod, path[1])
    if path[0] == "numeric":
        try:
            from numpy._core import numeric as mod
        except ImportError:  # numpy < 2
            from numpy.core import numeric as mod  # type: ignore[no-redef]
        return getattr(mod, path[1])
    return getattr(np, path[0])


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global except plain data and NumPy arrays."""

    def __init__(self, file: io.BufferedIOBase, source: str) -> None:
        super().__init__(file, encoding="latin1")
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if module in ("builtins", "__builtin__") and name in _ALLOWED_BUILTINS:
            import builtins

            return getattr(builtins, name)
        if module == "_codecs" and name == "encode":
            # Bytes pickled with protocol < 3 (e.g. NumPy array buffers) use this.
            import _codecs

            return _codecs.encode
        if (module, name) in _NUMPY_GLOBALS:
            return _numpy_global(_NUMPY_GLOBALS[(module, name)])
        raise pickle.UnpicklingError(
            f"{self._source}: refusing to load '{module}.{name}' from a label-info "
            "pickle (only lists, dicts, strings, numbers and NumPy arrays are allowed)"
        )


def _as_int_list(value: Any, path: str, name: Any) -> list[int]:
    """Class ids of one file as a plain list of ints."""
    if isinstance(value, np.ndarray):
        value = value.reshape(-1).tolist()
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple, set, frozenset)):
        raise DatasetError(
            f"{path}: file_to_label[{name!r}] should be a list of class ids, "
            f"got {type(value).__name__}"
        )
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise DatasetError(
                f"{path}: file_to_label[{name!r}] holds a non-integer class id {v!r}"
            )
        out.append(int(v))
    return sorted(out) if isinstance(value, (set, frozenset)) else out


def _as_name_list(value: Any, path: str, cls: Any) -> list[str]:
    """File names of one class as a plain list of str."""
    if isinstance(value, np.ndarray):
        value = value.reshape(-1).tolist()
    if not isinstance(value, (list, tuple)):
        raise DatasetError(
            f"{path}: label_to_file[{cls!r}] should be a list of file names, "
            f"got {type(value).__name__}"
        )
    out = []
    for v in value:
        if isinstance(v, np.str_):
            v = str(v)
        if not isinstance(v, str):
            raise DatasetError(
                f"{path}: label_to_file[{cls!r}] holds a non-string entry {v!r}"
            )
        out.append(v)
    return out


def _validate(obj: Any, path: str) -> tuple[list[list[str]], dict[str, list[int]]]:
    """Check the structure of a loaded label-info object and normalise it."""
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise DatasetError(
            f"{path}: expected a pickled tuple (label_to_file, file_to_label), "
            f"got {type(obj).__name__}"
            + (f" of length {len(obj)}" if isinstance(obj, (tuple, list)) else "")
        )
    raw_l2f, raw_f2l = obj
    if isinstance(raw_l2f, Mapping):
        try:
            by_id = {int(k): k for k in raw_l2f}
        except (TypeError, ValueError):
            raise DatasetError(
                f"{path}: label_to_file is a dict whose keys are not class ids"
            ) from None
        int_keys = sorted(by_id)
        keys = [by_id[k] for k in int_keys]
        if int_keys != list(range(len(int_keys))):
            raise DatasetError(
                f"{path}: label_to_file keys should be the class ids 0..C-1, got "
                f"{int_keys}"
            )
        label_to_file = [_as_name_list(raw_l2f[k], path, k) for k in keys]
    elif isinstance(raw_l2f, Sequence) and not isinstance(raw_l2f, (str, bytes)):
        label_to_file = [_as_name_list(v, path, c) for c, v in enumerate(raw_l2f)]
    else:
        raise DatasetError(
            f"{path}: label_to_file should be a list (or dict) of per-class file lists, "
            f"got {type(raw_l2f).__name__}"
        )
    if not isinstance(raw_f2l, Mapping):
        raise DatasetError(
            f"{path}: file_to_label should be a dict, got {type(raw_f2l).__name__}"
        )
    file_to_label: dict[str, list[int]] = {}
    for name, ids in raw_f2l.items():
        if isinstance(name, np.str_):
            name = str(name)
        if not isinstance(name, str):
            raise DatasetError(f"{path}: file_to_label has a non-string key {name!r}")
        file_to_label[name] = _as_int_list(ids, path, name)
    num_classes = len(label_to_file)
    for cls, names in enumerate(label_to_file):
        for name in names:
            if name not in file_to_label:
                raise DatasetError(
                    f"{path}: {name!r} is listed for class {cls} in label_to_file but "
                    "missing from file_to_label"
                )
    for name, ids in file_to_label.items():
        bad = [i for i in ids if not 0 <= i < num_classes]
        if bad:
            raise DatasetError(
                f"{path}: file_to_label[{name!r}] has class ids {bad} outside "
                f"0..{num_classes - 1}"
            )
    return label_to_file, file_to_label


def load_label_info(
    path: str | os.PathLike[str],
) -> tuple[list[list[str]], dict[str, list[int]]]:
    """Load ``gtav_label_info.p`` safely and return ``(label_to_file, file_to_label)``.

    ``label_to_file`` comes back as a list (one list of names per class) and
    ``file_to_label`` as a dict of name -> list of int, whatever container types the
    pickle used. Raises :class:`DatasetError` naming the file when it is missing,
    not a valid pickle, holds anything but plain data, or has the wrong structure.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: label-info file not found (gtav_label_info.p)")
    try:
        with open(path, "rb") as f:
            obj = _RestrictedUnpickler(f, path).load()
    except pickle.UnpicklingError as e:
        msg = str(e)
        if msg.startswith(path):
            raise DatasetError(msg) from None
        raise DatasetError(f"{path}: not a valid label-info pickle ({msg})") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            OverflowError, UnicodeDecodeError, ImportError, MemoryError) as e:
        raise DatasetError(
            f"{path}: garbled label-info pickle ({type(e).__name__}: {e})"
        ) from None
    return _validate(obj, path)


def save_label_info(
    path: str | os.PathLike[str],
    label_to_file: Sequence[Sequence[str]],
    file_to_label: Mapping[str, Sequence[int]],
) -> None:
    """Write ``(label_to_file, file_to_label)`` as the original's pickle, atomically.

    ``label_to_file`` is stored as a list of lists of str and ``file_to_label`` as a
    dict of str -> list of int. Written by :func:`utils.files.atomic_open`: never a partial file
    under ``path``, and an ordinary new file's mode (0666 minus the umask: 0644 under umask 022).
    """
    path = os.fspath(path)
    l2f = [[str(n) for n in names] for names in label_to_file]
    f2l = {str(k): [int(i) for i in v] for k, v in file_to_label.items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_open(path) as f:
        pickle.dump((l2f, f2l), f, protocol=4)


def label_info_from_folder(
    labels_dir: str | os.PathLike[str],
    num_classes: int = 19,
    names: Sequence[str] | None = None,
) -> tuple[list[list[str]], dict[str, list[int]]]:
    """Build ``(label_to_file, file_to_label)`` from a folder of label-id PNGs.

    Each label is encoded to train ids (docs/METHOD.md section 1); a file is listed under every
    train id it contains. ``names`` restricts (and orders) the files; default: every
    ``.png`` in the folder, sorted.
    """
    from PIL import Image


    labels_dir = os.fspath(labels_dir)
    if not os.path.isdir(labels_dir):
        raise DatasetError(f"{labels_dir}: labels folder not found")
    if names is None:
        names = sorted(n for n in os.listdir(labels_dir) if n.endswith(".png"))
    label_to_file: list[list[str]] = [[] for _ in range(num_classes)]
    file_to_label: dict[str, list[int]] = {}
    for name in names:
        fpath = os.path.join(labels_dir, name)
        try:
            with Image.open(fpath) as im:
                ids = np.asarray(im)
        except (OSError, ValueError) as e:
            raise DatasetError(f"{fpath}: cannot read label ({e})") from None
        present = np.unique(encode_labels(ids, num_classes))
        classes = [int(c) for c in present if c < num_classes]
        file_to_label[name] = classes
        for c in classes:
            label_to_file[c].append(name)
    return label_to_file, file_to_label
