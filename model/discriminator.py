"""Fully convolutional discriminator of the original (docs/METHOD.md section 2)."""

from __future__ import annotations

from torch import Tensor, nn


class FCDiscriminator(nn.Module):
    """Five 4x4 stride-2 convolutions ``in -> ndf -> 2ndf -> 4ndf -> 8ndf -> 1``.

    LeakyReLU(0.2) between them, none after the last. Key names (``conv1..conv4``,
    ``classifier``) are those of the original's checkpoints.
    """

    def __init__(self, in_channels: int, ndf: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, ndf, kernel_size=4, stride=2, padding=1)
        self.conv2 = nn.Conv2d(ndf, ndf * 2, kernel_size=4, stride=2, padding=1)
        self.conv3 = nn.Conv2d(ndf * 2, ndf * 4, kernel_size=4, stride=2, padding=1)
        self.conv4 = nn.Conv2d(ndf * 4, ndf * 8, kernel_size=4, stride=2, padding=1)
        self.classifier = nn.Conv2d(ndf * 8, 1, kernel_size=4, stride=2, padding=1)
        self.leaky_relu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.leaky_relu(self.conv1(x))
        x = self.leaky_relu(self.conv2(x))
        x = self.leaky_relu(self.conv3(x))
        x = self.leaky_relu(self.conv4(x))
        return self.classifier(x)
