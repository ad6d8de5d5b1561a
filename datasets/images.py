"""Image and video files: decoding and resizing as the original (PIL), the inputs of
``predict.py`` (one image, a folder, a glob, a video; docs/INFERENCE.md) and writing images.

Only NumPy, PIL and (for videos and PNG encoding) OpenCV: no torch import, so that
``predict.py --onnx`` runs without PyTorch.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from utils.files import atomic_write_bytes

from .errors import DatasetError

# What a folder given to predict.py is searched for (recursively); any other file is left out.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
# Files with these endings are read as videos (OpenCV), every other file as an image (PIL).
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")


def _load_top(im: Image.Image, rows: int | None) -> None:
    """Decode ``im`` (just opened); with ``rows``, only its top ``rows`` rows where the file
    allows it (a non-interlaced PNG): PNG stores rows in order, so the rows decoded are the
    same as in a whole decode, and the rest of the file is never read."""
    width, height = im.size
    if rows is not None and 0 < rows < height and im.format == "PNG" and not im.info.get("interlace") \
            and len(im.tile) == 1 and im.tile[0][0] == "zip" and tuple(im.tile[0][1]) == (0, 0, width, height):
        tile = im.tile[0]
        extents = (0, 0, width, rows)
        try:
            im.tile = [tile._replace(extents=extents) if hasattr(tile, "_replace")
                       else (tile[0], extents, *tile[2:])]
            im._size = (width, rows)
            im.load_end = lambda: None  # the chunks after the image data are not needed
            im.load()
            if im.size == (width, rows):
                return
        except (OSError, ValueError, SyntaxError, AttributeError, TypeError):
            pass
        raise _WholeDecode
    im.load()


class _WholeDecode(Exception):
    """The top-rows decode was not possible: decode the whole file."""


def open_rgb(path: str, rows: int | None = None) -> Image.Image:
    """Decode an image file with PIL as an RGB image; DatasetError naming the file if it fails.

    PIL decodes as the original does (``Image.open``); an image stored in another mode
    (grey, palette, RGBA) is converted to RGB. ``rows``: only the top rows are needed (the
    image returned may hold only those).
    """
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: image file not found")
    for top in (rows, None):
        try:
            with Image.open(path) as im:
                _load_top(im, top)
                return im if im.mode == "RGB" else im.convert("RGB")
        except _WholeDecode:
            continue
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            break
    raise DatasetError(f"{path}: cannot read image (corrupt or not an image)") from None


def resize_image(img: Image.Image, size_wh: Sequence[int]) -> Image.Image:
    """PIL ``img.resize(size, Image.BILINEAR)``, as the original resizes every image.

    PIL's bilinear filter widens with the scale when it shrinks (it antialiases), unlike
    OpenCV's ``INTER_LINEAR``. A resize to the image's own size is a copy in PIL, so it is
    skipped here (same pixels).
    """
    size = (int(size_wh[0]), int(size_wh[1]))
    return img if img.size == size else img.resize(size, Image.BILINEAR)


def write_image(path: str, image: np.ndarray) -> None:
    """``image`` encoded as ``cv2.imwrite`` would (the format from the extension; BGR channel
    order), written atomically (:func:`utils.files.atomic_open`)."""
    import cv2  # only where images are written

    encoded, data = cv2.imencode(os.path.splitext(path)[1], image)
    if not encoded:
        raise DatasetError(f"{path}: cannot encode the image")
    atomic_write_bytes(path, data.tobytes())


# ---------------------------------------------------------------------------- predict.py's inputs
@dataclass(frozen=True)
class InputFile:
    """One file ``predict.py`` reads.

    Attributes:
        path: the file.
        name: where its outputs go under each output folder: its path relative to the input
            folder (or to the folder of the file or of the glob's matches), without the extension.
        video: read as a video (by its extension, :data:`VIDEO_EXTENSIONS`).
    """

    path: str
    name: str
    video: bool


def is_video(path: str) -> bool:
    return path.lower().endswith(VIDEO_EXTENSIONS)


def find_inputs(spec: str, flag: str = "--input") -> list[InputFile]:
    """The files of ``spec``: one file (image or video), a folder (its images, searched
    recursively, in sorted order) or a glob pattern (its matching files, sorted).

    :class:`DatasetError` naming ``flag`` when nothing exists there, when a folder holds no
    image, when a pattern matches no file, or when two inputs would write the same outputs.
    """
    if os.path.isdir(spec):
        root = spec
        paths = sorted(os.path.join(folder, n) for folder, _, names in os.walk(spec) for n in names
                       if n.lower().endswith(IMAGE_EXTENSIONS))
        if not paths:
            raise DatasetError(f"{flag} {spec}: no image in the folder (searched recursively for "
                               f"{', '.join(IMAGE_EXTENSIONS)})")
    elif os.path.isfile(spec):
        root, paths = os.path.dirname(spec), [spec]
    elif glob.has_magic(spec):
        paths = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        if not paths:
            raise DatasetError(f"{flag} {spec}: no file matches the pattern")
        root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
        paths = [os.path.abspath(p) for p in paths]
    else:
        raise DatasetError(f"{flag} {spec}: no such file or folder")
    inputs, seen = [], {}
    for path in paths:
        name = os.path.splitext(os.path.relpath(path, root or "."))[0]
        if name in seen:
            raise DatasetError(f"{flag} {spec}: {seen[name]} and {path} would write the same outputs ({name}.*)")
        seen[name] = path
        inputs.append(InputFile(path=path, name=name, video=is_video(path)))
    return inputs


@dataclass
class Video:
    """An open video (OpenCV): its frame rate, frame size ``(width, height)`` and the number of
    frames its header gives (0 when unknown); :meth:`frames` yields RGB uint8 frames."""

    path: str
    fps: float
    size: tuple[int, int]
    frame_count: int
    _capture: object

    def frames(self) -> Iterator[np.ndarray]:
        import cv2  # videos only

        while True:
            ok, frame = self._capture.read()
            if not ok:
                return
            yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)

    def close(self) -> None:
        self._capture.release()


def open_video(path: str) -> Video:
    """Open a video file with OpenCV; :class:`DatasetError` naming the file if it cannot."""
    import cv2  # videos only

    capture = cv2.VideoCapture(path)
    if not capture.isOpened():
        capture.release()
        raise DatasetError(f"{path}: cannot read video (OpenCV cannot open it)")
    width, height = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    fps = float(capture.get(cv2.CAP_PROP_FPS))
    if width <= 0 or height <= 0 or not fps > 0:
        capture.release()
        raise DatasetError(f"{path}: cannot read video (no frame size or frame rate)")
    return Video(path=path, fps=fps, size=(width, height),
                 frame_count=max(0, int(capture.get(cv2.CAP_PROP_FRAME_COUNT))), _capture=capture)
