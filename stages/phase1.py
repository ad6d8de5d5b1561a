"""Phase 1: decoupled stems, two discriminators, Self-Discrimination with online thresholds.

docs/METHOD.md section 3. One iteration (per micro-batch) is three passes of :class:`Phase1Objective`,
which holds the network and both discriminators so that a single DDP wrapper covers every
parameter: source, target, discriminators, each back-propagated before the next starts, as the
original does (its six backward calls become three; the gradients are the same sums).
:meth:`Phase1Stage.step` runs them in that order.
"""

from __future__ import annotations

from argparse import Namespace
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from datasets.build import source_train_dataset, target_train_dataset
from datasets.labels import class_names
from datasets.loader import to_device_label
from engine.common import LOG
from engine.optim import optimizer_kernels
from engine.options import ArgumentGroup, OptionError
from engine.trainer import ForwardBackward, PassObjective, PassResult, Stage
from model import CheckpointError, DecoupleNet, FCDiscriminator, upsample
from model.decouplenet import STEM_CHANNELS, load_group_state
from stages.losses import cross_entropy
from stages.pseudo_quality import make_monitor
from utils import distributed as du
from utils.thresholds import OnlineClassThresholds

TEMPERATURE = 1.8
SOURCE_LABEL = 0.0  # discriminator label of the source domain
TARGET_LABEL = 1.0  # discriminator label of the target domain

# train_phase1.py's own defaults of shared flags (engine.options.add_shared_arguments): the original's.
FLAG_DEFAULTS = {"learning_rate": 2.5e-4, "num_steps": 93750, "num_steps_stop": 60000,
                 "clrjit_params": "0.0,0.0,0.0,0.0", "resume": "./pretrained/sourceonly.pth"}


def add_arguments(group: ArgumentGroup) -> None:
    """Phase 1's flags: the GAN loss, the loss weights and the online thresholds (docs/METHOD.md section 3)."""
    group.add_argument("--gan", default="LS", choices=["LS", "Vanilla"])
    group.add_argument("--lambda_adv_src", type=float, default=0.1)
    group.add_argument("--lambda_adv_tgt", type=float, default=0.01)
    group.add_argument("--lambda_st", type=float, default=0.1)
    group.add_argument("--conf_bank_length", type=int, default=100000)
    group.add_argument("--conf_p", type=float, default=0.8)


def check_arguments(args: Namespace) -> None:
    """Raise :class:`OptionError` for a phase-1 value the method cannot use."""
    # --conf_p 0 is the original's "highest confidence of the bank" (index 0 of the descending
    # sort); 1 or more makes the original's index run past the bank (IndexError), a negative
    # value makes it count from the bank's end.
    if not 0.0 <= args.conf_p < 1.0:
        raise OptionError(f"--conf_p: must be in [0, 1), got {args.conf_p}")


def gan_loss(kind: str, out: Tensor, label: float) -> Tensor:
    """LS-GAN (MSE, the default) or vanilla GAN (BCE with logits) against a constant label."""
    target = torch.full_like(out, label)
    if kind == "LS":
        return F.mse_loss(out.float(), target.float())
    return F.binary_cross_entropy_with_logits(out.float(), target.float())


def frozen(module: nn.Module, x: Tensor) -> Tensor:
    """``module(x)`` with its parameters detached: gradients reach ``x`` but not the module.

    This is the original's ``requires_grad=False`` around the generator's adversarial terms,
    without mutating the module (its parameters keep requiring gradients, as DDP expects).
    """
    params = {k: v.detach() for k, v in module.named_parameters()}
    return functional_call(module, params, (x,))


def load_discriminators(ckpt: Mapping, modules: Mapping[str, nn.Module], origin: str) -> list[str]:
    """Load the ``<name>_state_dict`` groups of ``ckpt`` (``module.`` prefixes stripped) into
    ``modules`` (``{"D1": d1, "D2": d2}``); returns the names loaded.

    A file without them (a source-only file, or a phase-1 file of the original, which does not
    save its discriminators) leaves those discriminators at their fresh initialisation.
    """
    loaded = []
    for name, module in modules.items():
        state = ckpt.get(f"{name}_state_dict")
        if state is None:
            continue
        if not isinstance(state, Mapping):
            raise CheckpointError(f"{origin}: {name}_state_dict is not a state dict")
        load_group_state(module, OrderedDict((k.removeprefix("module."), v) for k, v in state.items()), name, origin)
        loaded.append(name)
    return loaded


class SourceOutputs(NamedTuple):
    """What the source pass hands to the discriminators' pass (detached)."""

    features: Tensor  # f_s, the source stem's output (D1's input, upsampled to the image)
    prediction: Tensor  # p_s, the upsampled logits over the temperature (D2's input, after softmax)
    image_hw: tuple[int, int]  # the crop's size


class TargetOutputs(NamedTuple):
    """What the target pass hands on: to the discriminators' pass (detached), and its pseudo
    labels to the pseudo-label monitor."""

    features: Tensor  # f_t
    prediction: Tensor  # p_t
    image_hw: tuple[int, int]
    pseudo_labels: Tensor  # the aux classifier's labels at 1/8 (ignore where below the threshold)


class Phase1Objective(PassObjective):
    """Network + D1 + D2 in one module (one DDP wrapper): the losses of one phase-1 iteration
    (docs/METHOD.md section 3, steps 3-5), and the online class thresholds of step 4.

    An iteration runs its three passes in the original's order, each back-propagated before the
    next starts: :meth:`source` (segmentation and adversarial losses of the source crop),
    :meth:`target` (Self-Discrimination and adversarial losses of the target crop),
    :meth:`discriminators` (D1 and D2 on the detached features and predictions of both). So only
    one pass's activations are alive at a time, as in the original. The first two passes also
    hand on the detached tensors the third one needs.
    """

    def __init__(self, net: DecoupleNet, d1: FCDiscriminator, d2: FCDiscriminator, args: Any,
                 device: torch.device) -> None:
        super().__init__()
        self.net, self.d1, self.d2 = net, d1, d2
        self.args = args
        self.device = device  # the run's device: the thresholds are all-reduced there
        self.class_thresholds = OnlineClassThresholds(args.num_classes, p=args.conf_p,
                                                      bank_length=args.conf_bank_length, device=device)
        self.recompute_d1_input = bool(args.activation_checkpointing)

    def d1_on_image(self, f: Tensor, hw: tuple[int, int] | torch.Size, frozen_d1: bool = False) -> Tensor:
        """D1 on stem features ``f`` upsampled to the image size ``hw`` (``frozen_d1``: through
        detached D1 parameters). Under ``--activation_checkpointing`` the full-resolution input
        and D1's activations are recomputed in the backward instead of kept."""
        def run(features: Tensor) -> Tensor:
            x = upsample(features, hw)
            return frozen(self.d1, x) if frozen_d1 else self.d1(x)

        if self.recompute_d1_input and torch.is_grad_enabled():
            return checkpoint(run, f, use_reentrant=False)
        return run(f)

    def source(self, x_s: Tensor, y_s: Tensor) -> PassResult[SourceOutputs]:
        """Step 3: B1 -> B -> head -> cls, temperature, CE; D1 sees the stem upsampled to the image."""
        args, net = self.args, self.net
        f_s = net.stem(x_s, "source")
        # The adversarial term first: the backward then reaches it last, after the body's
        # activations are freed (a lower peak; the same values and gradients).
        loss_adv_src = args.lambda_adv_src * gan_loss(
            args.gan, self.d1_on_image(f_s, x_s.shape[-2:], frozen_d1=True), TARGET_LABEL)
        p_s = upsample(net.classifier(net.decode(f_s)), y_s.shape[-2:]) / TEMPERATURE
        loss_seg = cross_entropy(p_s, y_s, args.ignore_label)
        losses = {"total": loss_seg + loss_adv_src, "loss_seg": loss_seg, "loss_adv_src": loss_adv_src}
        return losses, SourceOutputs(f_s.detach(), p_s.detach(), tuple(x_s.shape[-2:]))

    def target(self, x_t: Tensor) -> PassResult[TargetOutputs]:
        """Step 4: B2 -> B -> head; online pseudo labels for the aux classifier (at 1/8)."""
        args, net = self.args, self.net
        f_t = net.stem(x_t, "target")
        h_t = net.decode(f_t)
        q = net.classifier(h_t)
        with torch.no_grad():
            pseudo, kept = self.pseudo_labels(q.detach())
        loss_st = args.lambda_st * cross_entropy(net.aux_classifier(h_t), pseudo, args.ignore_label)
        p_t = upsample(q, x_t.shape[-2:]) / TEMPERATURE
        loss_adv_tgt = args.lambda_adv_tgt * gan_loss(args.gan, frozen(self.d2, F.softmax(p_t, 1)), SOURCE_LABEL)
        losses = {"total": loss_st + loss_adv_tgt, "loss_st": loss_st, "loss_adv_tgt": loss_adv_tgt,
                  "pseudo_kept": kept}
        return losses, TargetOutputs(f_t.detach(), p_t.detach(), tuple(x_t.shape[-2:]), pseudo)

    def pseudo_labels(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """Online pseudo labels at 1/8 (docs/METHOD.md section 3 step 4).

        Update this rank's class banks, average the thresholds over ranks (the original's
        all-reduce / world size), then ignore pixels below their class threshold. Returns the
        labels and the fraction of pixels kept. No host synchronisation.
        """
        conf, pred = F.softmax(logits.float(), 1).max(1)
        thresholds = self.class_thresholds.update(conf, pred).clone()
        du.all_reduce_mean(thresholds, self.device)
        self.class_thresholds.thresholds = thresholds
        keep = conf >= thresholds[pred]
        labels = torch.where(keep, pred, torch.full_like(pred, self.args.ignore_label))
        return labels, keep.float().mean()

    def discriminators(self, source: SourceOutputs, target: TargetOutputs) -> PassResult[None]:
        """Step 5: D1 on the stems upsampled to the images, D2 on the softmax predictions."""
        gan = self.args.gan
        loss_d1 = 0.5 * gan_loss(gan, self.d1_on_image(source.features, source.image_hw), SOURCE_LABEL) + \
            0.5 * gan_loss(gan, self.d1_on_image(target.features, target.image_hw), TARGET_LABEL)
        loss_d2 = 0.5 * gan_loss(gan, self.d2(F.softmax(source.prediction, 1)), SOURCE_LABEL) + \
            0.5 * gan_loss(gan, self.d2(F.softmax(target.prediction, 1)), TARGET_LABEL)
        return {"total": loss_d1 + loss_d2, "loss_D1": loss_d1, "loss_D2": loss_d2}, None


class Phase1Stage(Stage):
    name = "phase1"
    objective: Phase1Objective
    original_scalars = ("loss_seg", "loss_adv_src", "loss_adv_tgt", "loss_D1", "loss_D2", "loss_st")

    def build(self) -> None:
        args, env = self.args, self.env
        start: dict = {}  # the --resume file, kept only until the discriminators are built
        parts: dict[str, FCDiscriminator] = {}

        def discriminators() -> None:
            # Drawn where the original builds them: after both ResNets, before the ASPP heads.
            parts["D1"] = FCDiscriminator(STEM_CHANNELS[args.layer], ndf=32)
            parts["D2"] = FCDiscriminator(args.num_classes, ndf=64)

        net = self.build_net(decoupled=True, aux=True, checkpoint_hook=lambda ckpt: start.update(ckpt=ckpt),
                             after_backbone=discriminators)
        d1, d2 = parts["D1"], parts["D2"]
        if start:
            # A full phase-1 checkpoint of ours also starts both discriminators; any other file
            # (source-only, the original's phase-1 files) leaves them freshly initialised.
            loaded = load_discriminators(start.pop("ckpt"), {"D1": d1, "D2": d2}, args.resume)
            fresh = [n for n in ("D1", "D2") if n not in loaded]
            if loaded:
                LOG.info("discriminators %s from %s", ", ".join(loaded), args.resume)
            if fresh:
                LOG.info("discriminators %s start fresh (not in %s)", ", ".join(fresh), args.resume)
        objective = Phase1Objective(net, d1, d2, args, env.device)
        if args.conf_p == 0 and env.is_main:
            LOG.warning("--conf_p 0: each class threshold is the highest confidence in its bank (as the original), "
                        "so the aux classifier learns only from the pixels at that maximum, almost none")
        # The last pass (discriminators) reaches D1 and D2 only: see prepare_for_training.
        inner = self.train_objective(objective, find_unused_parameters=True)
        self.d1, self.d2 = inner.d1, inner.d2
        self.extra_modules = {"D1": self.d1, "D2": self.d2}

        adam = optimizer_kernels(args.fused_optimizers, env.device)
        self.optimizers.update({
            "D1": (torch.optim.Adam(self.d1.parameters(), lr=args.learning_rate_D, betas=(0.9, 0.99), **adam),
                   args.learning_rate_D),
            "D2": (torch.optim.Adam(self.d2.parameters(), lr=args.learning_rate_D, betas=(0.9, 0.99), **adam),
                   args.learning_rate_D),
        })

    def official_state(self) -> dict:
        """The official phase-1 groups plus ``aux_classifier``, ``D1`` and ``D2`` (the original's
        loaders pick their groups by name and ignore these; ``--resume`` restores them)."""
        out = self.net.official_state(phase=1)
        for name, module in (("D1", self.d1), ("D2", self.d2)):
            out[f"{name}_state_dict"] = OrderedDict(
                (k, v.detach().cpu().clone()) for k, v in module.state_dict().items())
        return out

    def batches(self, start_iter: int):
        args = self.args
        target = target_train_dataset(args)
        self.pseudo_monitor = make_monitor(target, args.num_classes, args.ignore_label, self.env, LOG,
                                           no_pseudo_eval=args.no_pseudo_eval)
        return self.domain_batches(start_iter, source_train_dataset(args, cache_dir=args.snapshot_dir), target)

    def step(self, it: int, batch: tuple, forward_backward: ForwardBackward) -> None:
        """One micro-batch: the source, target and discriminators' passes of :class:`Phase1Objective`,
        in the original's order; the first two hand their detached features and predictions to
        the third."""
        source_batch, target_batch = batch
        device, objective = self.env.device, self.objective
        source = forward_backward(objective.source, self.image(source_batch),
                                  to_device_label(source_batch["label"], device))
        target = forward_backward(objective.target, self.image(target_batch))
        if self.pseudo_monitor is not None:  # the aux classifier's labels (stride 8) vs the crop's ground truth
            self.pseudo_monitor.observe_stride8(target.pseudo_labels, to_device_label(target_batch["label"], device))
        forward_backward(objective.discriminators, source, target, last=True)

    def tensorboard_extra(self, writer: Any, it: int) -> None:
        for name, v in zip(class_names(self.args.num_classes), self.objective.class_thresholds.thresholds.tolist()):
            writer.add_scalar(f"thresholds/{name}", v, it)

    def extra_state(self) -> dict:
        return {"thresholds": self.objective.class_thresholds.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.objective.class_thresholds.load_state_dict(state["thresholds"])
        LOG.info("class banks and thresholds restored")
