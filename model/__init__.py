"""DecoupleNet model: DeepLab-v2 ResNet-101 with decoupled stems, and the discriminators."""

from model.decouplenet import CheckpointError, DecoupleNet, FrozenBatchNorm2d, upsample
from model.discriminator import FCDiscriminator

__all__ = ["CheckpointError", "DecoupleNet", "FCDiscriminator", "FrozenBatchNorm2d", "upsample"]
