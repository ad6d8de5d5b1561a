"""Benchmark: ``predict.py``'s images per second, PyTorch float32 against PyTorch with
``--inference_amp bf16`` and against onnxruntime, in one run (docs/BENCHMARKS.md, "Inference").

Each variant is the predictor ``predict.py`` itself uses (``stages.prediction_torch.TorchPredictor``,
``stages.prediction_onnx.OnnxPredictor`` on the model ``export.py`` writes, exported here at
``--size`` without ``--dynamic``), on the same random uint8 images at ``--size``: the forward, the
upsampling of the logits to the image size and the argmax; no file reading or writing. The network
is the target branch with fresh (seeded) weights: the speed does not depend on their values. The
variants are timed in alternation, one call each in turn; the median wall time per call gives the
images per second, and the median CPU time of the process per call (all threads) is given too,
which other jobs on a shared machine disturb less. The predictions are compared with float32's
(the share of equal pixels).

    python benchmarks/bench_predict.py [--device cpu] [--size 1024,512] [--batch 1] [--iters 5]
    python benchmarks/bench_predict.py --device cuda --iters 5   # onnxruntime only with its CUDA provider

``--bf16 auto`` measures bf16 where the device has native bf16 (CPU: AVX512-BF16 or AMX; CUDA:
``torch.cuda.is_bf16_supported()``); ``--onnx auto`` measures onnxruntime on the CPU, and on CUDA
only when its CUDA provider is installed (onnxruntime-gpu).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.options import parse_size
from model import DecoupleNet
from stages.export import TargetBranch, onnx_bytes
from stages.prediction_onnx import OnnxPredictor
from stages.prediction_torch import TorchPredictor
from utils.distributed import DistEnv


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bf16 natively (else autocast emulates it, slowly)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return any(getattr(torch.cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported",
                                                                        "_is_amx_tile_supported"))


def onnx_cuda_provider() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--size", default="1024,512", help="W,H of the images (the network's input)")
    p.add_argument("--batch", type=int, default=1, help="images per call")
    p.add_argument("--iters", type=int, default=5, help="timed calls per variant")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per variant first")
    p.add_argument("--bf16", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--onnx", default="auto", choices=["auto", "on", "off"])
    args = p.parse_args(argv)
    width, height = parse_size(args.size, "--size")
    device = torch.device(args.device)
    threads = torch.get_num_threads()
    print(f"predict.py inference at {width}x{height}, batch {args.batch}, {args.device}, torch {torch.__version__}, "
          f"{threads} torch threads (onnxruntime: as many), median of {args.iters} call(s) after {args.warmup}")
    torch.manual_seed(0)
    net = DecoupleNet(decoupled=False, aux=False).eval()
    env = DistEnv(device=device)
    variants = {"pytorch float32": TorchPredictor(net.to(device), env, (width, height))}
    if args.bf16 == "on" or (args.bf16 == "auto" and native_bf16(device)):
        variants["pytorch bf16 autocast"] = TorchPredictor(net, env, (width, height), inference_amp="bf16")
    else:
        print("pytorch bf16 autocast: skipped (no native bf16 on this device; --bf16 on runs it anyway)")
    if args.onnx == "on" or (args.onnx == "auto" and (device.type == "cpu" or onnx_cuda_provider())):
        start = time.perf_counter()
        model = onnx_bytes(TargetBranch(net.to("cpu")), (width, height), dynamic=False)
        net.to(device)
        session = OnnxPredictor(model, None, (width, height), cpu=device.type == "cpu", threads=threads)
        provider = session.session.get_providers()[0]
        print(f"onnxruntime: model exported in {time.perf_counter() - start:.1f} s ({len(model) / 2**20:.0f} MiB), "
              f"provider {provider}")
        variants[f"onnxruntime ({provider})"] = session
    else:
        print("onnxruntime: skipped (no CUDA provider: pip install onnxruntime-gpu; the CPU run measures it)")
    images = np.random.default_rng(0).integers(0, 256, (args.batch, height, width, 3), dtype=np.uint8)
    preds = {name: v.predict(images, (height, width)) for name, v in variants.items()}  # first calls
    for _ in range(max(0, args.warmup - 1)):
        for v in variants.values():
            v.predict(images, (height, width))
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.iters):
        for name, v in variants.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            v.predict(images, (height, width))  # returns NumPy: the device has finished
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    base, base_cpu = statistics.median(wall["pytorch float32"]), statistics.median(cpu["pytorch float32"])
    print(f"{'variant':<40}{'s/call':>9}{'images/s':>10}{'vs float32':>12}{'cpu s/call':>12}{'vs float32':>12}"
          f"{'same pixels':>13}")
    for name in variants:
        sec, sec_cpu = statistics.median(wall[name]), statistics.median(cpu[name])
        same = float((preds[name] == preds["pytorch float32"]).mean())
        print(f"{name:<40}{sec:>9.3f}{args.batch / sec:>10.3f}{base / sec:>11.2f}x{sec_cpu:>12.3f}"
              f"{base_cpu / sec_cpu:>11.2f}x{100 * same:>12.2f}%")


if __name__ == "__main__":
    main()
