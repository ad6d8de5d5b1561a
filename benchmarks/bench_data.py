"""Benchmark: CPU time per training sample of one data-loader worker, ours against the original.

Ours: ``datasets.GTA5Dataset`` / ``datasets.CityscapesDataset`` with ``JointAugment`` (PIL
decoding and resizes, the crop's region resampled by PIL, torchvision's ColorJitter on the PIL
crop, uint8 output, soft labels left at 1/8). The original: ``benchmarks.reference_rules.
OriginalLoader``, the original loaders' per-sample work operation for operation (calibrated
against the original code, docs/BENCHMARKS.md). "decode" is reading the sample's files and
nothing else (PNG decoding with PIL; for phase 2 also the soft label's ``np.load``): no loader
can go below it, so ``original / decode`` is the ceiling of the ratio.

Phase 1 uses ``--clrjit_params 0,0,0,0``, phase 2 ``0.5,0.5,0.5,0.2`` and the target's soft
labels (19x128x256 float32). Images are generated at the real sizes (GTA5 1914x1052,
Cityscapes 2048x1024), ``--resize 2200 --rcrop 896,512``. One process, one torch thread; the
pipelines are timed in alternation, one sample each in turn, and the median CPU time
(``time.process_time``) per sample is reported, which other processes on the machine disturb
far less than the wall time (printed too).

``--pixels N`` also compares, on the GTA5 files, the crop-region resize (ours) with resizing
the whole image and then cropping (the original's order; ``JointAugment(full_resize=True)``):
time of the resize alone and agreement of the final crops, without and with colour jitter.

    python benchmarks/bench_data.py [--samples 12] [--pixels 24]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CROP = (896, 512)
RESIZE = 2200
JITTER = (0.5, 0.5, 0.5, 0.2)
NO_JITTER = (0.0, 0.0, 0.0, 0.0)


def _decode(*paths: str) -> None:
    for p in paths:
        if p.endswith(".npy"):
            np.load(p)
        else:
            with Image.open(p) as im:
                im.load()


def _time_alternating(fns: dict[str, Callable[[int], object]], n: int) -> dict[str, tuple[float, float]]:
    """Median (CPU ms, wall ms) per call of each function, called in turn on samples 0..n-1."""
    for fn in fns.values():  # warm-up: imports, first-call caches
        fn(0)
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    wall: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(n):
        for k, fn in fns.items():
            c0, w0 = time.process_time(), time.perf_counter()
            fn(i)
            cpu[k].append(time.process_time() - c0)
            wall[k].append(time.perf_counter() - w0)
    return {k: (1e3 * statistics.median(cpu[k]), 1e3 * statistics.median(wall[k])) for k in fns}


def pixel_agreement(gta_root: str, n: int) -> None:
    """Crop-region resize against whole-image resize then crop, on the GTA5 files."""
    from datasets.gta5 import GTA5Dataset, sample_rngs
    from datasets.transforms import JointAugment

    ds = GTA5Dataset(gta_root, img_size=(1914, 1052))
    imgs = [ds.load_pair(i)[0] for i in range(len(ds))]
    print(f"\ncrop-region resize vs whole-image resize then crop ({n} GTA5 crops each)")
    print(f"{'jitter':8s} {'box ms':>7s} {'full ms':>8s} {'px > 1 lvl':>11s} {'px > 2 lvl':>11s} "
          f"{'mean':>7s} {'max':>4s}")
    for clrjit in (NO_JITTER, JITTER):
        box = JointAugment(RESIZE, CROP, 0.5, clrjit)
        full = JointAugment(RESIZE, CROP, 0.5, clrjit, full_resize=True)
        t_box, t_full, over1, over2, means, worst = [], [], [], [], [], 0
        for i in range(n):
            img = imgs[i % len(imgs)]
            outs = []
            for aug, times in ((box, t_box), (full, t_full)):
                rng, gen = sample_rngs(0, "source", 0, i)
                t0 = time.process_time()
                out, _, _ = aug(img, None, rng, gen)
                times.append(time.process_time() - t0)
                outs.append(out.numpy().astype(np.int16))
            d = np.abs(outs[0] - outs[1])
            over1.append(float((d > 1).mean()))
            over2.append(float((d > 2).mean()))
            means.append(float(d.mean()))
            worst = max(worst, int(d.max()))
        name = "on" if clrjit != NO_JITTER else "off"
        print(f"{name:8s} {1e3 * statistics.median(t_box):7.1f} {1e3 * statistics.median(t_full):8.1f} "
              f"{100 * max(over1):10.3f}% {100 * max(over2):10.3f}% {max(means):7.4f} {worst:4d}")
    print("(times: the whole augmentation call, median; px > k lvl, mean: worst crop; max: largest difference)")


def _gta5_pipelines(gta: str, img_paths: list[str], lbl_paths: list[str], clrjit: tuple[float, ...]
                    ) -> dict[str, Callable[[int], object]]:
    from benchmarks.reference_rules import OriginalLoader
    from datasets.gta5 import GTA5Dataset
    from datasets.transforms import JointAugment

    orig = OriginalLoader(RESIZE, CROP, 0.5, clrjit)
    ours = GTA5Dataset(gta, img_size=(1914, 1052), augment=JointAugment(RESIZE, CROP, 0.5, clrjit))
    exact = GTA5Dataset(gta, img_size=(1914, 1052),
                        augment=JointAugment(RESIZE, CROP, 0.5, clrjit, full_resize=True))
    k = len(img_paths)
    return {
        "original": lambda i: orig.gta5(img_paths[i % k], lbl_paths[i % k]),
        "ours": lambda i: ours[(1, i % k)],
        "exact": lambda i: exact[(1, i % k)],
        "decode": lambda i: _decode(img_paths[i % k], lbl_paths[i % k]),
    }


def _cityscapes_pipelines(city: str, soft: str | None, clrjit: tuple[float, ...]
                          ) -> dict[str, Callable[[int], object]]:
    from benchmarks.reference_rules import OriginalLoader
    from datasets.cityscapes import CityscapesDataset, soft_label_name
    from datasets.transforms import JointAugment

    orig = OriginalLoader(RESIZE, CROP, 0.5, clrjit)
    ours = CityscapesDataset(city, split="train", img_size=(2048, 1024),
                             augment=JointAugment(RESIZE, CROP, 0.5, clrjit), soft_labels_folder=soft)
    exact = CityscapesDataset(city, split="train", img_size=(2048, 1024),
                              augment=JointAugment(RESIZE, CROP, 0.5, clrjit, full_resize=True),
                              soft_labels_folder=soft)
    files = ours.files
    softs = [None if soft is None else os.path.join(soft, soft_label_name(p)) for p in files]
    k = len(files)
    return {
        "original": lambda i: orig.cityscapes(files[i % k], softs[i % k]),
        "ours": lambda i: ours[(1, i % k)],
        "exact": lambda i: exact[(1, i % k)],
        "decode": lambda i: _decode(*[p for p in (files[i % k], softs[i % k]) if p]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=12, help="samples timed per pipeline")
    ap.add_argument("--pixels", type=int, default=0, help="crops for the resize comparison (0: skip)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    from datasets.cityscapes import CityscapesDataset, soft_label_name
    from datasets.synthetic import generate

    with tempfile.TemporaryDirectory() as tmp:
        n_img = 3
        generate(os.path.join(tmp, "g"), seed=0, size=(1914, 1052), num_source=n_img, num_target_train=1,
                 num_target_val=1)
        generate(os.path.join(tmp, "c"), seed=1, size=(2048, 1024), num_source=1, num_target_train=n_img,
                 num_target_val=1)
        gta = os.path.join(tmp, "g", "gta5")
        city = os.path.join(tmp, "c", "cityscapes")
        soft_dir = os.path.join(tmp, "soft")
        os.makedirs(soft_dir)
        rng = np.random.default_rng(0)
        for p in CityscapesDataset(city, split="train").files:
            np.save(os.path.join(soft_dir, soft_label_name(p)), rng.standard_normal((19, 128, 256)).astype(np.float32))
        names = sorted(os.listdir(os.path.join(gta, "images")))
        img_paths = [os.path.join(gta, "images", n) for n in names]
        lbl_paths = [os.path.join(gta, "labels", n) for n in names]
        rows = []
        for phase, clrjit in ((1, NO_JITTER), (2, JITTER)):
            jit = " (jitter)" if phase == 2 else ""
            rows.append((f"GTA5, phase {phase}{jit}", _time_alternating(
                _gta5_pipelines(gta, img_paths, lbl_paths, clrjit), a.samples)))
            soft = soft_dir if phase == 2 else None
            jit = " (jitter + soft)" if phase == 2 else ""
            rows.append((f"Cityscapes, phase {phase}{jit}", _time_alternating(
                _cityscapes_pipelines(city, soft, clrjit), a.samples)))
        if a.pixels:
            pixel_agreement(gta, a.pixels)
    print(f"\nCPU ms per sample, median of {a.samples} (1 process, 1 torch thread); wall ms in brackets")
    print(f"{'pipeline':34s} {'original':>9s} {'ours':>9s} {'ratio':>6s} {'exact':>9s} {'ratio':>6s} "
          f"{'decode':>9s} {'ceiling':>7s}")
    for name, t in rows:
        o, u, e, d = (t[k][0] for k in ("original", "ours", "exact", "decode"))
        print(f"{name:34s} {o:9.1f} {u:9.1f} {o / u:5.2f}x {e:9.1f} {o / e:5.2f}x {d:9.1f} {o / d:6.2f}x")
        w = {k: f"({v[1]:.0f})" for k, v in t.items()}
        print(f"{'':34s} {w['original']:>9s} {w['ours']:>9s} {'':6s} {w['exact']:>9s} {'':6s} {w['decode']:>9s}")
    print("ours: crop-region resize (default); exact: JointAugment(full_resize=True); "
          "ceiling: original / decode")


if __name__ == "__main__":
    main()
