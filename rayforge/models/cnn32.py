"""cnn32-3-max, LiRA's small shadow ConvNet (tensorflow/privacy research/mi_lira_2021, `network('cnn32-3-max')`,
i.e. objax.zoo.convnet.ConvNet(scales=3, filters=32, filters_max=1024, pooling=max_pool_2d)).

    Conv(C->32) lrelu, then per scale s = 0, 1, 2: Conv(32*2^s -> 32*2^s) lrelu, Conv(32*2^s -> 32*2^(s+1)) lrelu,
    max-pool 2x2; then Conv(256 -> num_classes) and the mean over the spatial positions.

Every conv is 3x3, stride 1, 'SAME' padding, with a bias (objax's Conv2D defaults); leaky ReLU slope 0.01 (objax's
default); weights drawn from N(0, 1/fan_in) (objax's kaiming_normal), biases 0. 605,226 parameters for (3, 32, 32)
inputs and 10 classes, 604,650 for (1, 32, 32). No BatchNorm, so it forges and vmaps like LeNet-5.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rayforge.errors import RayforgeError
from rayforge.models.registry import register_model

SCALES = 3
FILTERS = 32
LEAK = 0.01


def _conv(cin: int, cout: int) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, kernel_size=3, padding=1)
    with torch.no_grad():
        conv.weight.normal_(0.0, math.sqrt(1.0 / (cin * 9)))
        conv.bias.zero_()
    return conv


class CNN32(nn.Module):
    def __init__(self, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        width = [FILTERS << s for s in range(SCALES + 1)]
        layers: list[nn.Module] = [_conv(in_channels, width[0]), nn.LeakyReLU(LEAK)]
        for s in range(SCALES):
            layers += [_conv(width[s], width[s]), nn.LeakyReLU(LEAK),
                       _conv(width[s], width[s + 1]), nn.LeakyReLU(LEAK), nn.MaxPool2d(2)]
        layers.append(_conv(width[SCALES], num_classes))
        self.features = nn.Sequential(*layers)

    def forward(self, x):
        return self.features(x).mean(dim=(2, 3))


@register_model("cnn32_3_max")
def cnn32_3_max(in_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    c, h, w = in_shape
    if h < 2 ** SCALES or w < 2 ** SCALES:
        raise RayforgeError(f"cnn32_3_max needs inputs of at least 8x8 (three 2x2 max-pools), got in_shape "
                            f"{tuple(in_shape)}")
    return CNN32(c, num_classes)
