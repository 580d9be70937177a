"""Multinomial logistic regression: flatten + one Linear(C*H*W -> num_classes) (softmax lives in the loss)."""

from __future__ import annotations

from torch import nn

from rayforge.models.registry import register_model


class LogReg(nn.Module):
    def __init__(self, in_features: int, num_classes: int = 10):
        super().__init__()
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, x):
        return self.linear(self.flatten(x))


@register_model("logreg")
def logreg(in_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    c, h, w = in_shape
    return LogReg(c * h * w, num_classes)
