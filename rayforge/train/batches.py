"""Training tensors held once in float32 on the compute device, and exact recomputation of any logged batch."""

from __future__ import annotations

import numpy as np
import torch

from rayforge.data import ImageArrays, apply_flips, to_float


class TensorData:
    """Normalised images and labels of one split; `batch(idx, flips)` rebuilds a logged batch exactly."""

    def __init__(self, arrays: ImageArrays, mean, std, device: torch.device | str = "cpu"):
        self.x = to_float(arrays.images, mean, std).to(device)
        self.y = torch.tensor(np.asarray(arrays.labels, dtype=np.int64)).to(device)  # a copy: labels may be read-only
        self.device = torch.device(device)

    def __len__(self) -> int:
        return len(self.y)

    def batch(self, idx, flips=None) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(np.asarray(idx, dtype=np.int64), device=self.device)
        x = self.x.index_select(0, index)
        if flips is not None:
            flags = torch.as_tensor(np.asarray(flips, dtype=bool), device=self.device)
            if bool(flags.any()):
                x = apply_flips(x, flags)
        return x, self.y.index_select(0, index)

    def stacked(self, idx: np.ndarray, flips: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Several minibatches at once: idx, flips of shape (m, b) -> x (m, b, C, H, W), y (m, b)."""
        m, b = idx.shape
        x, y = self.batch(idx.reshape(-1), flips.reshape(-1))
        return x.reshape(m, b, *x.shape[1:]), y.reshape(m, b)


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: TensorData, batch_size: int = 1000) -> float:
    """Top-1 accuracy in eval mode (BatchNorm uses running statistics); restores the model's mode."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(data), batch_size):
        x = data.x[start:start + batch_size]
        correct += int((model(x).argmax(1) == data.y[start:start + batch_size]).sum())
    model.train(was_training)
    return correct / max(1, len(data))
