"""Turning stored uint8 pixels into model inputs; deterministic, so a replayed step sees identical tensors."""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch


def to_float(images: np.ndarray | torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (N, C, H, W) -> contiguous float32 ((x / 255 - mean) / std), on the input's device."""
    with warnings.catch_warnings():  # read-only arrays (shipped through Ray's object store) are only read here
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        x = torch.as_tensor(images)
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != len(mean) or len(mean) != len(std):
        raise ValueError(f"to_float expects uint8 (N, {len(mean)}, H, W), got {x.dtype} {tuple(x.shape)}")
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    return ((x.to(torch.float32) / 255.0 - m) / s).contiguous()


def apply_flips(x: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """A new tensor with sample i mirrored along the last (width) axis where flips[i] is True."""
    flips = torch.as_tensor(flips, dtype=torch.bool, device=x.device)
    if flips.shape != x.shape[:1]:
        raise ValueError(f"apply_flips: {tuple(flips.shape)} flags for {len(x)} samples")
    return torch.where(flips.view(-1, *[1] * (x.dim() - 1)), x.flip(-1), x)
