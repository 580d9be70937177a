"""VGG-mini, as in the paper: 5,747,210 parameters for (3, 32, 32), 10 classes.

Reading of the architecture text that gives exactly 5,747,210:
  * every 3x3 conv has a bias (in addition to the BatchNorm2d affine parameters);
  * there are three max-pools only -- none after the last 512-channel conv -- so a 32x32 input
    reaches the classifier as 512 x 4 x 4 = 8192 features (FC 8192 -> 128);
  * the Linear layers have biases, BatchNorm1d is affine.
Count: convs 4,685,376 + BN2d 3,840 + FC/BN1d 1,057,994 = 5,747,210.
"""

from __future__ import annotations

from torch import nn

from rayforge.errors import RayforgeError
from rayforge.models.registry import register_model

# Conv widths; "M" is a 2x2 max-pool.
_CFG = (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512)


class VGGMini(nn.Module):
    def __init__(self, in_shape: tuple[int, int, int] = (3, 32, 32), num_classes: int = 10):
        super().__init__()
        c, h, w = in_shape
        layers: list[nn.Module] = []
        for v in _CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            else:
                layers += [nn.Conv2d(c, v, kernel_size=3, padding=1), nn.BatchNorm2d(v), nn.ELU()]
                c = v
        self.features = nn.Sequential(*layers)
        flat = c * h * w
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat, 128),
            nn.BatchNorm1d(128),
            nn.ELU(),
            nn.Linear(128, 64),
            nn.BatchNorm1d(64),
            nn.ELU(),
            nn.Linear(64, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


@register_model("vgg_mini")
def vgg_mini(in_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    _, h, w = in_shape
    if h < 8 or w < 8:
        raise RayforgeError(f"vgg_mini needs inputs of at least 8x8 (three 2x2 max-pools), got in_shape {tuple(in_shape)}")
    return VGGMini(tuple(in_shape), num_classes)
