"""Exact candidate-minibatch and per-sample gradients from ONE forward+backward, for models without BatchNorm.

`CandidateGradients` (`gradients.py`) runs `vmap(grad(loss))` over candidate minibatches; on a CPU that costs about
as much as one `.backward()` per candidate. For models whose only parameters live in `nn.Conv2d` / `nn.Linear`
layers and whose samples do not interact (no BatchNorm), every parameter gradient of a candidate is a sum of
per-sample outer products of a layer's input and the gradient at its output (Goodfellow's trick, as in Opacus's
per-sample-gradient hooks). So here

  1. all m·b samples of a chunk of m candidates go through the model as ONE batch, with parameters detached (no
     weight gradients are computed by autograd) and forward hooks recording each Conv2d/Linear input and output;
  2. one `torch.autograd.grad` of  Σ_c mean-CE(candidate c) = Σ_samples CE / b  gives, at every recorded output,
     the gradient D (each candidate's samples carry its own 1/b);
  3. each candidate's weight gradient is the GROUP sum over its b samples, done as one batched matmul without
     materialising per-sample gradients:  Linear  W_c = D_cᵀ A_c  (bmm over candidates, extra input dims folded
     into the sample axis), bias = Σ D_c;  Conv2d  W_c = D_c U_cᵀ  with U the unfolded input (F.unfold) and the
     contraction over (sample, position), bias = Σ over samples and positions.

`per_sample_gradients` is the same with groups of one sample (the per-sample CE, not divided by anything).

What is checked (raised as `UnsupportedModel`, which `make_gradient_evaluator` turns into the vmap fall-back):
BatchNorm anywhere (a candidate's batch statistics couple its samples, so the group sum is wrong), dropout (random
per call), parameters held by any module other than Conv2d/Linear, grouped convolutions, parameters shared by two
modules. At run time: a layer output modified in place, a layer whose parameters are asked for but whose forward
never ran (its parameters used functionally by a parent), and a layer input whose leading dimension is not the
sample axis. The remaining assumption, as for any hook-based method: a layer's parameters enter the loss only
through that layer's own forward.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from rayforge.errors import RayforgeError
from rayforge.forge.gradients import CandidateGradients
from rayforge.train.batches import TensorData

__all__ = ["GroupedGradients", "UnsupportedModel", "hooks_supported", "make_gradient_evaluator",
           "per_sample_gradients", "unsupported_reason"]

_LAYERS = (nn.Conv2d, nn.Linear)


class UnsupportedModel(RayforgeError):
    """The model has a layer the hook-based gradients cannot handle exactly."""


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the hook path cannot compute `model`'s gradients exactly, or None when it can."""
    owners: dict[int, str] = {}
    for name, module in model.named_modules():
        label = name or type(model).__name__
        if isinstance(module, _BatchNorm):
            return f"{label} ({type(module).__name__}): batch statistics couple the samples of a minibatch"
        if isinstance(module, _DropoutNd):
            return f"{label} ({type(module).__name__}): dropout is random per call"
        own = list(module.named_parameters(recurse=False))
        if own and not isinstance(module, _LAYERS):
            return f"{label} ({type(module).__name__}) holds parameters and is not a Conv2d or Linear"
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            return f"{label}: grouped convolution (groups={module.groups})"
        for pname, p in own:
            if id(p) in owners:
                return f"{label}.{pname} is shared with {owners[id(p)]}"
            owners[id(p)] = f"{label}.{pname}"
    return None


def hooks_supported(model: nn.Module) -> bool:
    return unsupported_reason(model) is None


def _check_supported(model: nn.Module) -> None:
    reason = unsupported_reason(model)
    if reason is not None:
        raise UnsupportedModel(f"hook-based gradients need a model whose parameters are all in Conv2d/Linear "
                               f"layers and without BatchNorm or dropout: {reason}")


def _param_sources(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Parameter name (as in model.named_parameters()) -> (layer, 'weight' | 'bias')."""
    out = {}
    for mname, module in model.named_modules():
        if isinstance(module, _LAYERS):
            for pname, _ in module.named_parameters(recurse=False):
                out[f"{mname}.{pname}" if mname else pname] = (module, pname)
    return out


@contextmanager
def _recording(layers):
    """Forward hooks on `layers`: record (layer, input, output, output version) per call, in call order."""
    records: list[tuple[nn.Module, torch.Tensor, torch.Tensor, int]] = []

    def hook(module, inputs, output):
        if not output.requires_grad:  # the first layer: nothing before it needs a gradient
            output.requires_grad_(True)
        records.append((module, inputs[0].detach(), output, output._version))

    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


def _padded(layer: nn.Conv2d, a: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """The input as the convolution sees it, and the zero padding still to apply (as Conv2d.forward pads)."""
    if isinstance(layer.padding, str) or layer.padding_mode != "zeros":
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        return F.pad(a, layer._reversed_padding_repeated_twice, mode=mode), (0, 0)
    return a, tuple(layer.padding)


def _patches(layer: nn.Conv2d, a: torch.Tensor, ho: int, wo: int, groups: int) -> torch.Tensor:
    """The unfolded input (what F.unfold gives, as one strided copy, which is several times faster than im2col
    here): (G, C·kh·kw, s·ho·wo) with the s = N/G samples of a group side by side along the last axis."""
    a, padding = _padded(layer, a)
    if any(padding):
        a = F.pad(a, (padding[1], padding[1], padding[0], padding[0]))
    a = a.contiguous()
    n, c = a.shape[:2]
    (kh, kw), (dh, dw), (sh, sw) = layer.kernel_size, layer.dilation, layer.stride
    s_n, s_c, s_h, s_w = a.stride()
    s = n // groups
    view = a.as_strided((groups, c, kh, kw, s, ho, wo), (s * s_n, s_c, dh * s_h, dw * s_w, s_n, sh * s_h, sw * s_w))
    return view.reshape(groups, c * kh * kw, s * ho * wo)


def _conv_weight_sums(layer: nn.Conv2d, a: torch.Tensor, d: torch.Tensor, groups: int) -> torch.Tensor:
    """Σ over each group of the weight gradient, by the native convolution weight-gradient kernel per group (for
    spatially large outputs this beats materialising the unfolded input several times over)."""
    a, padding = _padded(layer, a)
    s = a.shape[0] // groups
    weight = layer.weight
    grads = [torch.ops.aten.convolution_backward(d[g * s:(g + 1) * s], a[g * s:(g + 1) * s], weight, None,
                                                 layer.stride, padding, layer.dilation, False, [0, 0], 1,
                                                 (False, True, False))[1] for g in range(groups)]
    return torch.stack(grads)


# A group's conv weight gradient goes through the unfolded input when that is at most this many times the size of
# the input itself (e.g. a kernel covering the whole map, L = 1), else through the native kernel per group.
UNFOLD_MAX_GROWTH = 2.0


def _group_grads(layer: nn.Module, a: torch.Tensor, d: torch.Tensor, groups: int) -> dict[str, torch.Tensor]:
    """Sum over each of `groups` consecutive equal groups of samples of the layer's per-sample gradients, without
    materialising per-sample gradients unless a group is a single sample."""
    n = a.shape[0]
    if d.shape[0] != n or n % groups:
        raise RayforgeError(f"{type(layer).__name__}: input/output leading dims {a.shape[0]}/{d.shape[0]} are not "
                            f"the sample axis of {n} samples in {groups} groups")
    s = n // groups
    out = {}
    if isinstance(layer, nn.Linear):
        a = a.reshape(groups, -1, a.shape[-1])  # (G, s·T, in): extra input dims fold into the sample axis
        d = d.reshape(groups, -1, d.shape[-1])  # (G, s·T, out)
        out["weight"] = torch.bmm(d.transpose(1, 2), a)
        if layer.bias is not None:
            out["bias"] = d.sum(1)
        return out
    if a.dim() != 4 or d.dim() != 4:
        raise RayforgeError(f"Conv2d hooks need batched 4-d inputs, got shape {tuple(a.shape)}")
    o, ho, wo = d.shape[1:]
    length = ho * wo
    k = a.shape[1] * layer.kernel_size[0] * layer.kernel_size[1]
    if s == 1 or k * length <= UNFOLD_MAX_GROWTH * a[0].numel():
        u = _patches(layer, a, ho, wo, groups)  # (G, K, s·L)
        d3 = d.reshape(groups, s, o, length)
        d3 = d3.reshape(groups, o, length) if s == 1 else d3.transpose(1, 2).reshape(groups, o, s * length)
        out["weight"] = torch.bmm(d3, u.transpose(1, 2)).view(groups, *layer.weight.shape)
    else:
        out["weight"] = _conv_weight_sums(layer, a, d, groups)
    if layer.bias is not None:
        out["bias"] = d.reshape(groups, s, o, length).sum((1, 3))
    return out


def _grouped_pass(model: nn.Module, layers, sources, params: dict[str, torch.Tensor], x: torch.Tensor,
                  y: torch.Tensor, groups: int) -> torch.Tensor:
    """x (N, ...), y (N,): (groups, dim) gradients of each group's mean cross-entropy (N/groups samples per
    group), flattened in the order of `params`."""
    n = len(y)
    missing = [name for name in params if name not in sources]
    if missing:
        raise UnsupportedModel(f"parameters {missing} are not Conv2d/Linear weights or biases of the model")
    detached = {name: p.detach() for name, p in params.items()}
    with torch.enable_grad(), _recording(layers) as records:
        logits = functional_call(model, detached, (x,))
        loss = F.cross_entropy(logits, y, reduction="sum")
        if groups != n:
            loss = loss / (n // groups)
    if not records or not loss.requires_grad:
        raise UnsupportedModel("no Conv2d/Linear layer of the model ran in its forward pass")
    for layer, _, output, version in records:
        if output._version != version:
            raise UnsupportedModel(f"the output of a {type(layer).__name__} was modified in place; the hook path "
                                   f"needs out-of-place ops after Conv2d/Linear layers")
    douts = torch.autograd.grad(loss, [r[2] for r in records], allow_unused=True)
    with torch.no_grad():
        return _assemble(records, douts, sources, params, groups)


def _assemble(records, douts, sources, params, groups: int) -> torch.Tensor:
    per_layer: dict[int, dict[str, torch.Tensor]] = {}
    for (layer, a, output, _), d in zip(records, douts):
        if d is None:
            d = torch.zeros_like(output)
        acc = per_layer.setdefault(id(layer), {})
        for pname, g in _group_grads(layer, a, d.detach(), groups).items():
            acc[pname] = acc[pname] + g if pname in acc else g  # a layer called more than once: sum the calls
    flat = []
    for name in params:
        layer, pname = sources[name]
        grads = per_layer.get(id(layer))
        if grads is None:
            raise UnsupportedModel(f"layer of parameter {name} never ran its forward; its parameters must enter the "
                                   f"model only through the layer's own forward for the hook path")
        flat.append(grads[pname].reshape(groups, -1))
    return torch.cat(flat, dim=1)


class GroupedGradients:
    """Same interface as `CandidateGradients`, exact for Conv2d/Linear-only models without BatchNorm: a chunk of m
    candidate minibatches costs one forward+backward over m·b samples plus one batched matmul per layer."""

    def __init__(self, model: nn.Module, chunk: int):
        _check_supported(model)
        self.model = copy.deepcopy(model)
        self.model.train()
        self.chunk = max(1, int(chunk))
        self.evaluations = 0  # minibatch gradients computed (the paper's unit of cost)
        self._sources = _param_sources(self.model)
        self._layers = [m for m in self.model.modules() if isinstance(m, _LAYERS)]

    def __call__(self, params: dict[str, torch.Tensor], xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        """xs: (m, b, C, H, W), ys: (m, b) -> (m, dim) gradients of each candidate's mean cross-entropy, in the
        order of `params` (the model's parameter order); done `chunk` candidates per pass."""
        m, b = ys.shape
        out = []
        for start in range(0, m, self.chunk):
            x = xs[start:start + self.chunk]
            y = ys[start:start + self.chunk]
            out.append(_grouped_pass(self.model, self._layers, self._sources, params,
                                     x.reshape(-1, *x.shape[2:]), y.reshape(-1), len(y)))
        self.evaluations += m
        return out[0] if len(out) == 1 else torch.cat(out)

    def distances(self, params, data: TensorData, idx: np.ndarray, flips: np.ndarray,
                  target: torch.Tensor) -> torch.Tensor:
        """ℓ2 distance to `target` (a flat gradient) of the gradient of each candidate minibatch idx[m] (with
        flips[m]), materialising and holding only `chunk` minibatches at a time."""
        out = []
        for start in range(0, len(idx), self.chunk):
            xs, ys = data.stacked(idx[start:start + self.chunk], flips[start:start + self.chunk])
            out.append(torch.linalg.vector_norm(self(params, xs, ys) - target, dim=1))
        return torch.cat(out)


def per_sample_gradients(model: nn.Module, params: dict[str, torch.Tensor] | None, x: torch.Tensor,
                         y: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """x (N, C, H, W), y (N,) -> (N, dim): the gradient of each sample's own cross-entropy at `params` (default: the
    model's parameters), flattened in the order of `params` (the model's parameter order). Exact, from one
    forward+backward per `chunk` samples (default all). Raises `UnsupportedModel` for BatchNorm/dropout models
    and parameters outside Conv2d/Linear layers (a per-sample gradient is not defined by one sample there)."""
    _check_supported(model)
    params = dict(model.named_parameters()) if params is None else params
    sources = _param_sources(model)
    layers = [m for m in model.modules() if isinstance(m, _LAYERS)]
    step = len(y) if not chunk else int(chunk)
    out = [_grouped_pass(model, layers, sources, params, x[s:s + step], y[s:s + step], len(y[s:s + step]))
           for s in range(0, len(y), max(1, step))]
    return out[0] if len(out) == 1 else torch.cat(out)


def make_gradient_evaluator(model: nn.Module, chunk: int, method: str = "auto"):
    """`GroupedGradients` when the hook path is exact for `model` ("auto", or "hooks" which raises otherwise),
    else `CandidateGradients` ("vmap" always)."""
    if method == "vmap":
        return CandidateGradients(model, chunk)
    if method == "hooks":
        return GroupedGradients(model, chunk)
    if method == "auto":
        return GroupedGradients(model, chunk) if hooks_supported(model) else CandidateGradients(model, chunk)
    raise RayforgeError(f"unknown gradient method {method!r} (auto, hooks, vmap)")
