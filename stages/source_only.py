"""Source-only training: DeepLab-v2 ResNet-101 on labelled source images (``sourceonly.pth``).

Not in the original code release; it produces the start point phase 1 reads (docs/METHOD.md section 2).
Same engine, SGD and poly schedule as the other stages; plain CE (no temperature).
"""

from __future__ import annotations

import os
from typing import Any

from torch import Tensor

from datasets.build import source_train_dataset
from datasets.loader import to_device_label
from engine.common import LOG
from engine.trainer import ForwardBackward, PassObjective, PassResult, Stage
from model import DecoupleNet, upsample
from model.decouplenet import sourceonly_state
from stages.losses import cross_entropy
from utils.checkpoint import atomic_save

# train_source_only.py's own defaults of shared flags (engine.options.add_shared_arguments); it has
# no flags of its own.
FLAG_DEFAULTS = {"learning_rate": 2.5e-4, "num_steps": 62500, "num_steps_stop": 40000,
                 "clrjit_params": "0.0,0.0,0.0,0.0", "resume": ""}


class SourceOnlyObjective(PassObjective):
    """The network and its one pass, :meth:`source`."""

    def __init__(self, net: DecoupleNet, args: Any) -> None:
        super().__init__()
        self.net = net
        self.args = args

    def source(self, x_s: Tensor, y_s: Tensor) -> PassResult[None]:
        """Plain CE of the upsampled logits on the source labels."""
        loss = cross_entropy(upsample(self.net(x_s), y_s.shape[-2:]), y_s, self.args.ignore_label)
        return {"total": loss, "loss_seg": loss}, None


class SourceOnlyStage(Stage):
    name = "source_only"
    objective: SourceOnlyObjective

    def build(self) -> None:
        self.train_objective(SourceOnlyObjective(self.build_net(decoupled=False, aux=False), self.args))

    def official_state(self) -> dict:
        return sourceonly_state(self.net)

    def batches(self, start_iter: int):
        return self.domain_batches(start_iter, source_train_dataset(self.args, cache_dir=self.args.snapshot_dir))

    def step(self, it: int, batch: tuple, forward_backward: ForwardBackward) -> None:
        """One micro-batch: the one pass of :class:`SourceOnlyObjective`."""
        (source_batch,) = batch
        forward_backward(self.objective.source, self.image(source_batch),
                         to_device_label(source_batch["label"], self.env.device), last=True)


def export_sourceonly(stage: SourceOnlyStage) -> str:
    """Write ``<snapshot>/sourceonly.pth`` (the format ``train_phase1.py --resume`` reads)."""
    path = os.path.join(stage.args.snapshot_dir, "sourceonly.pth")
    if stage.env.is_main:
        atomic_save(sourceonly_state(stage.net), path)
        LOG.info("source-only model written to %s (use it as train_phase1.py --resume)", path)
    return path
