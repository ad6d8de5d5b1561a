"""``export.py``: the target branch of a checkpoint as an ONNX model (docs/INFERENCE.md).

The graph is what validation runs (docs/METHOD.md sections 2 and 7): the target stem, the body,
the ASPP head and the classifier (``DecoupleNet.forward``), then the bilinear upsampling of the
stride-8 logits to the input size with ``align_corners=True`` (``model.upsample``). Input
``image``: float32 ``[N, 3, H, W]`` RGB in [0, 1], what ``datasets.loader.to_device_image`` feeds
the network (no mean or std). Outputs ``logits`` ``[N, C, H, W]`` and ``logits_stride8`` (what the
upsampling reads; ``predict.py --onnx`` upsamples it to each image's own size, as evaluation
does); with ``--argmax`` also ``label`` ``[N, H, W]`` (int64 train ids). The batch size is free;
``H`` and ``W`` are fixed to ``--size`` unless ``--dynamic``. Exported with the dynamo exporter
of ``torch.onnx`` (needs ``onnxscript``, ``requirements-onnx.txt``) and written atomically.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import warnings

import torch
from torch import Tensor, nn

from engine.common import check_versions
from engine.launch import USER_ERRORS
from engine.options import TGT_IMG_SIZE, OptionError, major_minor, new_parser, parse_size
from model import DecoupleNet, upsample
from stages.prediction_onnx import INPUT_NAME, LABEL, LOGITS, LOGITS_STRIDE8
from stages.prediction_torch import inference_network
from utils import distributed as du
from utils.files import atomic_write_bytes

MIN_TORCH = (2, 6)  # torch.onnx.export(dynamo=True, dynamic_shapes=...)


class TargetBranch(nn.Module):
    """The exported module: ``image -> (logits at the input size, stride-8 logits[, argmax])``."""

    def __init__(self, net: DecoupleNet, argmax: bool = False) -> None:
        super().__init__()
        self.net, self.argmax = net, argmax

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        logits8 = self.net(image)  # target stem, body, ASPP head, classifier
        logits = upsample(logits8, image.shape[-2:])
        return (logits, logits8, logits.argmax(1)) if self.argmax else (logits, logits8)


def output_names(argmax: bool) -> list[str]:
    return [LOGITS, LOGITS_STRIDE8, *([LABEL] if argmax else [])]


def onnx_bytes(module: TargetBranch, size_wh: tuple[int, int], dynamic: bool, opset: int = 18,
               quiet: bool = True) -> bytes:
    """The serialized ONNX model of ``module`` for ``size_wh`` (``dynamic``: any height and width).

    The example input has two images, so that the exporter keeps the batch size symbolic (it
    specialises sizes 0 and 1).
    """
    width, height = size_wh
    example = torch.rand(2, 3, height, width)
    axes: dict[int, torch.export.Dim] = {0: torch.export.Dim("batch")}
    if dynamic:
        axes.update({2: torch.export.Dim("height", min=8), 3: torch.export.Dim("width", min=8)})
    buffer = io.BytesIO()
    chatter = io.StringIO()
    with torch.no_grad(), warnings.catch_warnings(), \
            contextlib.redirect_stdout(chatter if quiet else sys.stdout):
        warnings.simplefilter("ignore")  # the exporter's notes on its own internals
        torch.onnx.export(module.eval(), (example,), buffer, dynamo=True, input_names=[INPUT_NAME],
                          output_names=output_names(module.argmax), dynamic_shapes={"image": axes},
                          opset_version=opset, verbose=False)
    return buffer.getvalue()


def with_metadata(data: bytes, props: dict[str, str]) -> bytes:
    """``data`` with ``props`` as the model's metadata (``onnx.helper.set_model_props``)."""
    import onnx  # installed with onnxscript, which the exporter needs

    model = onnx.load_from_string(data)
    onnx.helper.set_model_props(model, props)
    return model.SerializeToString()


def build_parser() -> argparse.ArgumentParser:
    """``export.py``'s flags."""
    p = new_parser("Export the target branch of a checkpoint (stems, body, ASPP head, classifier, upsampling "
                   "to the input size) as an ONNX model")
    p.add_argument("--resume", required=True, help="checkpoint (ours or the original's, phase 1 or 2, source-only)")
    p.add_argument("--out", required=True, help="the ONNX file to write")
    p.add_argument("--size", default=TGT_IMG_SIZE,
                   help="W,H of the input (evaluate.py's --tgt_img_size default); with --dynamic the example size")
    p.add_argument("--dynamic", action="store_true", help="any input height and width (the batch size is always free)")
    p.add_argument("--argmax", action="store_true", help="also output 'label', the argmax of the logits (int64)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset")
    p.add_argument("--num-classes", dest="num_classes", type=int, default=19)
    p.add_argument("--layer", type=int, default=1, choices=[0, 1, 2], help="stem ends after this layer")
    p.add_argument("--hidden_dim", type=int, default=128)
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors and the exporter's messages")
    return p


def export(args: argparse.Namespace) -> str:
    """Write ``--out``; returns a one-line description of the model written."""
    check_versions()
    if major_minor(torch.__version__) < MIN_TORCH:
        raise OptionError(f"export.py needs torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]} (its dynamo ONNX exporter); "
                          f"this is {torch.__version__}")
    size = parse_size(args.size, "--size")
    if args.num_classes not in (19, 16, 13):
        raise OptionError(f"--num-classes: must be 19, 16 or 13, got {args.num_classes}")
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        raise OptionError(f"--out {args.out}: folder {folder} not found")
    try:
        import onnxscript  # noqa: F401 (the dynamo exporter's dependency; checked here for a one-line error)
    except ImportError:
        raise OptionError("export.py needs onnx and onnxscript (pip install -r requirements-onnx.txt)") from None
    net = inference_network(args.resume, args.num_classes, args.layer, args.hidden_dim, du.DistEnv())
    data = onnx_bytes(TargetBranch(net, args.argmax), size, args.dynamic, args.opset, quiet=not args.debug)
    data = with_metadata(data, {
        "producer": "DecoupleNet export.py", "checkpoint": os.path.basename(args.resume),
        "input": f"{INPUT_NAME}: float32 [N, 3, H, W] RGB in [0, 1]",
        "outputs": ", ".join(output_names(args.argmax)), "num_classes": str(args.num_classes),
        "size": "dynamic" if args.dynamic else f"{size[0]}x{size[1]}"})
    atomic_write_bytes(args.out, data)
    shape = "N x 3 x H x W (any H, W)" if args.dynamic else f"N x 3 x {size[1]} x {size[0]}"
    return (f"export: {args.out} ({len(data) / 2**20:.0f} MiB): input {INPUT_NAME} float32 {shape} RGB in [0, 1]; "
            f"outputs {', '.join(output_names(args.argmax))}")


def main(argv: list[str] | None = None) -> int:
    """``export.py``: returns the exit code (0; 2 for a user error, with one line)."""
    args = build_parser().parse_args(argv)
    try:
        print(export(args))
    except USER_ERRORS as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
