"""ResNet-mini, as in the paper: 1,488,906 parameters for (3, 32, 32), 10 classes.

Reading of the architecture text that gives exactly 1,488,906:
  * every conv has a bias (also those followed by BatchNorm), Linear layers have biases,
    BatchNorm layers are affine;
  * the stem is Conv(3->64, 4x4, stride 2, pad 1) + BN + ReLU (32 -> 16), the head conv is
    Conv(64->128, 4x4, stride 2, pad 1) + ReLU with no BN (16 -> 8), so the classifier sees
    128 x 8 x 8 = 8192 features;
  * a residual block is ``x + f(x)`` with f = [conv3x3, BN, ReLU, conv3x3, BN, ReLU], i.e. the
    identity is added *after* the block's last ReLU, with no activation after the addition
    (the placement of the addition does not change the count; this is the literal reading).
Count: stem 3,264 + 4 blocks x 74,112 + head conv 131,200 + FC/BN1d 1,057,994 = 1,488,906.
"""

from __future__ import annotations

from torch import nn

from rayforge.errors import RayforgeError
from rayforge.models.registry import register_model


class ResidualBlock(nn.Module):
    def __init__(self, channels: int = 64):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
        )

    def forward(self, x):
        return x + self.body(x)  # out-of-place, vmap-safe


def _down(n: int) -> int:
    """Spatial size after a 4x4, stride 2, padding 1 conv."""
    return (n + 2 * 1 - 4) // 2 + 1


class ResNetMini(nn.Module):
    def __init__(self, in_shape: tuple[int, int, int] = (3, 32, 32), num_classes: int = 10, num_blocks: int = 4):
        super().__init__()
        c, h, w = in_shape
        self.stem = nn.Sequential(
            nn.Conv2d(c, 64, kernel_size=4, stride=2, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
        )
        self.blocks = nn.Sequential(*[ResidualBlock(64) for _ in range(num_blocks)])
        self.head = nn.Sequential(
            nn.Conv2d(64, 128, kernel_size=4, stride=2, padding=1),
            nn.ReLU(),
        )
        flat = 128 * _down(_down(h)) * _down(_down(w))
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat, 128),
            nn.BatchNorm1d(128),
            nn.ReLU(),
            nn.Linear(128, 64),
            nn.BatchNorm1d(64),
            nn.ReLU(),
            nn.Linear(64, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.head(self.blocks(self.stem(x))))


@register_model("resnet_mini")
def resnet_mini(in_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    _, h, w = in_shape
    if h < 4 or w < 4:
        raise RayforgeError(
            f"resnet_mini needs inputs of at least 4x4 (two stride-2 4x4 convs), got in_shape {tuple(in_shape)}"
        )
    return ResNetMini(tuple(in_shape), num_classes)
