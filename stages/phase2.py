"""Phase 2: Online Enhanced Self-Training (docs/METHOD.md section 6).

One network (the target branch of phase 1). Each iteration: the source CE, then pseudo
labels for the target crop fused from the saved soft label and the network's own
prediction on the whole image (both carried through the crop's augmentation on the
training device), then the target CE. One DDP wrapper; the source loss is back-propagated
before the target pass, as the original does.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch import Tensor

from datasets.build import source_train_dataset, target_train_dataset
from datasets.errors import DatasetError
from datasets.labels import class_names
from datasets.loader import to_device_label
from engine.common import LOG
from engine.options import ArgumentGroup
from engine.trainer import ForwardBackward, PassObjective, PassResult, Stage
from model import DecoupleNet, upsample
from stages.losses import cross_entropy
from stages.pseudo_quality import make_monitor
from utils.pseudo_labels import carry_to_crop, fuse_pseudo_labels, online_prediction_to_crop

# train_phase2.py's own defaults of shared flags (engine.options.add_shared_arguments): the original's.
FLAG_DEFAULTS = {"learning_rate": 2.5e-4, "num_steps": 62500, "num_steps_stop": 40000,
                 "clrjit_params": "0.5,0.5,0.5,0.2", "resume": "./pretrained/model_phase1.pth"}


def add_arguments(group: ArgumentGroup) -> None:
    """Phase 2's flags: its inputs (soft labels, class thresholds) and the source loss weight."""
    group.add_argument("--soft_labels_folder", default="")
    group.add_argument("--thresholds_path", default="")
    group.add_argument("--src_loss_weight", type=float, default=1.0)


def load_thresholds(path: str, num_classes: int) -> np.ndarray:
    """The class thresholds file of docs/METHOD.md section 5; one clear error if it does not fit."""
    if not path:
        raise DatasetError("--thresholds_path: required for phase 2 (made by datasets/get_thresholds.py)")
    if not os.path.isfile(path):
        raise DatasetError(f"--thresholds_path {path}: file not found")
    try:
        thr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"--thresholds_path {path}: not a .npy array ({exc})") from None
    thr = np.asarray(thr, dtype=np.float64).reshape(-1) if thr.ndim <= 1 else thr
    if thr.ndim != 1 or thr.shape[0] != num_classes:
        raise DatasetError(f"--thresholds_path {path}: expected {num_classes} values, got shape {tuple(np.shape(thr))}")
    if not np.isfinite(thr).all():
        raise DatasetError(f"--thresholds_path {path}: holds non-finite values (NaN/inf) for classes "
                           f"{np.flatnonzero(~np.isfinite(thr)).tolist()}")
    return thr


class Phase2Objective(PassObjective):
    """Network wrapper computing the losses of one phase-2 iteration in two passes, :meth:`source`
    and :meth:`target`; the source loss is back-propagated before the target pass starts, as the
    original does, so only one pass's activations are alive at a time."""

    def __init__(self, net: DecoupleNet, args: Any) -> None:
        super().__init__()
        self.net = net
        self.args = args

    def source(self, x_s: Tensor, y_s: Tensor) -> PassResult[None]:
        """1. Source CE through the target stem (no temperature)."""
        loss_src = cross_entropy(upsample(self.net(x_s), y_s.shape[-2:]), y_s, self.args.ignore_label)
        return {"total": self.args.src_loss_weight * loss_src, "loss_src_seg": loss_src}, None

    def target(self, x_t: Tensor, img_full: Tensor, soft: Tensor, resized_hw: Tensor, crop_box: Tensor,
               flip: Tensor, thresholds: Tensor) -> PassResult[Tensor]:
        """2.-3. Fused pseudo labels for the target crop, then the target CE on them. Hands on
        the pseudo labels (for the pseudo-label monitor)."""
        args, net = self.args, self.net
        crop_hw = tuple(x_t.shape[-2:])
        # 2. pseudo labels (no grad; the network stays in train mode, as the original).
        with torch.no_grad():
            full_hw = tuple(img_full.shape[-2:])
            soft_crop = carry_to_crop(soft.float(), full_hw, resized_hw, crop_box, flip, crop_hw=crop_hw)
            # The logits stay in the autocast dtype: the original upsamples the fp16 classifier
            # output (interpolation is on neither autocast list) and only the softmax runs in fp32.
            pred_crop = online_prediction_to_crop(net(img_full), crop_hw, resized_hw, crop_box, flip)
            pseudo = fuse_pseudo_labels(pred_crop, soft_crop, thresholds, args.ignore_label)
        # 3. target CE on the fused pseudo labels.
        loss_seg = cross_entropy(upsample(net(x_t), crop_hw), pseudo, args.ignore_label)
        kept = (pseudo != args.ignore_label).float().mean()
        return {"total": loss_seg, "loss_seg": loss_seg, "pseudo_kept": kept}, pseudo


class Phase2Stage(Stage):
    name = "phase2"
    objective: Phase2Objective
    official_phase = 2
    original_scalars = ("loss_seg", "loss_src_seg")

    def build(self) -> None:
        args, env = self.args, self.env
        if not args.soft_labels_folder:
            raise DatasetError("--soft_labels_folder: required for phase 2 (made by generate_soft_label.py)")
        self.thresholds_np = load_thresholds(args.thresholds_path, args.num_classes)

        self.target_set = target_train_dataset(args, soft_labels=True)

        self.pseudo_monitor = make_monitor(self.target_set, args.num_classes, args.ignore_label, env, LOG,
                                           no_pseudo_eval=args.no_pseudo_eval)
        w, h = args.tgt_img_size
        self.target_set.check_soft_labels(args.num_classes, (h // 8 + (h % 8 > 0), w // 8 + (w % 8 > 0)))
        self.train_objective(Phase2Objective(self.build_net(decoupled=False, aux=False), args))
        self.thresholds = torch.as_tensor(self.thresholds_np, dtype=torch.float32, device=env.device)

        LOG.info("class thresholds from %s: %s", args.thresholds_path,
                 ", ".join(f"{n}={t:.3f}" for n, t in zip(class_names(args.num_classes), self.thresholds_np)))

    def batches(self, start_iter: int):
        return self.domain_batches(start_iter, source_train_dataset(self.args, cache_dir=self.args.snapshot_dir),
                                   self.target_set)

    def step(self, it: int, batch: tuple, forward_backward: ForwardBackward) -> None:
        """One micro-batch: the source pass, then the target pass of :class:`Phase2Objective`."""
        source_batch, target_batch = batch
        device, objective = self.env.device, self.objective
        forward_backward(objective.source, self.image(source_batch), to_device_label(source_batch["label"], device))
        soft_labels = target_batch["soft_label"].to(device, non_blocking=True)
        pseudo_labels = forward_backward(objective.target, self.image(target_batch),
                                         self.image(target_batch, "img_full"), soft_labels,
                                         target_batch["resized_hw"], target_batch["crop_box"], target_batch["flip"],
                                         self.thresholds, last=True)
        if self.pseudo_monitor is not None:  # the fused labels vs the crop's ground truth
            self.pseudo_monitor.observe(pseudo_labels, to_device_label(target_batch["label"], device))

    def tensorboard_extra(self, writer: Any, it: int) -> None:
        if it == 0 or it % 1000 == 0:
            for name, v in zip(class_names(self.args.num_classes), self.thresholds_np):
                writer.add_scalar(f"thresholds/{name}", float(v), it)
