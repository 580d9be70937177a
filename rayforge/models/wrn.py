"""WideResNet-28-2, LiRA's CIFAR-10 shadow model (tensorflow/privacy research/mi_lira_2021, `network('wrn28-2')`,
i.e. objax.zoo.wide_resnet.WideResNet(depth=28, width=2)): 1,467,610 parameters for (3, 32, 32) and 10 classes.

    Conv(C->16), three groups of 4 pre-activation blocks of widths 32, 64, 128 (strides 1, 2, 2), then
    BN, ReLU, the spatial mean and Linear(128 -> num_classes).
    A block is o1 = relu(bn1(x)); z = conv2(relu(bn2(conv1(o1)))); out = z + proj(o1) when the width or stride
    changes (proj a 1x1 conv), else z + x.

As in objax: convs have no bias and 'SAME' padding (a stride-2 3x3 conv pads 0 before and 1 after an even-sized
input, not 1 and 1), weights from N(0, 2 / (k*k*out)); the Linear layer from a +-2 sigma truncated normal of std
sqrt(2 / (in + out)) (rescaled for the truncation, as objax does) with bias 0; BatchNorm eps 1e-5 and momentum 0.9
in objax's convention (0.1 in torch's).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rayforge.errors import RayforgeError
from rayforge.models.registry import register_model

DEPTH, WIDTH = 28, 2
TRUNCATED_STD = 0.87962566103423978  # std of a standard normal truncated to [-2, 2]


class ConvSame(nn.Conv2d):
    """A bias-free k x k conv with TensorFlow's 'SAME' padding (the odd pixel goes after), computed per input size."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1):
        super().__init__(cin, cout, k, stride=stride, padding=0, bias=False)
        with torch.no_grad():
            self.weight.normal_(0.0, math.sqrt(2.0 / (k * k * cout)))

    def forward(self, x):
        pads = []
        for size in (x.shape[-1], x.shape[-2]):  # F.pad takes the last dimension first
            total = max((math.ceil(size / self.stride[0]) - 1) * self.stride[0] + self.kernel_size[0] - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads) if any(pads) else x)


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.norm_1 = nn.BatchNorm2d(cin)
        self.conv_1 = ConvSame(cin, cout, 3, stride)
        self.norm_2 = nn.BatchNorm2d(cout)
        self.conv_2 = ConvSame(cout, cout, 3)
        self.proj = ConvSame(cin, cout, 1, stride) if cin != cout or stride > 1 else None

    def forward(self, x):
        o1 = F.relu(self.norm_1(x))
        z = self.conv_2(F.relu(self.norm_2(self.conv_1(o1))))
        return z + (self.proj(o1) if self.proj is not None else x)


class WideResNet(nn.Module):
    def __init__(self, in_channels: int = 3, num_classes: int = 10, depth: int = DEPTH, width: int = WIDTH):
        super().__init__()
        per_group = (depth - 4) // 6
        layers: list[nn.Module] = [ConvSame(in_channels, 16, 3)]
        cin = 16
        for group in range(3):
            cout = 16 * 2 ** group * width
            for b in range(per_group):
                layers.append(Block(cin, cout, 2 if group > 0 and b == 0 else 1))
                cin = cout
        self.body = nn.Sequential(*layers)
        self.norm = nn.BatchNorm2d(cin)
        self.linear = nn.Linear(cin, num_classes)
        with torch.no_grad():
            nn.init.trunc_normal_(self.linear.weight, 0.0, 1.0, -2.0, 2.0)
            self.linear.weight.mul_(math.sqrt(2.0 / (cin + num_classes)) / TRUNCATED_STD)
            self.linear.bias.zero_()

    def forward(self, x):
        return self.linear(F.relu(self.norm(self.body(x))).mean(dim=(2, 3)))


@register_model("wrn28_2")
def wrn28_2(in_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    c, h, w = in_shape
    if h < 4 or w < 4:
        raise RayforgeError(f"wrn28_2 needs inputs of at least 4x4 (two stride-2 groups), got in_shape "
                            f"{tuple(in_shape)}")
    return WideResNet(c, num_classes)
