"""Benchmark: CPU time per training sample of one data-loader worker, ours against the original.

Ours: ``datasets.GTA5Dataset`` / ``datasets.CityscapesDataset`` with ``JointAugment`` (PIL
decoding and resizes, computing only the rows and columns the crop needs, torchvision's
ColorJitter on the PIL crop: the original's pixels; uint8 output, soft labels left at 1/8). The original: ``benchmarks.reference_rules.
OriginalLoader``, the original loaders' per-sample work operation for operation (calibrated
against the original code, docs/BENCHMARKS.md). "decode" is reading the sample's files and
nothing else (PNG decoding with PIL; for phase 2 also the soft label's ``np.load``): no loader
can go below it, so ``original / decode`` is the ceiling of the ratio. For GTA5, "floor" also
times only the library calls that the original's pixels need (decode of the rows the crop reads,
PIL's resize of the crop, torchvision's ColorJitter on PIL) without our glue: ``original / floor``
is the ceiling for any loader that gives the original's pixels.

Phase 1 uses ``--clrjit_params 0,0,0,0``, phase 2 ``0.5,0.5,0.5,0.2`` and the target's soft
labels (19x128x256 float32). Images are generated at the real sizes (GTA5 1914x1052,
Cityscapes 2048x1024), ``--resize 2200 --rcrop 896,512``. One process, one torch thread; the
pipelines are timed in alternation, one sample each in turn, and the median CPU time
(``time.process_time``) per sample is reported, which other processes on the machine disturb
far less than the wall time (printed too).

``--pixels N`` also times the random resize + crop three ways on the GTA5 files (the
original's whole-image resize then crop, ours, and PIL's resize of the crop's box, which we do
not use) and compares their pixels with the original's, without and with colour jitter.

    python benchmarks/bench_data.py [--samples 12] [--pixels 24]
"""

from __future__ import annotations

import argparse
import os
import random
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


def _resize_crop_by(method: str, img: Image.Image, size: tuple[int, int], box: tuple[int, int, int, int]
                    ) -> Image.Image:
    from datasets.transforms import resize_crop

    if method == "whole":
        return img.resize(size, Image.BILINEAR).crop(box)
    if method == "ours":
        return resize_crop(img, size, box)
    (w, h), (W, H) = size, img.size
    x0, y0, x1, y1 = box
    return img.resize((x1 - x0, y1 - y0), Image.BILINEAR, box=(x0 * W / w, y0 * H / h, x1 * W / w, y1 * H / h))


def pixel_agreement(gta_root: str, n: int) -> None:
    """The random resize + crop three ways, on the GTA5 files, at the paper's draws: the
    original's (PIL resize of the whole image, then crop), ours (``resize_crop``) and a
    cheaper alternative we do not use (PIL resamples the crop's box straight to the crop
    size). Time of the resize step; pixels against the original's, without and with the
    phase-2 colour jitter (same factors for all three)."""
    from datasets.gta5 import GTA5Dataset
    from datasets.transforms import JointAugment

    ds = GTA5Dataset(gta_root, img_size=(1914, 1052))
    imgs = [ds.load_pair(i)[0] for i in range(len(ds))]
    jitter = JointAugment(RESIZE, CROP, 0.5, JITTER)
    rng = random.Random(0)
    tw, th = CROP
    times: dict[str, list[float]] = {"whole": [], "ours": [], "box": []}
    diffs: dict[str, list[np.ndarray]] = {"ours": [], "box": [], "ours+jitter": [], "box+jitter": []}
    for i in range(n):
        img = imgs[i % len(imgs)]
        W, H = img.size
        w = int(rng.uniform(0.5, 1.5) * RESIZE)
        h = int(w / (W / H))
        x1, y1 = rng.randint(0, w - tw), rng.randint(0, h - th)
        box = (x1, y1, x1 + tw, y1 + th)
        crops = {}
        for name in ("whole", "ours", "box"):
            c0 = time.process_time()
            crops[name] = _resize_crop_by(name, img, (w, h), box)
            times[name].append(time.process_time() - c0)
        jittered = {k: jitter.color_jitter(v, torch.Generator().manual_seed(i)) for k, v in crops.items()}
        for k in ("ours", "box"):
            diffs[k].append(np.abs(np.asarray(crops[k], np.int16) - np.asarray(crops["whole"], np.int16)))
            diffs[k + "+jitter"].append(
                np.abs(np.asarray(jittered[k], np.int16) - np.asarray(jittered["whole"], np.int16)))
    print(f"\nrandom resize + crop of the GTA5 files, {n} draws: CPU ms of the resize step (median)")
    print("  " + "   ".join(f"{k}: {1e3 * statistics.median(v):.1f}" for k, v in times.items()))
    print(f"{'against the original':22s} {'identical':>9s} {'px > 1 lvl':>11s} {'px > 2 lvl':>11s} {'mean':>7s} {'max':>4s}")
    for k, ds_ in diffs.items():
        same = sum(int(d.max()) == 0 for d in ds_)
        print(f"{k:22s} {same:4d}/{len(ds_):<4d} {100 * max(float((d > 1).mean()) for d in ds_):10.3f}% "
              f"{100 * max(float((d > 2).mean()) for d in ds_):10.3f}% {max(float(d.mean()) for d in ds_):7.4f} "
              f"{max(int(d.max()) for d in ds_):4d}")
    print("(px > k lvl, mean: the worst crop; max: the largest difference of any value)")


def _gta5_pipelines(gta: str, img_paths: list[str], lbl_paths: list[str], clrjit: tuple[float, ...]
                    ) -> dict[str, Callable[[int], object]]:
    from benchmarks.reference_rules import OriginalLoader
    from datasets.gta5 import GTA5Dataset
    from datasets.transforms import JointAugment

    orig = OriginalLoader(RESIZE, CROP, 0.5, clrjit)
    ours = GTA5Dataset(gta, img_size=(1914, 1052), augment=JointAugment(RESIZE, CROP, 0.5, clrjit))
    k = len(img_paths)
    return {
        "original": lambda i: orig.gta5(img_paths[i % k], lbl_paths[i % k]),
        "ours": lambda i: ours[(1, i % k)],
        "decode": lambda i: _decode(img_paths[i % k], lbl_paths[i % k]),
        "floor": lambda i: _pil_floor(ours, (1, i % k)),
    }


def _pil_floor(ds, key: tuple[int, int]) -> object:
    """Only the library calls that the original's pixels need for GTA5 sample ``key`` of ``ds``,
    none of our glue: decode the rows the crop reads (image and label), PIL's resize of the
    crop, PIL's flip, torchvision's ColorJitter on the PIL crop, the label's nearest gather. No
    exact loader can go below this; ``original / floor`` is the ceiling of the ratio for a
    loader that gives the original's pixels."""
    from datasets.gta5 import open_rgb, read_label_ids, sample_rngs
    from datasets.transforms import nearest_index, resize_crop

    aug = ds.augment
    rng, gen = sample_rngs(ds.seed, ds.domain, *key)
    width, height = ds.img_size
    params = aug.draw(rng, height, width)
    img_rows, lbl_rows = aug.rows_needed(params, height, width)
    name = ds.files[key[1]]
    img = open_rgb(os.path.join(ds.image_dir, name), rows=img_rows)
    ids = read_label_ids(os.path.join(ds.label_dir, name), rows=lbl_rows)
    h, w = params["resized_hw"]
    ys, ye, xs, xe = params["crop_box"]
    crop = resize_crop(img, (w, h), (xs, ys, xe, ye), src_wh=(width, height))
    lbl = ids[nearest_index(height, h)[ys:ye]][:, nearest_index(width, w)[xs:xe]]
    if params["flip"]:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    return aug.color_jitter(crop, gen), lbl


def _cityscapes_pipelines(city: str, soft: str | None, clrjit: tuple[float, ...]
                          ) -> dict[str, Callable[[int], object]]:
    from benchmarks.reference_rules import OriginalLoader
    from datasets.cityscapes import CityscapesDataset, soft_label_name
    from datasets.transforms import JointAugment

    orig = OriginalLoader(RESIZE, CROP, 0.5, clrjit)
    ours = CityscapesDataset(city, split="train", img_size=(2048, 1024),
                             augment=JointAugment(RESIZE, CROP, 0.5, clrjit), soft_labels_folder=soft)
    files = ours.files
    softs = [None if soft is None else os.path.join(soft, soft_label_name(p)) for p in files]
    k = len(files)
    return {
        "original": lambda i: orig.cityscapes(files[i % k], softs[i % k]),
        "ours": lambda i: ours[(1, i % k)],
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
    print(f"{'pipeline':36s} {'original':>9s} {'ours':>9s} {'ratio':>6s} {'decode':>9s} {'ceiling':>7s} "
          f"{'floor':>9s} {'exact ceiling':>13s}")
    for name, t in rows:
        o, u, d = (t[k][0] for k in ("original", "ours", "decode"))
        line = f"{name:36s} {o:9.1f} {u:9.1f} {o / u:5.2f}x {d:9.1f} {o / d:6.2f}x"
        if "floor" in t:
            line += f" {t['floor'][0]:9.1f} {o / t['floor'][0]:12.2f}x"
        print(line)
        w = {k: f"({v[1]:.0f})" for k, v in t.items()}
        print(f"{'':36s} {w['original']:>9s} {w['ours']:>9s} {'':6s} {w['decode']:>9s}")
    print("ratio: original / ours; decode: reading the sample's whole files only; ceiling: original / decode;\n"
          "floor (GTA5): only the library calls the original's pixels need (decode of the rows the crop reads,\n"
          "PIL resize of the crop, flip, torchvision ColorJitter on PIL); exact ceiling: original / floor")


if __name__ == "__main__":
    main()
