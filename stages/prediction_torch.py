"""The PyTorch back end of ``predict.py`` (docs/INFERENCE.md): the target branch of a
checkpoint, read as evaluation reads it, predicting as evaluation predicts.

The network is ``engine.network.build_network`` (any official layout: ours or the original's,
phase 1, phase 2, source-only) made ready by ``prepare_for_inference``; the scores are
``engine.validation.tta_probabilities`` (``--flip``, ``--scales``, ``--inference_amp``) upsampled
to each image's own size; the input is the uint8 image as ``datasets.loader.to_device_image``
turns it into the network's float32 RGB in [0, 1].
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from datasets.loader import to_device_image
from engine.common import check_versions
from engine.launch import USER_ERRORS
from engine.network import build_network, prepare_for_inference
from engine.options import TGT_IMG_SIZE, OptionError, parse_size
from engine.validation import tta_probabilities
from model import DecoupleNet
from utils import distributed as du

__all__ = ["USER_ERRORS", "TorchPredictor", "inference_network", "make_predictor"]


def inference_network(resume: str, num_classes: int, layer: int, hidden_dim: int,
                      env: du.DistEnv) -> DecoupleNet:
    """The target branch of the checkpoint ``resume`` on ``env.device``, in eval mode
    (``build_network`` + ``prepare_for_inference`` with the CUDA switches at their defaults)."""
    net_args = argparse.Namespace(num_classes=num_classes, layer=layer, hidden_dim=hidden_dim, freeze_bn=False,
                                  resume=resume, imagenet="", tf32="default", cudnn_benchmark=False,
                                  channels_last=False, compile=False)
    return prepare_for_inference(build_network(net_args, decoupled=False, aux=False), env, net_args)


class TorchPredictor:
    """``predict(images, out_hw)``: train ids of a batch of resized uint8 RGB images."""

    def __init__(self, net: DecoupleNet, env: du.DistEnv, size: tuple[int, int], scales: tuple[float, ...] = (1.0,),
                 flip: bool = False, inference_amp: str = "off") -> None:
        self.net, self.env, self.size = net, env, tuple(size)
        self.scales, self.flip, self.inference_amp = tuple(scales), bool(flip), inference_amp
        self.num_classes = net.num_classes

    @torch.no_grad()
    def predict(self, images: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
        # NCHW and contiguous, as the val loader's batches: the same convolution paths as evaluate.py
        img = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
        x = to_device_image(img, self.env.device)
        prob = tta_probabilities(self.net, x, tuple(out_hw), self.inference_amp, self.env.device, self.scales,
                                 self.flip)
        return prob.argmax(1).cpu().numpy().astype(np.uint8)


def make_predictor(args: argparse.Namespace) -> TorchPredictor:
    """The predictor of ``predict.py --resume``: on GPU ``--gpu`` unless ``--cpu`` or no CUDA."""
    check_versions()
    use_cuda = torch.cuda.is_available() and not args.cpu
    if args.inference_amp == "fp16" and not use_cuda:
        raise OptionError("--inference_amp fp16: needs CUDA; use --inference_amp bf16 or off on the CPU")
    if use_cuda:
        if not 0 <= args.gpu < torch.cuda.device_count():
            raise OptionError(f"--gpu {args.gpu}: no such GPU ({torch.cuda.device_count()} visible)")
        device = torch.device("cuda", args.gpu)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    env = du.DistEnv(device=device)
    net = inference_network(args.resume, args.num_classes or 19, args.layer, args.hidden_dim, env)
    return TorchPredictor(net, env, args.size or parse_size(TGT_IMG_SIZE, "--size"), args.scales, args.flip,
                          args.inference_amp)
