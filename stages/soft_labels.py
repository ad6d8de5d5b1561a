"""Soft labels (docs/METHOD.md section 4): target-branch logits of every Cityscapes train image."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import torch

from datasets.build import shard_loader, target_train_dataset
from datasets.cityscapes import soft_label_name
from datasets.labels import class_names
from datasets.loader import to_device_image, to_device_label, workers_per_rank
from engine.common import LOG, RunError, per_rank, progress
from engine.launch import stop_run
from engine.network import build_network, prepare_for_inference, use_channels_last
from engine.optim import inference_autocast
from engine.options import ArgumentGroup
from model import upsample
from stages.pseudo_quality import all_ranks_agree
from utils import distributed, signals
from utils.files import atomic_save_npy, remove_stale_temp_files
from utils.metrics import format_iou_table, intersection_and_union, mean_iou

# The schedule and jitter flags are not used when writing soft labels; the values are the original's.
FLAG_DEFAULTS = {"learning_rate": 2.5e-4, "num_steps": 62500, "num_steps_stop": 40000,
                 "clrjit_params": "0.5,0.5,0.5,0.2", "resume": "./pretrained/model_phase1.pth"}


def add_arguments(group: ArgumentGroup) -> None:
    """``generate_soft_label.py``'s flags: where the soft labels go and how they are stored."""
    group.add_argument("--output_folder", default="")
    group.add_argument("--skip_existing", action="store_true", help="soft labels: keep files already written")
    group.add_argument("--soft_label_dtype", default="float32", choices=["float32", "float16"])


def generate_soft_labels(args: Any, env: distributed.DistEnv) -> int:
    """Write ``<output_folder>/<basename>.npy`` = float32 logits ``[C, H/8, W/8]`` before softmax.

    The network runs in float32 without autocast, as the original (``--amp`` is for training
    only); ``--inference_amp fp16|bf16`` opts into half precision, which changes the logits.
    Every image is written exactly once over all ranks (no padded sampler); each file is written
    atomically, so an interrupted run never leaves a partial file under a final name and
    ``--skip_existing`` can continue it. Images go through the network ``--batch-size`` at a
    time over all ranks (the original's target train loader). Returns the number of files
    written by this rank.

    When every train image has ground truth (``gtFine/train``; not read with
    ``--no_pseudo_eval``) the log also gets the mIoU of the soft labels' argmax against it, per
    class, by the validation's rule: the logits upsampled bilinearly (``align_corners=True``)
    to the label's size (the train label resized, nearest, to ``--tgt_img_size``: its own size
    on Cityscapes), argmax, intersections and unions summed over the images written in this
    run and over the ranks. Monitoring only: the soft labels do not depend on it.

    On SIGUSR1 / SIGTERM (:mod:`utils.signals`) each rank finishes the batch it is writing and
    stops; the ranks learn it from one another in the count's all-reduce, after the loop, and
    exit with one line saying how to continue (``--skip_existing``, or the requeued SLURM job:
    :func:`engine.launch.stop_run`). Every file written so far is complete.
    """

    if not args.output_folder:
        raise RunError("--output_folder: required (where the .npy soft labels go)")
    if not args.resume:
        raise RunError("--resume: required (the phase-1 or phase-2 checkpoint to label with)")
    if env.is_main:
        try:
            os.makedirs(args.output_folder, exist_ok=True)
        except OSError as exc:
            raise RunError(f"--output_folder {args.output_folder}: cannot create ({exc.strerror})") from None
        for path in remove_stale_temp_files(args.output_folder):  # left by a killed run
            LOG.info("removed stale temporary file %s", path)
    distributed.barrier(env.device)
    dataset = target_train_dataset(args, augment=False)
    total = len(dataset.files)
    if args.skip_existing:
        dataset.files = [p for p in dataset.files
                         if not os.path.isfile(os.path.join(args.output_folder, soft_label_name(p)))]
        LOG.info("--skip_existing: %d of %d soft labels already there", total - len(dataset.files), total)
    net = prepare_for_inference(build_network(args, decoupled=False, aux=False), env, args)
    with_gt = all_ranks_agree(dataset.has_labels, env)
    if with_gt:
        LOG.info("soft-label mIoU: the train ground truth is read only to measure the soft labels; they do not "
                 "depend on it (--no_pseudo_eval turns it off)")
    elif not args.no_pseudo_eval:
        LOG.info("no soft-label mIoU: ground truth missing for %d of %d train images", dataset.labels_missing, total)
    inter = torch.zeros(args.num_classes, dtype=torch.float64, device=env.device)
    union = torch.zeros_like(inter)
    dtype = np.float16 if args.soft_label_dtype == "float16" else np.float32
    written = 0
    t0 = time.time()
    if dataset.files:
        # --batch-size, not --batch_size_val: the original labels the images with its target
        # *train* loader, whose per-GPU batch is --batch-size // world size.
        loader = shard_loader(dataset, per_rank(args.batch_size, env, "--batch-size"), env,
                              workers_per_rank(args.num_workers, env))
        with torch.no_grad():
            for batch in progress(loader, desc="soft labels", env=env, quiet=args.quiet):
                x = to_device_image(batch["img"], env.device, use_channels_last(args.channels_last, env.device))
                with inference_autocast(args.inference_amp, env.device):
                    logits = net(x)
                if with_gt:
                    label = to_device_label(batch["label"], env.device)
                    pred = upsample(logits.float(), label.shape[-2:]).argmax(1)
                    i, u, _ = intersection_and_union(pred, label, args.num_classes, args.ignore_label)
                    inter += i.to(inter)
                    union += u.to(union)
                logits = logits.float().cpu().numpy()
                for path, arr in zip(batch["path"], logits):
                    out = os.path.join(args.output_folder, soft_label_name(path))
                    try:
                        atomic_save_npy(arr.astype(dtype, copy=False), out)
                    except OSError as exc:
                        raise RunError(f"{out}: cannot write soft label ({exc.strerror or exc})") from None
                    written += 1
                if signals.requested():  # this batch's files are complete; the rest waits for --skip_existing
                    break
    # The files written and whether this rank was asked to stop, summed over the ranks; NCCL: on the rank's GPU
    totals = torch.tensor([written, int(signals.requested() is not None)], dtype=torch.int64, device=env.device)
    distributed.all_reduce_sum(totals, env.device)
    count = totals[0]
    LOG.info("soft labels: %d files written to %s in %.1fs (%d already present)", int(count), args.output_folder,
             time.time() - t0, total - len(dataset.files))
    if int(totals[1]):
        stop_run(env, args, f"{total - len(dataset.files) + int(count)} of {total} soft labels are in "
                            f"{args.output_folder}")
    if with_gt:
        distributed.all_reduce_sum(inter, env.device)
        distributed.all_reduce_sum(union, env.device)
        if int(count) > 0:
            iou, miou = mean_iou(inter, union)
            LOG.info("soft labels (argmax) vs train ground truth, %d images (monitoring only):\n%s", int(count),
                     format_iou_table(iou, class_names(args.num_classes), miou))
    return written
