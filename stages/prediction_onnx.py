"""The ONNX back end of ``predict.py --onnx`` (docs/INFERENCE.md): a model of ``export.py`` on
onnxruntime, the test-time augmentation and upsampling in NumPy. No torch import.

The rule is :func:`utils.tta.combine_passes`, as for PyTorch; the NumPy operations are those of
``F.interpolate(mode="bilinear", align_corners=True)`` (the size of a rescale:
:func:`utils.tta.scaled_size`), ``torch.flip`` along the width and the softmax over the classes.
The model's stride-8 logits (``logits_stride8``) are upsampled to each image's own size, as the
PyTorch path does, so both give the same predictions up to float rounding.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from engine.options import TGT_IMG_SIZE, parse_size
from utils.tta import TTAOps, combine_passes, scaled_size

# The names export.py gives the model's input and outputs (stages/export.py).
INPUT_NAME = "image"
LOGITS = "logits"  # [N, C, H, W] at the input size
LOGITS_STRIDE8 = "logits_stride8"  # [N, C, ceil(H/8), ceil(W/8)], what the upsampling reads
LABEL = "label"  # [N, H, W] int64 argmax of the logits (export.py --argmax)


class OnnxModelError(ValueError):
    """The ``--onnx`` model cannot be used (missing, unreadable, or not of export.py's form)."""


USER_ERRORS = (OnnxModelError,)


def _taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weight of each output index of a linear resize with
    ``align_corners=True`` (PyTorch's rule: ``src = i * (n_in - 1) / (n_out - 1)`` in float32)."""
    scale = np.float32(n_in - 1) / np.float32(n_out - 1) if n_out > 1 else np.float32(0)
    src = np.arange(n_out, dtype=np.float32) * scale
    i0 = np.minimum(src.astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0).astype(np.float32)


def resize_bilinear(x: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """``F.interpolate(x, size=hw, mode="bilinear", align_corners=True)`` of a float32
    ``[N, C, H, W]`` array, in NumPy (up to float rounding)."""
    out_h, out_w = int(hw[0]), int(hw[1])
    if x.shape[-2:] == (out_h, out_w):
        return x
    i0, i1, a = _taps(x.shape[-2], out_h)
    x = x[..., i0, :] * (1 - a)[:, None] + x[..., i1, :] * a[:, None]
    j0, j1, b = _taps(x.shape[-1], out_w)
    return x[..., j0] * (1 - b) + x[..., j1] * b


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over axis 1 (the classes)."""
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


NUMPY_TTA_OPS = TTAOps(rescale=lambda x, s: resize_bilinear(x, scaled_size(x.shape[-2:], s)),
                       upsample=lambda y, hw: resize_bilinear(y.astype(np.float32, copy=False), hw),
                       mirror=lambda t: t[..., ::-1], softmax=softmax)


def to_network_input(images: np.ndarray) -> np.ndarray:
    """uint8 ``[N, H, W, 3]`` RGB -> float32 ``[N, 3, H, W]`` in [0, 1], as
    ``datasets.loader.to_device_image`` gives the network (no mean or std)."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255.0)


class OnnxPredictor:
    """``predict(images, out_hw)`` with an ONNX model of export.py on onnxruntime.

    ``model``: the file (or its bytes). ``size``: ``(W, H)`` the images are resized to; a model
    exported without ``--dynamic`` takes only its own size (and no other scale than 1.0), and
    gives it when ``size`` is ``None``. ``default_size``: the size of a dynamic model when
    ``size`` is ``None``. ``cpu``: onnxruntime's CPU provider even when the CUDA one is there.
    """

    def __init__(self, model: str | bytes, size: tuple[int, int] | None, default_size: tuple[int, int],
                 scales: tuple[float, ...] = (1.0,), flip: bool = False, cpu: bool = False,
                 threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise OnnxModelError("--onnx: onnxruntime is not installed (pip install -r requirements-onnx.txt)") from None
        name = model if isinstance(model, str) else "the model"
        providers = ["CPUExecutionProvider"]
        if not cpu and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(model, sess_options=options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime's errors (InvalidProtobuf, Fail, ...) are plain Exceptions
            raise OnnxModelError(f"--onnx {name}: cannot load the model ({str(exc).splitlines()[0]})") from None
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        if INPUT_NAME not in inputs or (LOGITS_STRIDE8 not in outputs and LOGITS not in outputs):
            raise OnnxModelError(f"--onnx {name}: not a model of export.py (input {INPUT_NAME!r}, output "
                                 f"{LOGITS_STRIDE8!r} or {LOGITS!r}); it has inputs {sorted(inputs)}, "
                                 f"outputs {sorted(outputs)}")
        self.output = LOGITS_STRIDE8 if LOGITS_STRIDE8 in outputs else LOGITS
        classes = outputs[self.output].shape[1]
        if not isinstance(classes, int) or classes not in (19, 16, 13):
            raise OnnxModelError(f"--onnx {name}: {classes} output classes; expected 19, 16 or 13")
        self.num_classes = classes
        height, width = inputs[INPUT_NAME].shape[2:]
        self.dynamic = not (isinstance(height, int) and isinstance(width, int))
        if not self.dynamic:
            if size is not None and tuple(size) != (width, height):
                raise OnnxModelError(f"--size {size[0]},{size[1]}: {name} takes {width}x{height} images only "
                                     f"(exported without --dynamic); give --size {width},{height} or none")
            if any(s != 1.0 for s in scales):
                raise OnnxModelError(f"--scales: {name} takes {width}x{height} images only (exported without "
                                     "--dynamic); export it with --dynamic for other scales")
            size = (width, height)
        self.size = tuple(size or default_size)
        self.scales, self.flip = tuple(scales), bool(flip)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """The model's logits (``logits_stride8``, else ``logits``) of a float32 NCHW batch."""
        return self.session.run([self.output], {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def predict(self, images: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
        prob = combine_passes(to_network_input(images), tuple(out_hw), self.forward, NUMPY_TTA_OPS,
                              scales=self.scales, flip=self.flip)
        return prob.argmax(1).astype(np.uint8)


def make_predictor(args: argparse.Namespace) -> OnnxPredictor:
    """The predictor of ``predict.py --onnx``."""
    if not os.path.isfile(args.onnx):
        raise OnnxModelError(f"--onnx {args.onnx}: file not found")
    predictor = OnnxPredictor(args.onnx, args.size, parse_size(TGT_IMG_SIZE, "--size"), args.scales, args.flip,
                              args.cpu)
    if args.num_classes is not None and args.num_classes != predictor.num_classes:
        raise OnnxModelError(f"--num-classes {args.num_classes}: {args.onnx} has {predictor.num_classes} classes")
    return predictor
