"""Benchmark: training samples per second per data-loader worker at the real sizes.

Ours (``datasets.GTA5Dataset`` / ``datasets.CityscapesDataset`` with the joint augmentation:
uint8 output, OpenCV resizes, soft labels left at 1/8) against a faithful re-implementation of
the original's per-sample pipeline (PIL resizes, per-id label loop, float64 conversion, the
unused RandAugment "strong" image, the soft label upsampled to full resolution, resized,
cropped and flipped inside the worker). Images are generated at the real sizes (GTA5
1914x1052 -> crop 896x512, Cityscapes 2048x1024, soft labels 19x128x256). One process, one
torch thread: the figure is per worker.

    python benchmarks/bench_data.py [--samples 6]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from datasets.labels import CITYSCAPES_IDS

CROP = (896, 512)
RESIZE = 2200


def original_sample(img_path: str, label_path: str | None, size: tuple[int, int], soft_path: str | None,
                    rng: random.Random) -> dict:
    """The original's per-sample work (one training sample)."""
    from torchvision.transforms import RandAugment

    img = Image.open(img_path).convert("RGB").resize(size, Image.BILINEAR)
    full = img
    label = Image.open(label_path).resize(size, Image.NEAREST) if label_path else None
    w0, h0 = img.size
    w = int(rng.uniform(0.5, 1.5) * RESIZE)
    h = int(w / (w0 / h0))
    img = img.resize((w, h), Image.BILINEAR)
    label = label.resize((w, h), Image.NEAREST) if label is not None else None
    x1, y1 = rng.randint(0, w - CROP[0]), rng.randint(0, h - CROP[1])
    box = (x1, y1, x1 + CROP[0], y1 + CROP[1])
    img = img.crop(box)
    label = label.crop(box) if label is not None else None
    flip = rng.random() < 0.5
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
        label = label.transpose(Image.FLIP_LEFT_RIGHT) if label is not None else None
    strong = RandAugment()(img)  # computed and never used by the original
    out = {"img": torch.from_numpy((np.asarray(img, dtype=np.float64) / 255).transpose(2, 0, 1).copy()).float(),
           "strong": torch.from_numpy((np.asarray(strong, dtype=np.float64) / 255).transpose(2, 0, 1).copy()).float()}
    if label is not None:
        lbl = np.asarray(label, dtype=np.int64)
        enc = np.full(lbl.shape, 250, dtype=np.int64)
        for train_id, cid in enumerate(CITYSCAPES_IDS[19] if isinstance(CITYSCAPES_IDS, dict) else CITYSCAPES_IDS):
            enc[lbl == cid] = train_id
        out["label"] = torch.from_numpy(enc)
    else:
        out["img_full"] = torch.from_numpy((np.asarray(full, dtype=np.float64) / 255).transpose(2, 0, 1).copy()).float()
    if soft_path:
        soft = torch.from_numpy(np.load(soft_path))[None]
        soft = F.interpolate(soft, size=(h0, w0), mode="bilinear", align_corners=True)
        soft = F.interpolate(soft, size=(h, w), mode="bilinear", align_corners=True)[0]
        soft = soft[:, y1:y1 + CROP[1], x1:x1 + CROP[0]]
        out["lpsoft"] = torch.flip(soft, dims=(2,)) if flip else soft
    return out


def timed(fn, n: int) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=6, help="samples timed per pipeline")
    a = ap.parse_args()
    torch.set_num_threads(1)
    from datasets.build import JointAugment
    from datasets.cityscapes import CityscapesDataset, soft_label_name
    from datasets.gta5 import GTA5Dataset
    from datasets.synthetic import generate

    with tempfile.TemporaryDirectory() as tmp:
        n_img = 3
        generate(os.path.join(tmp, "g"), seed=0, size=(1914, 1052), num_source=n_img, num_target_train=1, num_target_val=1)
        generate(os.path.join(tmp, "c"), seed=1, size=(2048, 1024), num_source=1, num_target_train=n_img, num_target_val=1)
        gta = os.path.join(tmp, "g", "gta5")
        city = os.path.join(tmp, "c", "cityscapes")
        soft_dir = os.path.join(tmp, "soft")
        os.makedirs(soft_dir)
        aug = JointAugment(resize=RESIZE, crop_wh=CROP, hflip=0.5)
        src = GTA5Dataset(gta, img_size=(1914, 1052), augment=aug)
        tgt = CityscapesDataset(city, split="train", img_size=(2048, 1024), augment=aug)
        for p in tgt.files:
            np.save(os.path.join(soft_dir, soft_label_name(p)), np.random.randn(19, 128, 256).astype(np.float32))
        tgt_soft = CityscapesDataset(city, split="train", img_size=(2048, 1024), augment=aug, soft_labels_folder=soft_dir)
        names = sorted(os.listdir(os.path.join(gta, "images")))
        rng = random.Random(0)
        rows = []
        n = a.samples
        ours = timed(lambda i: src[(0, i % len(src))], n)
        orig = timed(lambda i: original_sample(os.path.join(gta, "images", names[i % len(names)]),
                                               os.path.join(gta, "labels", names[i % len(names)]), (1914, 1052),
                                               None, rng), n)
        rows.append(("GTA5 1914x1052 -> 896x512", orig, ours))
        ours = timed(lambda i: tgt[(0, i % len(tgt))], n)
        orig = timed(lambda i: original_sample(tgt.files[i % len(tgt)], None, (2048, 1024), None, rng), n)
        rows.append(("Cityscapes 2048x1024", orig, ours))
        ours = timed(lambda i: tgt_soft[(0, i % len(tgt))], n)
        orig = timed(lambda i: original_sample(tgt.files[i % len(tgt)], None, (2048, 1024),
                                               os.path.join(soft_dir, soft_label_name(tgt.files[i % len(tgt)])), rng), n)
        rows.append(("Cityscapes + soft label", orig, ours))
    print(f"samples/s per worker (1 process, 1 torch thread, {n} samples each)")
    print(f"{'pipeline':28s} {'original':>9s} {'ours':>9s} {'ratio':>7s}")
    for name, o, u in rows:
        print(f"{name:28s} {o:9.2f} {u:9.2f} {u / o:6.1f}x")


if __name__ == "__main__":
    main()
