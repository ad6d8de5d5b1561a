"""``predict.py``: the target branch of a checkpoint, or of an exported ONNX model, on any images
or videos (docs/INFERENCE.md).

Each image is read and resized as evaluation reads Cityscapes val (PIL, bilinear, to ``--size``),
predicted with the same test-time augmentation (:func:`utils.tta.combine_passes`) and its logits
upsampled to the image's own size, as evaluation upsamples them to the label's; so the label PNGs
of a Cityscapes split are those of ``evaluate.py --save_dir`` with the same options. Per image:
``label/`` (train ids), ``color/`` (the palette), ``overlay/`` (the palette blended over the image);
per video: an overlay video of the same frame rate and size.

This module and everything it imports at the top are free of torch: with ``--onnx`` the
predictions run on onnxruntime and NumPy (``stages.prediction_onnx``) and PyTorch is never
loaded; without it ``stages.prediction_torch`` is imported when the network is built.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Protocol

import numpy as np
from PIL import Image
from tqdm import tqdm

from datasets.errors import DatasetError
from datasets.images import InputFile, find_inputs, open_rgb, open_video, resize_image, write_image
from datasets.labels import colorize, overlay
from engine.options import TGT_IMG_SIZE, OptionError, new_parser, parse_scales, parse_size
from stages import prediction_onnx
from utils.files import atomic_path

# The codec of an overlay video, by the input's extension; any other input is written as .mp4.
VIDEO_CODECS = {".avi": "MJPG", ".mkv": "MJPG", ".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v"}


class Predictor(Protocol):
    """What both back ends (``stages.prediction_torch``, ``stages.prediction_onnx``) provide."""

    num_classes: int
    size: tuple[int, int]  # (W, H) the images are resized to

    def predict(self, images: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
        """Train ids ``[N, h, w]`` uint8 of ``images`` (uint8 ``[N, H, W, 3]`` RGB, resized to
        :attr:`size`), the scores upsampled to ``out_hw`` = ``(h, w)``."""
        ...


class PredictionError(RuntimeError):
    """A user error of predict.py (a flag, a file); the message names it."""


def build_parser() -> argparse.ArgumentParser:
    """``predict.py``'s flags (docs/INFERENCE.md)."""
    p = new_parser("Predict with the target branch of a checkpoint (or an exported ONNX model) on images or "
                   "videos; writes label/ (train-id PNGs), color/ (Cityscapes palette) and overlay/ "
                   "(the palette over the image; videos: an overlay video)")
    g = p.add_argument_group("input and output")
    g.add_argument("--input", required=True,
                   help="an image, a folder (its images, searched recursively, in sorted order), a glob "
                        "pattern (quote it) or a video file that OpenCV reads")
    g.add_argument("--output", default="predictions", help="folder of label/, color/ and overlay/")
    g.add_argument("--alpha", type=float, default=0.5, help="opacity of the colours in overlay/")
    g = p.add_argument_group("model")
    g.add_argument("--resume", default="", help="checkpoint (ours or the original's, phase 1 or 2, source-only)")
    g.add_argument("--onnx", default="",
                   help="an ONNX model of export.py instead of --resume: runs on onnxruntime, without PyTorch")
    g.add_argument("--num-classes", dest="num_classes", type=int, default=None,
                   help="classes of the --resume network (default 19; an ONNX model has its own)")
    g.add_argument("--layer", type=int, default=1, choices=[0, 1, 2], help="--resume network: stem ends after this layer")
    g.add_argument("--hidden_dim", type=int, default=128, help="--resume network: channels of the ASPP head")
    g = p.add_argument_group("inference")
    g.add_argument("--size", default=None,
                   help=f"W,H the images are resized to, as evaluate.py's --tgt_img_size (default {TGT_IMG_SIZE}, "
                        "evaluate.py's default; an ONNX model exported without --dynamic: its own size). The "
                        "predictions are upsampled to each image's own size")
    g.add_argument("--scales", default="1.0", help="comma-separated test scales, e.g. 0.75,1.0,1.25")
    g.add_argument("--flip", action="store_true", help="average with the horizontally flipped image")
    g.add_argument("--batch_size", type=int, default=1,
                   help="images per forward (consecutive images of the same size; video frames)")
    g.add_argument("--inference_amp", choices=["off", "fp16", "bf16"], default="off",
                   help="--resume only: half-precision autocast of the forward (off = float32, as evaluate.py)")
    g.add_argument("--cpu", action="store_true", help="run on the CPU (default: the GPU when there is one)")
    g.add_argument("--gpu", type=int, default=0, help="the GPU to run on")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    return p


def check_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """Parse the compound values and check them; :class:`OptionError` naming the flag."""
    if bool(args.resume) == bool(args.onnx):
        raise OptionError("--resume / --onnx: give one of them, the checkpoint (--resume CKPT) or an "
                          "exported model (--onnx MODEL)")
    if isinstance(args.size, str):
        args.size = parse_size(args.size, "--size")
    if isinstance(args.scales, str):
        args.scales = parse_scales(args.scales)
    if args.batch_size <= 0:
        raise OptionError(f"--batch_size: must be a positive integer, got {args.batch_size}")
    if not 0.0 <= args.alpha <= 1.0:
        raise OptionError(f"--alpha: must lie in [0, 1], got {args.alpha}")
    if args.num_classes is not None and args.num_classes not in (19, 16, 13):
        raise OptionError(f"--num-classes: must be 19, 16 or 13, got {args.num_classes}")
    if args.onnx and args.inference_amp != "off":
        raise OptionError("--inference_amp: PyTorch only (--resume); an ONNX model runs as exported, in float32")
    return args


def backend(args: argparse.Namespace) -> ModuleType:
    """The module that builds the predictor: ``stages.prediction_onnx`` with ``--onnx``, else
    ``stages.prediction_torch``. Each has ``make_predictor(args)`` and ``USER_ERRORS``."""
    if args.onnx:
        return prediction_onnx
    from stages import prediction_torch  # here, not at the top: only a --resume run imports torch

    return prediction_torch


@dataclass
class Counts:
    """What a run wrote and skipped."""

    images: int = 0
    skipped: int = 0
    videos: int = 0
    frames: int = 0

    def summary(self, output: str) -> str:
        text = f"predict: {self.images} image(s) written, {self.skipped} skipped"
        if self.videos:
            text += f"; {self.videos} video(s) written ({self.frames} frames)"
        return f"{text}; outputs in {output}"


def _warn(message: str) -> None:
    tqdm.write(f"warning: {message}; skipped", file=sys.stderr)


def write_outputs(output: str, name: str, image: np.ndarray, label: np.ndarray, num_classes: int,
                  alpha: float) -> None:
    """``label/NAME.png`` (train ids), ``color/NAME.png`` and ``overlay/NAME.png`` of one image."""
    for folder, arr in (("label", label), ("color", colorize(label, num_classes)[:, :, ::-1]),
                        ("overlay", overlay(image, label, num_classes, alpha)[:, :, ::-1])):
        path = os.path.join(output, folder, name + ".png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_image(path, arr)


def _batches(items: Iterable, size: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def predict_images(args: argparse.Namespace, images: list[InputFile], predictor: Predictor, counts: Counts) -> None:
    """Predict and write every image of ``images``; an unreadable one gets a warning line and is
    skipped. Consecutive images of the same size go through the network together (``--batch_size``)."""
    pending: list[tuple[InputFile, np.ndarray, np.ndarray]] = []  # (file, image, resized image)
    with tqdm(total=len(images), desc="predict", unit="img", disable=args.quiet, dynamic_ncols=True,
              file=sys.stdout) as bar:

        def flush() -> None:
            if not pending:
                return
            labels = predictor.predict(np.stack([r for _, _, r in pending]), pending[0][1].shape[:2])
            for (item, image, _), label in zip(pending, labels):
                write_outputs(args.output, item.name, image, label, predictor.num_classes, args.alpha)
            counts.images += len(pending)
            bar.update(len(pending))
            pending.clear()

        for item in images:
            try:
                img = open_rgb(item.path)
            except DatasetError as exc:
                _warn(str(exc))
                counts.skipped += 1
                bar.update(1)
                continue
            image = np.asarray(img)
            if pending and (len(pending) == args.batch_size or pending[0][1].shape != image.shape):
                flush()
            pending.append((item, image, np.asarray(resize_image(img, predictor.size))))
        flush()


def video_target(output: str, item: InputFile) -> tuple[str, str]:
    """``(path, fourcc)`` of the overlay video of ``item``: ``overlay/NAME`` with the input's
    extension where :data:`VIDEO_CODECS` has it, else ``.mp4``."""
    ext = os.path.splitext(item.path)[1].lower()
    if ext not in VIDEO_CODECS:
        ext = ".mp4"
    return os.path.join(output, "overlay", item.name + ext), VIDEO_CODECS[ext]


def predict_video(args: argparse.Namespace, item: InputFile, predictor: Predictor, counts: Counts) -> None:
    """The overlay video of ``item`` (same frame rate and size), written atomically; a video that
    cannot be read or written gets a warning line and is skipped."""
    import cv2  # videos only

    try:
        video = open_video(item.path)
    except DatasetError as exc:
        _warn(str(exc))
        counts.skipped += 1
        return
    path, fourcc = video_target(args.output, item)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    frames = 0
    try:
        with atomic_path(path) as tmp, tqdm(total=video.frame_count or None, desc=os.path.basename(item.path),
                                            unit="frame", disable=args.quiet, dynamic_ncols=True,
                                            file=sys.stdout) as bar:
            writer = cv2.VideoWriter(tmp, cv2.VideoWriter_fourcc(*fourcc), video.fps, video.size)
            try:
                if not writer.isOpened():
                    raise DatasetError(f"{path}: OpenCV cannot write {fourcc} video here")
                height, width = video.size[1], video.size[0]
                for batch in _batches(video.frames(), args.batch_size):
                    resized = [np.asarray(resize_image(Image.fromarray(f), predictor.size)) for f in batch]
                    labels = predictor.predict(np.stack(resized), (height, width))
                    for frame, label in zip(batch, labels):
                        writer.write(np.ascontiguousarray(overlay(frame, label, predictor.num_classes,
                                                                  args.alpha)[:, :, ::-1]))
                    frames += len(batch)
                    bar.update(len(batch))
            finally:
                writer.release()
            if frames == 0:
                raise DatasetError(f"{item.path}: cannot read video (no frame could be decoded)")
    except DatasetError as exc:
        _warn(str(exc))
        counts.skipped += 1
        return
    finally:
        video.close()
    counts.videos += 1
    counts.frames += frames


def run_prediction(args: argparse.Namespace, inputs: list[InputFile], predictor: Predictor) -> Counts:
    """Every image of ``inputs`` (in their order, batched), then every video."""
    counts = Counts()
    images = [f for f in inputs if not f.video]
    if images:
        predict_images(args, images, predictor, counts)
    for item in inputs:
        if item.video:
            predict_video(args, item, predictor, counts)
    return counts


def main(argv: list[str] | None = None) -> int:
    """``predict.py``: returns the exit code (0; 2 for a bad flag or input, with one line)."""
    args = build_parser().parse_args(argv)
    try:
        check_arguments(args)
        inputs = find_inputs(args.input)
        module = backend(args)
        try:
            predictor = module.make_predictor(args)
        except module.USER_ERRORS as exc:
            raise PredictionError(str(exc)) from None
        try:
            os.makedirs(args.output, exist_ok=True)
        except OSError as exc:
            raise PredictionError(f"--output {args.output}: cannot create the folder ({exc.strerror})") from None
        counts = run_prediction(args, inputs, predictor)
        if counts.images == 0 and counts.videos == 0:
            raise PredictionError(f"--input {args.input}: no file could be read ({counts.skipped} skipped)")
    except (OptionError, DatasetError, PredictionError) as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(counts.summary(args.output))
    return 0
