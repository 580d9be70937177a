"""K models of one architecture as ONE wider model, so K forged replays cost one replay of the wide model.

Every tensor of the wide model holds the K models' channels side by side: a (b, C, H, W) activation becomes
(b, K·C, H, W), model k's channels at [k·C, (k+1)·C). Layers are rewritten by type (`STACKERS`, registered per
layer type like the forge's gradient rules):

    Conv2d(C -> O, groups g)   Conv2d(K·C -> K·O, groups K·g): one grouped convolution for all K models;
                               when the K models share their input batch (the usual step: a group's log differs
                               from the original one only where a member is in the batch) the first layer sees
                               the (b, C, H, W) input once and runs as ONE convolution with K·O output channels;
    Linear(in -> out)          one batched matrix product over the K weight matrices ((b, K·in) -> (b, K·out));
                               a shared 2-d input runs as one matrix product with K·out outputs;
    BatchNorm(C)               BatchNorm(K·C): per-channel batch statistics are per model (running ones too).

Parameter-free layers (activations, pooling, Flatten) act per channel and are kept as they are; flattening keeps
model k's features contiguous. A model whose layers cannot all be stacked (a parameterised layer without a
stacker, a layer mixing channels that `check` catches on a first batch) is refused (`NotStackable`) and phase 2
replays it sequentially. The SGD update is elementwise, so `rayforge.train.sgd.sgd_update` steps the wide model
as it steps one model. Same arithmetic as K separate replays, in another kernel order: equal up to float
rounding (the PoR export keeps the sequential replay, bit-identical to `rayforge verify`).
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from rayforge.errors import RayforgeError


class NotStackable(RayforgeError):
    """The model has a layer the wide model cannot hold exactly."""


STACKERS: dict[type, Callable[[list[nn.Module]], nn.Module]] = {}


def register_stacker(*layer_types: type):
    """fn(layers: K layers of one of these exact types) -> the wide layer."""
    def deco(fn):
        for t in layer_types:
            STACKERS[t] = fn
        return fn

    return deco


class WideConv2d(nn.Conv2d):
    """K convolutions (C -> O, groups g) as one: K·C -> K·O with groups K·g. A shared input (C channels, g = 1)
    runs as one convolution with K·O output channels."""

    k = 1

    def forward(self, x):
        shared = self.k > 1 and x.shape[1] * self.k == self.in_channels
        groups = self.groups // self.k if shared else self.groups
        if shared and groups != 1:
            raise NotStackable("a grouped convolution cannot take a shared input")
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, groups)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, groups)


@register_stacker(nn.Conv2d)
def _wide_conv(layers: list[nn.Conv2d]) -> nn.Module:
    c, k = layers[0], len(layers)
    wide = WideConv2d(c.in_channels * k, c.out_channels * k, c.kernel_size, c.stride, c.padding, c.dilation,
                      c.groups * k, c.bias is not None, c.padding_mode, device=c.weight.device)
    wide.k = k
    with torch.no_grad():
        wide.weight.copy_(torch.cat([m.weight for m in layers]))
        if c.bias is not None:
            wide.bias.copy_(torch.cat([m.bias for m in layers]))
    return wide


class WideLinear(nn.Module):
    """K Linear layers (in -> out) on (b, K·in) inputs: one batched matrix product; a shared (b, in) input runs as
    one matrix product with K·out outputs."""

    def __init__(self, layers: list[nn.Linear]):
        super().__init__()
        self.k, self.in_features, self.out_features = len(layers), layers[0].in_features, layers[0].out_features
        self.weight = nn.Parameter(torch.stack([m.weight.detach() for m in layers]))  # (K, out, in)
        self.bias = None if layers[0].bias is None else nn.Parameter(torch.stack([m.bias.detach() for m in layers]))

    def forward(self, x):
        if x.dim() != 2:
            raise NotStackable(f"a Linear layer saw a {x.dim()}-d input; the wide model stacks 2-d inputs only")
        b = x.shape[0]
        if self.k > 1 and x.shape[1] == self.in_features:  # a shared input
            w = self.weight.reshape(self.k * self.out_features, self.in_features)
            return F.linear(x, w, None if self.bias is None else self.bias.reshape(-1))
        xs = x.reshape(b, self.k, self.in_features).transpose(0, 1)  # (K, b, in)
        out = torch.bmm(xs, self.weight.transpose(1, 2)) if self.bias is None else \
            torch.baddbmm(self.bias.unsqueeze(1), xs, self.weight.transpose(1, 2))
        return out.transpose(0, 1).reshape(b, self.k * self.out_features)


register_stacker(nn.Linear)(WideLinear)


@register_stacker(nn.BatchNorm1d, nn.BatchNorm2d)
def _wide_batchnorm(layers: list[_BatchNorm]) -> nn.Module:
    """BatchNorm over K·C channels: per-channel statistics are per model."""
    wide = copy.deepcopy(layers[0])
    wide.num_features *= len(layers)
    for name, t in list(wide.named_parameters(recurse=False)) + list(wide.named_buffers(recurse=False)):
        if t.dim():
            value = torch.cat([getattr(m, name).detach() for m in layers])
            setattr(wide, name, nn.Parameter(value) if isinstance(t, nn.Parameter) else value)
    return wide


class WideModel(nn.Module):
    """The K models side by side (a copy of the first with its parameterised layers widened)."""

    def __init__(self, models: list[nn.Module], memory_format=torch.contiguous_format):
        super().__init__()
        self.k, self.memory_format = len(models), memory_format
        self.net = copy.deepcopy(models[0])
        self._layers: list[str] = []
        for name, module in list(models[0].named_modules()):
            own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
            if not own:
                continue
            stacker = STACKERS.get(type(module))
            if stacker is None or not name:
                raise NotStackable(f"{name or 'the model'} ({type(module).__name__}) holds parameters and has no "
                                   f"stacker")
            parent, _, leaf = name.rpartition(".")
            setattr(self.net.get_submodule(parent) if parent else self.net, leaf,
                    stacker([m.get_submodule(name) for m in models]).to(memory_format=memory_format))
            self._layers.append(name)

    def forward(self, x):
        return self.net(x)

    def unstack_into(self, models: list[nn.Module]) -> None:
        """Write the K models' parameters and buffers (BatchNorm statistics) back into `models`: every wide
        tensor is the K tensors concatenated along its first axis (a scalar, like a batch count, is shared)."""
        with torch.no_grad():
            for name in self._layers:
                wide = self.net.get_submodule(name)
                for i, model in enumerate(models):
                    layer = model.get_submodule(name)
                    for tname, t in list(layer.named_parameters(recurse=False)) + \
                            list(layer.named_buffers(recurse=False)):
                        w = getattr(wide, tname).detach()
                        t.copy_(w.reshape(self.k, *t.shape)[i] if t.dim() else w)


def wide_inputs(data, idx, flips, memory_format=torch.contiguous_format):
    """The K models' batches as one wide input: (b, C, H, W) once when all K batches (and flips) are the same,
    else (b, K·C, H, W); labels (K, b)."""
    k, b = idx.shape
    if k == 1 or ((idx == idx[0]).all() and (flips == flips[0]).all()):
        x, y = data.batch(idx[0], flips[0])
        return x.contiguous(memory_format=memory_format) if x.dim() == 4 else x, y.expand(k, b)
    xs, ys = data.stacked(idx, flips)  # (K, b, C, ...)
    x = xs.transpose(0, 1).reshape(b, k * xs.shape[2], *xs.shape[3:])
    return (x.contiguous(memory_format=memory_format) if x.dim() == 4 else x), ys


def wide_loss(logits: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Σ_k mean-CE of model k: each model's parameters get exactly their own mean-loss gradient."""
    k, b = ys.shape
    per_model = logits.reshape(b, k, -1).transpose(0, 1).reshape(k * b, -1)
    return F.cross_entropy(per_model, ys.reshape(-1), reduction="sum") / b


def check(models: list[nn.Module], wide: WideModel, data, idx, flips) -> None:
    """The wide model's logits on a first batch must match each model's own (else it mixes channels somewhere).
    Runs on copies in training mode (BatchNorm statistics of the real ones untouched)."""
    with torch.no_grad():
        for shared in (True, False):  # both input layouts the replay may use
            i = idx[:1].repeat(len(idx), 0) if shared else idx
            f = flips[:1].repeat(len(flips), 0) if shared else flips
            x, _ = wide_inputs(data, i, f, wide.memory_format)
            try:
                got = copy.deepcopy(wide).train()(x).reshape(x.shape[0], wide.k, -1).transpose(0, 1)
            except (RuntimeError, NotStackable) as exc:
                raise NotStackable(f"the wide model does not run: {exc}") from None
            for m, model in enumerate(models):
                ref = copy.deepcopy(model).train()(data.batch(i[m], f[m])[0])
                if got[m].shape != ref.shape or not torch.allclose(got[m], ref, rtol=1e-3, atol=1e-4):
                    raise NotStackable("the wide model's outputs differ from the models' own (a layer mixes "
                                       "channels or samples)")
