"""LeNet-5 (tanh activations, average pooling), as in the paper: 61,706 parameters for (1, 32, 32), 10 classes."""

from __future__ import annotations

from torch import nn

from rayforge.errors import RayforgeError
from rayforge.models.registry import register_model


class LeNet5(nn.Module):
    """Conv(C->6, 5x5) tanh avgpool2, Conv(6->16, 5x5) tanh avgpool2, Conv(16->120, 5x5) tanh,
    flatten, FC 120->84 tanh, FC 84->num_classes."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, kernel_size=5),
            nn.Tanh(),
            nn.AvgPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5),
            nn.Tanh(),
            nn.AvgPool2d(2),
            nn.Conv2d(16, 120, kernel_size=5),
            nn.Tanh(),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(120, 84),
            nn.Tanh(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


@register_model("lenet5")
def lenet5(in_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    c, h, w = in_shape
    if (h, w) != (32, 32):
        raise RayforgeError(
            f"lenet5 needs 32x32 inputs (the last 5x5 conv must reduce the map to 1x1), got in_shape {tuple(in_shape)}"
        )
    return LeNet5(c, num_classes)
