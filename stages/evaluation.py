"""Stand-alone evaluation of any checkpoint on Cityscapes (``evaluate.py``)."""

from __future__ import annotations

import json
import os
from argparse import Namespace
from typing import Any

import numpy as np

from datasets.build import shard_loader
from datasets.cityscapes import CityscapesDataset
from datasets.images import write_image
from datasets.labels import class_names, colorize, decode_train_ids
from datasets.loader import workers_per_rank
from engine.common import LOG, RunError, per_rank
from engine.network import build_network, prepare_for_inference
from engine.options import ArgumentGroup, parse_scales
from engine.validation import EvalSettings, compute_miou, sample_figure
from utils import distributed
from utils.files import atomic_write
from utils.metrics import format_iou_table, miou_subsets

# evaluate.py's defaults of shared flags (engine.options.add_shared_arguments); it does not train.
FLAG_DEFAULTS = {"learning_rate": 2.5e-4, "num_steps": 1, "num_steps_stop": 1,
                 "clrjit_params": "0.0,0.0,0.0,0.0", "resume": ""}


def add_arguments(group: ArgumentGroup) -> None:
    """``evaluate.py``'s flags: the split, the test-time augmentation and the outputs."""
    group.add_argument("--split", default="val", choices=["val", "train", "test"], help="Cityscapes split")
    group.add_argument("--scales", default="1.0", help="comma-separated test scales, e.g. 0.75,1.0,1.25")
    group.add_argument("--flip", action="store_true", help="average with the horizontally flipped image")
    group.add_argument("--save_dir", default="",
                       help="write trainId, Cityscapes labelId, colour and side-by-side PNGs here")
    group.add_argument("--results_json", default="", help="results JSON (default <snapshot-dir>/results.json)")


def check_arguments(args: Namespace) -> None:
    """``--scales`` as a tuple of positive floats; :class:`OptionError` naming the flag otherwise."""
    if isinstance(args.scales, str):
        args.scales = parse_scales(args.scales)


def run_evaluation(args: Any, env: distributed.DistEnv) -> dict:
    """mIoU of the target branch of ``--resume`` on ``--split`` (each image counted once).

    Returns (and writes as JSON on rank 0) the per-class IoU, the mIoU and, for 16-class
    (SYNTHIA) models, the 16- and 13-class mIoU.
    """

    if not args.resume:
        raise RunError("--resume: required (the checkpoint to evaluate)")
    dataset = CityscapesDataset(args.tgt_rootpath, split=args.split, img_size=args.tgt_img_size, augment=None,
                                num_classes=args.num_classes)
    loader = shard_loader(dataset, per_rank(args.batch_size_val, env, "--batch_size_val"), env,
                          workers_per_rank(args.num_workers, env))
    net = prepare_for_inference(build_network(args, decoupled=False, aux=False), env, args)
    save_dir = args.save_dir
    if save_dir:
        for sub in ("trainid", "labelid", "color", "side_by_side"):
            os.makedirs(os.path.join(save_dir, sub), exist_ok=True)

    def save(batch: dict, pred) -> None:
        preds = pred.cpu().numpy().astype(np.uint8)
        for i, path in enumerate(batch["path"]):
            name = os.path.basename(path)
            write_image(os.path.join(save_dir, "trainid", name), preds[i])
            # Cityscapes label ids: what cityscapesScripts and the benchmark server read
            write_image(os.path.join(save_dir, "labelid", name), decode_train_ids(preds[i], args.num_classes))
            write_image(os.path.join(save_dir, "color", name), colorize(preds[i], args.num_classes)[:, :, ::-1])
            fig = sample_figure({"img": batch["img"][i], "label": batch["label"][i], "pred": pred[i].cpu()})
            write_image(os.path.join(save_dir, "side_by_side", name), fig[:, :, ::-1])

    iou, miou, _ = compute_miou(net, loader, env, EvalSettings.from_args(args), desc=f"evaluate {args.split}", scales=tuple(args.scales),
                                flip=args.flip, on_batch=save if save_dir else None)
    names = class_names(args.num_classes)
    result = {"checkpoint": args.resume, "split": args.split, "images": len(dataset), "scales": list(args.scales),
              "flip": bool(args.flip), "miou": float(miou), "iou": {n: float(v) for n, v in zip(names, iou)}}
    if args.num_classes == 16:
        result["miou16"], result["miou13"] = miou_subsets(iou, 16)
    if env.is_main:
        LOG.info("%s\n%s", args.resume, format_iou_table(iou, names, miou))
        if "miou13" in result:
            LOG.info("mIoU (16 classes) %.2f, mIoU* (13 classes) %.2f", 100 * result["miou16"], 100 * result["miou13"])
        path = args.results_json or os.path.join(args.snapshot_dir, "results.json")
        atomic_write(path, lambda f: f.write(json.dumps(result, indent=2)), mode="w")
        LOG.info("results written to %s", path)
    return result
