"""Shared test helpers: the deterministic "filled" weights of the parity fixtures, paths."""

from __future__ import annotations

import hashlib
import os
import zlib
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARITY = os.path.join(REPO, "tests", "data", "parity")


def filled_tensor(group: str, key: str, like: torch.Tensor) -> torch.Tensor:
    """The value of ``group/key`` under the fill rule of tests/data/parity/README.md."""
    if not like.is_floating_point():
        return like.clone()
    rng = np.random.default_rng(zlib.crc32(f"{group}/{key}".encode()))
    shape = tuple(like.shape)
    if key.endswith("running_var"):
        arr = rng.uniform(0.5, 1.5, shape)
    elif len(shape) == 4:
        arr = rng.standard_normal(shape) * np.sqrt(1.0 / (shape[1] * shape[2] * shape[3]))
    elif key.endswith("weight"):
        arr = rng.uniform(0.5, 1.5, shape)
    else:
        arr = rng.standard_normal(shape) * 0.1
    return torch.from_numpy(np.asarray(arr, dtype=np.float32))


def filled_state(group: str, state: dict) -> OrderedDict:
    return OrderedDict((k, filled_tensor(group, k, v)) for k, v in state.items())


def filled_phase1_checkpoint(net) -> dict:
    """An official phase-1 checkpoint dict of ``net``'s layout holding the filled weights."""
    official = net.official_state(phase=1)
    return OrderedDict(
        (name, filled_state(name[: -len("_state_dict")], sd)) for name, sd in official.items()
    )


def filled_sourceonly_checkpoint(layer: int = 1, num_classes: int = 19) -> dict:
    """Source-only format: backbone = the model_B2 and model_B fills (parity README, phase1_step)."""
    from model import DecoupleNet
    from model.decouplenet import RESNET_CHILDREN

    net = DecoupleNet(num_classes=num_classes, layer=layer, decoupled=False, aux=False)
    official = net.official_state(phase=2)
    split = 4 + layer
    backbone = OrderedDict()
    for group, offset in (("model_B2", 0), ("model_B", split)):
        for key, value in filled_state(group, official[f"{group}_state_dict"]).items():
            idx, _, rest = key.partition(".")
            backbone[f"backbone.{RESNET_CHILDREN[int(idx) + offset]}.{rest}"] = value
    return {
        "model_state_dict": backbone,
        "head_state_dict": filled_state("head", official["head_state_dict"]),
        "classifier_state_dict": filled_state("classifier", official["classifier_state_dict"]),
    }


def filled_full_phase1_checkpoint(layer: int = 1, num_classes: int = 19) -> dict:
    """A phase-1 checkpoint of ours with every group's own fill, the discriminators included
    (``model_B1`` ... ``aux_classifier``, ``D1``, ``D2``; parity README, ``phase1_step_adv``)."""
    from model import DecoupleNet, FCDiscriminator
    from model.decouplenet import STEM_CHANNELS

    ckpt = filled_phase1_checkpoint(DecoupleNet(num_classes=num_classes, layer=layer))
    ckpt["D1_state_dict"] = filled_state("D1", FCDiscriminator(STEM_CHANNELS[layer], ndf=32).state_dict())
    ckpt["D2_state_dict"] = filled_state("D2", FCDiscriminator(num_classes, ndf=64).state_dict())
    return ckpt


def well_conditioned(ckpt: dict) -> dict:
    """Multiply every bottleneck's ``bn3.weight`` by 0.1 in float32, in place (the start of the
    ``phase1_step_wc``, ``phase1_step_adv`` and ``phase2_step`` fixtures); returns ``ckpt``."""
    for state in ckpt.values():
        for key, value in state.items():
            if key.endswith("bn3.weight"):
                value.mul_(0.1)
    return ckpt


def with_module_prefix(ckpt: dict) -> OrderedDict:
    """``ckpt`` with ``module.`` before every key, as the original's DDP-wrapped parts save them."""
    return OrderedDict((group, OrderedDict((f"module.{k}", v) for k, v in state.items()))
                       for group, state in ckpt.items())


# Cityscapes label id of train ids 0..18 (cityscapesScripts helpers/labels.py); other ids are ignored.
LABEL_ID_OF_TRAIN_ID = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)


def miou_by_hand(label_ids: list[np.ndarray], preds: list[np.ndarray]) -> float:
    """The original's validation mIoU, written out independently of ``utils.metrics``: per train id,
    the sum over images of intersections / (the sum of unions + 1e-10), mean over the 19 classes.
    ``label_ids`` are Cityscapes label-id images, ``preds`` train-id predictions; pixels whose label
    id is not one of the 19 do not count."""
    inter, union = np.zeros(19), np.zeros(19)
    for ids, pred in zip(label_ids, preds):
        gt = np.full(ids.shape, -1)
        for train_id, label_id in enumerate(LABEL_ID_OF_TRAIN_ID):
            gt[ids == label_id] = train_id
        valid = gt >= 0
        for k in range(19):
            inter[k] += np.sum((pred == k) & (gt == k))
            union[k] += np.sum(((pred == k) & valid) | (gt == k))
    return float(np.mean(inter / (union + 1e-10)))


def tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the tensorboard event files of ``folder``: ``{tag: [(step, value), ...]}`` in
    the order written. The records are read with tensorboardX's protobuf classes (TFRecord
    framing: 8-byte length, 4-byte length CRC, the ``Event``, 4-byte data CRC), so the test needs
    neither TensorFlow nor the tensorboard package."""
    import glob
    import struct

    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(glob.glob(os.path.join(os.fspath(folder), "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        while pos + 12 <= len(data):
            (size,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + size])
            pos += 12 + size + 4
            for value in event.summary.value:
                if value.WhichOneof("value") == "simple_value":
                    scalars.setdefault(value.tag, []).append((int(event.step), float(value.simple_value)))
    return scalars


def digest_state(obj: object) -> object:
    """``obj`` (nested dicts, lists, tensors, numbers) with every tensor replaced by (dtype, shape,
    SHA-256 of its bytes): two states are bit-identical exactly when their digests are equal, and
    ``tests.conftest.assert_same_state`` compares digests as it compares states. Tests keep the
    digests of checkpoints they compare later instead of the files (hundreds of MB each)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        return ("tensor", str(obj.dtype), tuple(obj.shape), hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest())
    if isinstance(obj, Mapping):
        return {k: digest_state(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [digest_state(v) for v in obj]
    return obj


def digest_and_remove(folder: Path, names: tuple[str, ...]) -> dict[str, object]:
    """``{name: digest_state(torch.load(folder / name))}`` for each of ``names`` that exists; the
    files are deleted (disk: tests/conftest.py)."""
    out = {}
    for name in names:
        path = Path(folder) / name
        if path.is_file():
            out[name] = digest_state(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
            path.unlink()
    return out
