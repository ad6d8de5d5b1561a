"""DecoupleNet: DeepLab-v2 (ResNet-101, output stride 8) with decoupled source/target stems.

docs/METHOD.md section 2. The ResNet is torchvision's, built with
``replace_stride_with_dilation=[False, True, True]`` and split at ``layer`` into a stem and a
body. Phase 1 uses two copies of the stem (``source_stem`` = the original's ``model_B1``,
``target_stem`` = ``model_B2``) and one shared ``body`` (``model_B``); phase 2 and inference
use only the target branch.

Official checkpoint groups (docs/METHOD.md section 2, "Checkpoint format") map to attributes as:

=============================  ===================================================================
official group                 attribute
=============================  ===================================================================
``model_B1_state_dict``        ``source_stem``
``model_B2_state_dict``        ``target_stem``
``model_B_state_dict``         ``body``
``head_state_dict``            ``head``
``classifier_state_dict``      ``classifier``
``aux_classifier_state_dict``  ``aux_classifier`` (ours; the original does not save it)
=============================  ===================================================================

Phase-1 files of ours also hold ``D1_state_dict`` and ``D2_state_dict``, the discriminators
(not part of this network: :meth:`DecoupleNet.load_official` ignores them, phase 1 restores
them from ``--resume``).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from utils.checkpoint import CheckpointError

IMAGENET_WEIGHTS = os.path.join("pretrained", "resnet101-5d3b4d8f.pth")

# Children of torchvision's ResNet in the order the official nn.Sequential stems/bodies use.
RESNET_CHILDREN = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
STEM_CHANNELS = {0: 64, 1: 256, 2: 512}
CHECKPOINTED_LAYERS = ("layer2", "layer3", "layer4")  # --activation_checkpointing

GROUPS = OrderedDict(
    [
        ("model_B1", "source_stem"),
        ("model_B2", "target_stem"),
        ("model_B", "body"),
        ("head", "head"),
        ("classifier", "classifier"),
        ("aux_classifier", "aux_classifier"),
    ]
)
PHASE_GROUPS = {
    1: ("model_B1", "model_B2", "model_B", "head", "classifier", "aux_classifier"),
    2: ("model_B2", "model_B", "head", "classifier"),
}


class FrozenBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm with fixed statistics and affine parameters (``--freeze_bn``).

    Keeps the exact state-dict keys of ``nn.BatchNorm2d`` (``num_batches_tracked`` included) so
    checkpoints stay interchangeable; always normalises with the running statistics.
    """

    def __init__(self, num_features: int, *args, **kwargs) -> None:
        super().__init__(num_features, *args, **kwargs)
        self.weight.requires_grad_(False)
        self.bias.requires_grad_(False)

    def train(self, mode: bool = True) -> FrozenBatchNorm2d:
        return super().train(False)


@contextlib.contextmanager
def running_stats_kept(module: nn.Module):
    """Whatever runs inside leaves the batch-norm running statistics (and ``num_batches_tracked``)
    of ``module`` as they were on entry; outputs are unchanged (a recomputation must save the
    same tensors as the forward, so the batch norms still run in the usual way)."""
    buffers = [b for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
               for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in zip(buffers, saved):
                b.copy_(v)


def _recompute_contexts(block: nn.Module) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """``context_fn`` of :func:`torch.utils.checkpoint.checkpoint`: nothing around the forward;
    :func:`running_stats_kept` around the recomputation, so the statistics are updated once."""
    return contextlib.nullcontext(), running_stats_kept(block)


class ResNetBody(nn.Sequential):
    """The ResNet layers after the stem (the original's ``model_B``), optionally with activation
    checkpointing of the residual blocks of some layers.

    The children and state-dict keys are those of ``nn.Sequential``. Children whose index is in
    :attr:`checkpointed` run each residual block under ``torch.utils.checkpoint`` (non-reentrant)
    while gradients are enabled: only the block inputs are kept, the rest is recomputed in the
    backward. Outputs and gradients are the same; batch-norm running statistics are updated in
    the forward only (:func:`running_stats_kept` around the recomputation).
    """

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__(*layers)
        self.checkpointed: frozenset[int] = frozenset()

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self):
            if i in self.checkpointed and torch.is_grad_enabled():
                for block in layer:
                    x = checkpoint(block, x, use_reentrant=False,
                                   context_fn=functools.partial(_recompute_contexts, block))
            else:
                x = layer(x)
        return x


class ASPPHead(nn.Module):
    """Four parallel dilated 3x3 convolutions (6, 12, 18, 24), outputs summed (docs/METHOD.md section 2).

    No BatchNorm and no ReLU, as in the original ``ASPP_Classifier_Gen`` head. Weights are drawn
    from N(0, 0.01); biases keep PyTorch's default initialisation of ``nn.Conv2d``, as the original
    (it redraws only the weights).
    """

    def __init__(self, in_channels: int = 2048, hidden_dim: int = 128, dilations=(6, 12, 18, 24)) -> None:
        super().__init__()
        self.conv2d_list = nn.ModuleList(
            nn.Conv2d(in_channels, hidden_dim, 3, padding=d, dilation=d, bias=True) for d in dilations
        )
        for conv in self.conv2d_list:
            nn.init.normal_(conv.weight, 0.0, 0.01)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv2d_list[0](x)
        for conv in self.conv2d_list[1:]:
            out = out + conv(x)
        return out


class DecoupleNet(nn.Module):
    """DeepLab-v2 ResNet-101 split into (source stem, target stem) -> body -> head -> classifiers.

    Args:
        num_classes: output classes (19 for Cityscapes, 16 for SYNTHIA).
        layer: where the stems end (0: after maxpool, 1: after layer1, 2: after layer2).
        hidden_dim: channels of the ASPP head.
        decoupled: build a separate ``source_stem`` (phase 1). When False the network has only
            the target branch (phase 2, soft labels, evaluation); ``stem(x, "source")`` then
            uses the target stem, as phase 2 does (docs/METHOD.md section 6).
        aux: build the Self-Discrimination ``aux_classifier`` (phase 1).
        freeze_bn: use :class:`FrozenBatchNorm2d` everywhere in the ResNet.

        after_backbone: called once after the ResNet(s) are built and before the head (phase 1
            builds its discriminators there, where the original does).

    Constructing the network loads no weights; see :meth:`load_imagenet` and
    :meth:`load_official`. A new network is initialised as the original's, drawing from the
    global torch generator the same values in the same order (docs/METHOD.md section 2, "Fresh
    weights"): a whole torchvision ResNet-101 per stem when ``decoupled`` (the source stem
    from the first, the target stem and body from the second; the rest of the first is
    dropped), else one; ``after_backbone``; the ASPP head (weights N(0, 0.01), default
    biases) and the classifier; with ``aux``, a second head that is dropped, then the aux
    classifier (the original's second ``ASPP_Classifier_Gen``, of which it keeps only the
    classifier).
    """

    def __init__(
        self,
        num_classes: int = 19,
        layer: int = 1,
        hidden_dim: int = 128,
        decoupled: bool = True,
        aux: bool = True,
        freeze_bn: bool = False,
        after_backbone: Callable[[], object] | None = None,
    ) -> None:
        super().__init__()
        if layer not in STEM_CHANNELS:
            raise ValueError(f"--layer must be 0, 1 or 2, got {layer}")
        self.num_classes = num_classes
        self.layer = layer
        self.hidden_dim = hidden_dim
        self.freeze_bn = freeze_bn
        self.stem_channels = STEM_CHANNELS[layer]
        split = 4 + layer

        def resnet_children() -> list[nn.Module]:
            resnet = torchvision.models.resnet101(
                weights=None,
                replace_stride_with_dilation=[False, True, True],
                norm_layer=FrozenBatchNorm2d if freeze_bn else nn.BatchNorm2d,
            )
            return [getattr(resnet, name) for name in RESNET_CHILDREN]

        # The construction order below is the original's (train_phase1.py / train_phase2.py), so
        # that one seed gives the original's fresh values for every part (the draws of a
        # torchvision ResNet-101 are those of the original's model/resnet.py).
        # Phase 1 of the original builds two whole ResNet-101s: model_B1 from the first, model_B2
        # and model_B from the second. A deep copy would draw nothing and shift every later part.
        source_stem = nn.Sequential(*resnet_children()[:split]) if decoupled else None
        children = resnet_children()
        self.target_stem = nn.Sequential(*children[:split])
        self.source_stem = source_stem  # registered after target_stem: the module order stays as it was
        self.body = ResNetBody(*children[split:])
        if after_backbone is not None:
            after_backbone()
        self.head = ASPPHead(2048, hidden_dim)
        self.classifier = nn.Conv2d(hidden_dim, num_classes, 1, bias=True)
        if aux:
            # The original's aux classifier is the classifier of a second ASPP_Classifier_Gen whose
            # head it drops: draw that head too. A checkpoint without an aux group copies the
            # classifier into it (load_official), an ImageNet start keeps this initialisation.
            ASPPHead(2048, hidden_dim)
            self.aux_classifier = nn.Conv2d(hidden_dim, num_classes, 1, bias=True)
        else:
            self.aux_classifier = None

    # ------------------------------------------------------------------ forward passes
    @property
    def decoupled(self) -> bool:
        return self.source_stem is not None

    def stem(self, x: Tensor, domain: str = "target") -> Tensor:
        """Stem features of ``x`` (``domain`` is ``"source"`` or ``"target"``)."""
        if domain == "source":
            return (self.source_stem if self.source_stem is not None else self.target_stem)(x)
        if domain == "target":
            return self.target_stem(x)
        raise ValueError(f"domain must be 'source' or 'target', got {domain!r}")

    def decode(self, stem_features: Tensor) -> Tensor:
        """Head features (``hidden_dim`` channels, stride 8) from stem features."""
        return self.head(self.body(stem_features))

    def forward(self, x: Tensor, domain: str = "target") -> Tensor:
        """Logits at output stride 8 of the ``domain`` branch."""
        return self.classifier(self.decode(self.stem(x, domain)))

    def forward_with_aux(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Target-branch ``(logits, aux_logits)`` sharing one head pass."""
        if self.aux_classifier is None:
            raise RuntimeError("this DecoupleNet was built without the aux classifier")
        h = self.decode(self.stem(x, "target"))
        return self.classifier(h), self.aux_classifier(h)

    def set_activation_checkpointing(self, on: bool = True) -> list[str]:
        """Checkpoint (recompute in the backward) the residual blocks of the body's ``layer2``,
        ``layer3`` and ``layer4``, those of them that are in the body at this ``layer``: less
        activation memory for one more forward of them. Returns the checkpointed layer names."""
        split = 4 + self.layer
        names = [n for n in CHECKPOINTED_LAYERS if RESNET_CHILDREN.index(n) >= split]
        self.body.checkpointed = frozenset(RESNET_CHILDREN.index(n) - split for n in names) if on else frozenset()
        return names if on else []

    # ------------------------------------------------------------------ parameter groups
    def backbone_parameters(self) -> list[nn.Parameter]:
        """Stems + body (trained at ``lr``)."""
        mods = [m for m in (self.source_stem, self.target_stem, self.body) if m is not None]
        return [p for m in mods for p in m.parameters()]

    def head_parameters(self) -> list[nn.Parameter]:
        """Head + classifier (+ aux classifier), trained at ``10 * lr`` (docs/METHOD.md section 3)."""
        mods = [m for m in (self.head, self.classifier, self.aux_classifier) if m is not None]
        return [p for m in mods for p in m.parameters()]

    # ------------------------------------------------------------------ weights
    def load_imagenet(self, path: str = IMAGENET_WEIGHTS) -> None:
        """Copy torchvision's ImageNet ResNet-101 file into every stem and the body.

        The head, classifier and aux classifier are not touched (the original's start without
        ``--resume``: fresh initialisation)."""
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path}: ImageNet ResNet-101 weights not found; put torchvision's "
                "resnet101-5d3b4d8f.pth there (see pretrained/README.md) or start from a checkpoint "
                "with --resume"
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        self._load_resnet_state(state, path)

    def _load_resnet_state(self, state: Mapping[str, Tensor], origin: str) -> None:
        """Load a plain ResNet state dict (``conv1.weight``, ``layer1.0...``) into stems + body."""
        groups = {"model_B2": {}, "model_B": {}}
        split = 4 + self.layer
        for key, value in state.items():
            child, _, rest = key.partition(".")
            if child not in RESNET_CHILDREN:
                raise CheckpointError(f"{origin}: unexpected key {key!r}")
            idx = RESNET_CHILDREN.index(child)
            if idx < split:
                groups["model_B2"][f"{idx}.{rest}"] = value
            else:
                groups["model_B"][f"{idx - split}.{rest}"] = value
        if self.source_stem is not None:
            groups["model_B1"] = dict(groups["model_B2"])
        for group, sd in groups.items():
            self._load_group(group, sd, origin)

    def _load_group(self, group: str, state: Mapping[str, Tensor], origin: str) -> None:
        load_group_state(getattr(self, GROUPS[group]), state, group, origin)

    def load_official(self, ckpt: Mapping, origin: str = "checkpoint") -> str:
        """Load an official-format checkpoint dict; returns its layout name.

        Accepted layouts (docs/METHOD.md section 2): ``"phase1"`` (``model_B1/B2/B`` + head + classifier),
        ``"phase2"`` (no ``model_B1``), ``"sourceonly"`` (``model_state_dict`` with ``backbone.*``
        ResNet keys). ``module.`` prefixes are stripped. Missing pieces are derived as the
        original does: the source stem from the target stem (phase 2 into a decoupled net), the
        aux classifier from the classifier. Groups the network does not have (``model_B1`` in a
        target-only net, ``D1``/``D2``) are ignored.
        """
        if not isinstance(ckpt, Mapping):
            raise CheckpointError(f"{origin}: not a checkpoint dict (got {type(ckpt).__name__})")
        groups = {k[: -len("_state_dict")]: v for k, v in ckpt.items() if k.endswith("_state_dict")}
        for name, sd in groups.items():
            if not isinstance(sd, Mapping):
                raise CheckpointError(f"{origin}: {name}_state_dict is not a state dict")
            groups[name] = OrderedDict((_strip_module(k), v) for k, v in sd.items())

        if "model" in groups and "model_B2" not in groups:
            layout = "sourceonly"
            resnet = {}
            for key, value in groups["model"].items():
                if not key.startswith("backbone."):
                    raise CheckpointError(f"{origin}: unexpected key model_state_dict/{key}")
                key = key[len("backbone.") :]
                if not key.startswith("fc."):
                    resnet[key] = value
            self._load_resnet_state(resnet, origin)
        elif "model_B2" in groups:
            layout = "phase1" if "model_B1" in groups else "phase2"
            for group in ("model_B2", "model_B"):
                self._load_group(group, groups[group], origin)
            if self.source_stem is not None:
                self._load_group("model_B1", groups.get("model_B1", groups["model_B2"]), origin)
        else:
            found = ", ".join(sorted(ckpt.keys())) or "nothing"
            raise CheckpointError(
                f"{origin}: unknown checkpoint layout (found {found}; expected model_B2_state_dict "
                "or model_state_dict)"
            )
        for group in ("head", "classifier"):
            if group not in groups:
                raise CheckpointError(f"{origin}: missing {group}_state_dict")
            self._load_group(group, groups[group], origin)
        if self.aux_classifier is not None:
            self._load_group("aux_classifier", groups.get("aux_classifier", groups["classifier"]), origin)
        return layout

    def official_state(self, phase: int = 1) -> OrderedDict:
        """State in the official checkpoint layout of ``phase`` (1 or 2), tensors on the CPU."""
        if phase not in PHASE_GROUPS:
            raise ValueError(f"phase must be 1 or 2, got {phase}")
        out = OrderedDict()
        for group in PHASE_GROUPS[phase]:
            module = getattr(self, GROUPS[group])
            if module is None:
                if group == "model_B1":  # target-only net saved as phase 1: both stems equal
                    module = self.target_stem
                else:
                    continue
            out[f"{group}_state_dict"] = OrderedDict(
                (k, v.detach().cpu().clone()) for k, v in module.state_dict().items()
            )
        return out


def load_group_state(module: nn.Module, state: Mapping[str, Tensor], group: str, origin: str) -> None:
    """``module.load_state_dict(state)`` of checkpoint group ``group`` (keys without ``module.``);
    a missing or unexpected key or a wrong shape is a :class:`CheckpointError` naming the first one."""
    own = module.state_dict()
    for key in own:
        if key not in state:
            raise CheckpointError(f"{origin}: missing key {group}/{key}")
    for key, value in state.items():
        if key not in own:
            raise CheckpointError(f"{origin}: unexpected key {group}/{key}")
        if not isinstance(value, Tensor):
            raise CheckpointError(f"{origin}: {group}/{key} is not a tensor")
        if tuple(value.shape) != tuple(own[key].shape):
            raise CheckpointError(
                f"{origin}: shape mismatch for {group}/{key}: checkpoint {tuple(value.shape)}, "
                f"network {tuple(own[key].shape)} (check --layer / --hidden_dim / --num-classes)"
            )
    module.load_state_dict(state, strict=True)


def sourceonly_state(net: DecoupleNet) -> OrderedDict:
    """The source-only layout (``pretrained/sourceonly.pth``, docs/METHOD.md section 2) of ``net``'s target branch.

    ``model_state_dict`` holds the ResNet as ``backbone.conv1.weight``, ``backbone.layer1.0...``;
    plus ``head_state_dict`` and ``classifier_state_dict``.
    """
    split = 4 + net.layer
    backbone = OrderedDict()
    for part, offset in ((net.target_stem, 0), (net.body, split)):
        for key, value in part.state_dict().items():
            idx, _, rest = key.partition(".")
            backbone[f"backbone.{RESNET_CHILDREN[int(idx) + offset]}.{rest}"] = value.detach().cpu().clone()
    return OrderedDict(
        model_state_dict=backbone,
        head_state_dict=OrderedDict((k, v.detach().cpu().clone()) for k, v in net.head.state_dict().items()),
        classifier_state_dict=OrderedDict(
            (k, v.detach().cpu().clone()) for k, v in net.classifier.state_dict().items()
        ),
    )


def _strip_module(key: str) -> str:
    return key.removeprefix("module.")


def upsample(x: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """Bilinear resize with ``align_corners=True`` (the original's ``interp``)."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)
