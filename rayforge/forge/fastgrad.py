"""Exact candidate-minibatch and per-sample gradients from one batched forward+backward, for models whose
parameters all live in layers with a registered gradient rule (`nn.Conv2d`, `nn.Linear`) and whose samples do not
interact (no BatchNorm).

`CandidateGradients` (`gradients.py`) runs `vmap(grad(loss))` over candidate minibatches; on a CPU that costs about
one plain `.backward()` per candidate. Here (the per-sample-gradient hooks of Opacus, but summed per group):

  1. the m·b samples of m candidates go through the model as ONE batch, with the parameters detached (autograd
     computes no weight gradients) and forward hooks recording every hooked layer's input A and output;
  2. one `torch.autograd.grad` of  Σ_c mean-CE(candidate c) = Σ_samples CE / b  gives the gradient D at every
     recorded output (each candidate's samples carry its own 1/b);
  3. a layer's gradient for candidate c is the GROUP sum over its b samples of the per-sample gradients, done per
     layer for all candidates at once, by the layer type's rule (`LayerRule`, registered per type as
     opacus/grad_sample registers its samplers):
        Linear    W_c = D_cᵀ A_c  (one bmm over candidates; extra input dims fold into the sample axis), bias Σ D_c;
        Conv2d    W_c = D_c U_cᵀ  with U the unfolded input, contracted over samples and positions in one bmm,
                  when unfolding at most doubles the input (e.g. LeNet's last conv, whose output is 1x1); for
                  spatially large outputs the unfold is 10-25x the input and materialising it dominates the cost,
                  so there the group sum is the native convolution weight-gradient kernel run once per candidate
                  (m calls of b samples each, no per-sample work); bias Σ over samples and positions.

Every rule also gives a layer's per-sample gradient as factors: g = Σ_p D_pᵀ U_p over the T positions p of a
sample (T = 1 for a Linear on vectors and for a conv with a 1x1 output). `SampleGradients` holds the per-sample
gradients of N samples as compact per-layer factors and gives their Gram matrix (the inner products g_a·g_b that
strategy `swap` needs) by GHOST products where the layer's weight is large, without forming the gradients:
    g_a·g_b = Σ_{p,q} (U_ap·U_bq + 1)(D_ap·D_bq)     (the +1 is the bias),
which costs T²(K + O) per pair against O·K for the materialised gradient (LeNet5: 520 against 48,120 for its last
conv); small layers (LeNet's first two convs) keep their per-sample gradient and contribute g gᵀ.

`GroupedGradients.distances` (the phase-1 entry point; `.gradients` gives the gradients themselves) also
DEDUPLICATES samples: candidates drawn from the same points share (point, flip) pairs (MNIST n=10K, κ=5, μ=200:
20,000 draws hit ~7,300 distinct points), and without BatchNorm a sample's A and D at θ do not depend on the
candidate it is in. So each distinct sample goes through the forward+backward once, its `SampleGradients` factors
are kept, and every candidate's gradient is summed from them (`embedding_bag`, gathered bmm). Exact up to float
summation order; the factors held are bounded by `dedupe_budget` floats (candidates are split into blocks beyond
it), and plain chunks are used when the distinct samples are more than DEDUPE_MAX_FRACTION of those drawn.

`per_sample_gradients` is the same machinery with groups of one sample (each sample's own cross-entropy).

Checked, raised as `UnsupportedModel` (on the static checks `make_gradient_evaluator` picks vmap instead):
BatchNorm anywhere (a candidate's batch statistics couple its samples, so group sums are wrong), dropout (random
per call), parameters held by a module without a registered rule, what a rule refuses (grouped convolutions),
parameters shared by two modules; at run time a layer output modified in place, a layer whose parameters are asked
for but whose forward never ran (parameters used functionally by a parent), and a layer input whose leading
dimension is not the sample axis. The remaining assumption, as for any hook-based method: a layer's parameters
enter the loss only through its own forward, and each sample's loss depends on that sample alone.
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

__all__ = ["GroupedGradients", "LayerRule", "SampleGradients", "UnsupportedModel", "hooks_supported",
           "make_gradient_evaluator", "per_sample_gradients", "register_rule", "training_step_records",
           "unsupported_reason"]

# A conv's group sum goes through the unfolded input when that is at most this many times the input's size.
UNFOLD_MAX_GROWTH = 2.0
# Per-sample conv gradients unfold at most this many floats at a time (cache-sized blocks are faster).
PER_SAMPLE_BLOCK = 1 << 20
# `distances` deduplicates samples only when the distinct samples are at most this fraction of all drawn ones
# (measured break-even for LeNet5 on CPU: ~0.8, the per-sample conv gradients of the distinct samples against the
# per-candidate native kernel plus the forward+backward saved).
DEDUPE_MAX_FRACTION = 0.75
# Floats of per-sample factors `distances` may hold at once (256 MiB in float32).
DEDUPE_BUDGET = 1 << 26
# Floats of the (N·T)² position products a ghost Gram block may hold.
GHOST_BLOCK = 1 << 24


class UnsupportedModel(RayforgeError):
    """The model has a layer the hook-based gradients cannot handle exactly."""


# ------------------------------------------------------------------------------------ per-layer gradient rules

class LayerRule:
    """How the hook path differentiates one layer type, from the layer's input `a` and the gradient `d` at its
    output (leading dimension: samples). Subclasses give `factors`; the rest has generic defaults."""

    def unsupported(self, layer: nn.Module) -> str | None:
        return None

    def positions(self, layer: nn.Module, a: torch.Tensor, d: torch.Tensor) -> int:
        """T: the number of positions a sample's weight gradient sums over."""
        raise NotImplementedError

    def factors(self, layer: nn.Module, a: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(U (N, T, K), D (N, T, O)): sample n's weight gradient is D_nᵀ U_n (O x K, the weight's shape
        flattened), its bias gradient Σ_T D_n."""
        raise NotImplementedError

    def per_sample(self, layer: nn.Module, a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """(N, *weight.shape): per-sample weight gradients."""
        u, dd = self.factors(layer, a, d)
        return torch.bmm(dd.transpose(1, 2), u).view(len(a), *layer.weight.shape)

    def group_sums(self, layer: nn.Module, a: torch.Tensor, d: torch.Tensor, groups: int) -> torch.Tensor:
        """(G, *weight.shape): weight-gradient sums over `groups` consecutive equal groups of samples."""
        u, dd = self.factors(layer, a, d)
        k, o = u.shape[-1], dd.shape[-1]
        return torch.bmm(dd.reshape(groups, -1, o).transpose(1, 2), u.reshape(groups, -1, k)).view(
            groups, *layer.weight.shape)

    def bias(self, layer: nn.Module, d: torch.Tensor, groups: int) -> torch.Tensor:
        """(G, O): bias-gradient sums over `groups` consecutive equal groups of samples (output features last)."""
        return d.reshape(groups, -1, d.shape[-1]).sum(1)


RULES: dict[type, LayerRule] = {}


def register_rule(*layer_types: type):
    """Class decorator: the rule (an instance of the decorated class) for these exact layer types."""
    def deco(cls):
        for t in layer_types:
            RULES[t] = cls()
        return cls

    return deco


def rule_of(layer: nn.Module) -> LayerRule | None:
    return RULES.get(type(layer))


@register_rule(nn.Linear)
class LinearRule(LayerRule):
    """y = x Wᵀ + b over the last dimension; any extra input dimensions are positions."""

    def positions(self, layer, a, d):
        return a.numel() // (a.shape[0] * a.shape[-1])

    def factors(self, layer, a, d):
        return a.reshape(len(a), -1, a.shape[-1]), d.reshape(len(d), -1, d.shape[-1])


@register_rule(nn.Conv2d)
class Conv2dRule(LayerRule):
    """Ungrouped 2-d convolutions (any stride, dilation, padding and padding mode)."""

    def unsupported(self, layer):
        return f"grouped convolution (groups={layer.groups})" if layer.groups != 1 else None

    def positions(self, layer, a, d):
        self._check_4d(a, d)
        return d.shape[2] * d.shape[3]

    def factors(self, layer, a, d):
        self._check_4d(a, d)
        n, o, ho, wo = d.shape
        u = _patches(layer, a, ho, wo, n)  # (N, K, L)
        return u.transpose(1, 2), d.reshape(n, o, ho * wo).transpose(1, 2)

    def per_sample(self, layer, a, d):
        """Unfolding cache-sized blocks of samples."""
        self._check_4d(a, d)
        n, o, ho, wo = d.shape
        k = a.shape[1] * layer.kernel_size[0] * layer.kernel_size[1]
        out = d.new_empty(n, o, k)
        step = max(1, PER_SAMPLE_BLOCK // (k * ho * wo))
        for s in range(0, n, step):
            u = _patches(layer, a[s:s + step], ho, wo, len(a[s:s + step]))  # (n', K, L)
            torch.bmm(d[s:s + step].reshape(-1, o, ho * wo), u.transpose(1, 2), out=out[s:s + step])
        return out.view(n, *layer.weight.shape)

    def group_sums(self, layer, a, d, groups):
        self._check_4d(a, d)
        if groups == len(a):
            return self.per_sample(layer, a, d)
        s = len(a) // groups
        o, ho, wo = d.shape[1:]
        k = a.shape[1] * layer.kernel_size[0] * layer.kernel_size[1]
        if k * ho * wo <= UNFOLD_MAX_GROWTH * a[0].numel():
            u = _patches(layer, a, ho, wo, groups)  # (G, K, s·L)
            d3 = d.reshape(groups, s, o, ho * wo).transpose(1, 2).reshape(groups, o, s * ho * wo)
            return torch.bmm(d3, u.transpose(1, 2)).view(groups, *layer.weight.shape)
        return _conv_weight_per_group(layer, a, d, groups)

    def bias(self, layer, d, groups):
        return d.reshape(groups, -1, d.shape[1], d.shape[2] * d.shape[3]).sum((1, 3))

    @staticmethod
    def _check_4d(a, d):
        if a.dim() != 4 or d.dim() != 4:
            raise UnsupportedModel(f"Conv2d hooks need batched 4-d inputs, got shape {tuple(a.shape)}")


def _padded(layer: nn.Conv2d, a: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """The input as the convolution sees it, and the zero padding still to apply (as Conv2d.forward pads)."""
    if isinstance(layer.padding, str) or layer.padding_mode != "zeros":
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        return F.pad(a, layer._reversed_padding_repeated_twice, mode=mode), (0, 0)
    return a, tuple(layer.padding)


def _patches(layer: nn.Conv2d, a: torch.Tensor, ho: int, wo: int, groups: int) -> torch.Tensor:
    """The unfolded input (the values F.unfold gives, made by one strided copy, several times faster than its
    im2col here): (G, C·kh·kw, s·ho·wo), the s = N/G samples of a group side by side along the last axis."""
    a, (ph, pw) = _padded(layer, a)
    if ph or pw:
        a = F.pad(a, (pw, pw, ph, ph))
    a = a.contiguous()
    n, c = a.shape[:2]
    (kh, kw), (dh, dw), (sh, sw) = layer.kernel_size, layer.dilation, layer.stride
    s_n, s_c, s_h, s_w = a.stride()
    s = n // groups
    view = a.as_strided((groups, c, kh, kw, s, ho, wo), (s * s_n, s_c, dh * s_h, dw * s_w, s_n, sh * s_h, sw * s_w))
    return view.reshape(groups, c * kh * kw, s * ho * wo)


def _conv_weight_per_group(layer: nn.Conv2d, a: torch.Tensor, d: torch.Tensor, groups: int) -> torch.Tensor:
    """(G, *weight.shape): the native convolution weight-gradient kernel once per group of N/G samples."""
    a, padding = _padded(layer, a)
    s = a.shape[0] // groups
    w = layer.weight
    return torch.stack([
        torch.ops.aten.convolution_backward(d[g * s:(g + 1) * s], a[g * s:(g + 1) * s], w, None, layer.stride,
                                            padding, layer.dilation, False, [0, 0], 1, (False, True, False))[1]
        for g in range(groups)])


# ------------------------------------------------------------------------------------------- model checks

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
        rule = rule_of(module)
        if own and rule is None:
            return f"{label} ({type(module).__name__}) holds parameters and has no registered gradient rule"
        reason = rule.unsupported(module) if rule is not None else None
        if reason:
            return f"{label}: {reason}"
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
        raise UnsupportedModel(f"hook-based gradients need a model whose parameters are all in layers with a "
                               f"gradient rule ({', '.join(t.__name__ for t in RULES)}), without BatchNorm or "
                               f"dropout: {reason}")


def _hooked_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if rule_of(m) is not None]


def _param_sources(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Parameter name (as in model.named_parameters()) -> (layer, 'weight' | 'bias')."""
    out = {}
    for mname, module in model.named_modules():
        if rule_of(module) is not None:
            for pname, _ in module.named_parameters(recurse=False):
                out[f"{mname}.{pname}" if mname else pname] = (module, pname)
    return out


# ------------------------------------------------------------------------------------------- forward + backward

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


def _run_recorded(forward, layers):
    """Run `forward()` under recording hooks; the logits and the records, checked."""
    with _recording(layers) as records:
        try:
            logits = forward()
        except RuntimeError as e:
            if "in-place" not in str(e):
                raise
            raise UnsupportedModel(f"a hooked layer's output was modified in place ({e}); the hook path needs "
                                   f"out-of-place ops after hooked layers") from e
    if not records:
        raise UnsupportedModel("no hooked layer of the model ran in its forward pass")
    return logits, records


def _checked_records(records, douts, n: int):
    """[(layer, A, D)] from the recorded calls and the gradients at their outputs."""
    out = []
    for (layer, a, output, version), d in zip(records, douts):
        if output._version != version:
            raise UnsupportedModel(f"the output of a {type(layer).__name__} was modified in place; the hook "
                                   f"path needs out-of-place ops after hooked layers")
        if a.shape[0] != n or output.shape[0] != n:
            raise UnsupportedModel(f"a {type(layer).__name__} saw input/output of leading dims "
                                   f"{a.shape[0]}/{output.shape[0]}, not the sample axis of {n} samples")
        out.append((layer, a, torch.zeros_like(output) if d is None else d.detach()))
    return out


def _forward_backward(model, layers, sources, params, x, y, scale: float):
    """[(layer, A, D)] per layer call, in call order: the layer's input and the gradient of scale·Σ CE at its
    output, from one forward and one backward that computes no parameter gradients."""
    missing = [name for name in params if name not in sources]
    if missing:
        raise UnsupportedModel(f"parameters {missing} are not weights or biases of hooked layers of the model")
    detached = {name: p.detach() for name, p in params.items()}
    with torch.enable_grad():
        logits, records = _run_recorded(lambda: functional_call(model, detached, (x,)), layers)
        loss = F.cross_entropy(logits, y, reduction="sum")
        if scale != 1:
            loss = loss * scale
        if not loss.requires_grad:
            raise UnsupportedModel("no hooked layer of the model ran in its forward pass")
        douts = torch.autograd.grad(loss, [r[2] for r in records], allow_unused=True)
    return _checked_records(records, douts, len(y))


def training_step_records(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """`rayforge.train.sgd.loss_and_grads` (the same parameter gradients, bit for bit) that also returns the
    step's per-sample factors: (grads, [(layer, A, D)]) with D the gradient of the MEAN cross-entropy at each
    hooked layer's output, so the batch's per-sample gradients come out divided by b."""
    model.train()
    params = list(model.parameters())
    with torch.enable_grad():
        logits, records = _run_recorded(lambda: model(x), _hooked_layers(model))
        loss = F.cross_entropy(logits, y)
        grads = torch.autograd.grad(loss, params + [r[2] for r in records], allow_unused=True)
    return list(grads[:len(params)]), _checked_records(records, grads[len(params):], len(y))


# --------------------------------------------------------------------------------------------- group sums

def _write(dest: torch.Tensor | None, value: torch.Tensor, key, done: set) -> None:
    if dest is None:
        return
    if key in done:  # a layer called more than once in a forward: its gradient sums over the calls
        dest.add_(value.reshape(dest.shape))
    else:
        dest.copy_(value.reshape(dest.shape))
        done.add(key)


def _group_grads_into(layer, a, d, groups: int, dests: dict, done: set) -> None:
    """The layer's weight and bias gradient sums over `groups` consecutive equal groups of samples, written into
    `dests` ({'weight'/'bias': view or None}); one-position per-sample gradients (outer products) go straight into
    the output, without a freshly allocated temporary."""
    if all(v is None for v in dests.values()):
        return
    n = a.shape[0]
    if n % groups:
        raise RayforgeError(f"{n} samples do not split into {groups} equal groups")
    rule = rule_of(layer)
    dest, key = dests.get("weight"), (id(layer), "weight")
    if dest is not None:
        if groups == n and rule.positions(layer, a, d) == 1:
            u, dd = rule.factors(layer, a, d)
            dest = dest.view(groups, dd.shape[-1], u.shape[-1])
            if key in done:
                dest.addcmul_(dd.transpose(1, 2), u)
            else:
                torch.mul(dd.transpose(1, 2), u, out=dest)
                done.add(key)
        else:
            _write(dest, rule.group_sums(layer, a, d, groups), key, done)
    if "bias" in dests:
        _write(dests["bias"], rule.bias(layer, d, groups), (id(layer), "bias"), done)


def _layer_params(layer: nn.Module) -> list[str]:
    return [pname for pname in ("weight", "bias") if getattr(layer, pname, None) is not None]


def _output(like: torch.Tensor, sources, params, groups: int, out: torch.Tensor | None = None):
    """An empty (groups, dim) result in the order of `params` (or `out`), and {(id(layer), 'weight'/'bias'): its
    columns viewed as (groups, *shape)}."""
    if out is None:
        out = like.new_empty(groups, sum(p.numel() for p in params.values()))
    dests, start = {}, 0
    for name, p in params.items():
        layer, pname = sources[name]
        dests[(id(layer), pname)] = out[:, start:start + p.numel()].view(groups, *p.shape)
        start += p.numel()
    return out, dests


def _layer_dests(dests: dict, layer: nn.Module) -> dict:
    return {k: dests.get((id(layer), k)) for k in _layer_params(layer)}


def _check_done(done: set, sources, params) -> None:
    for name in params:
        layer, pname = sources[name]
        if (id(layer), pname) not in done:
            raise UnsupportedModel(f"the layer of parameter {name} never ran its forward; for the hook path a layer's "
                                   f"parameters must enter the model only through the layer's own forward")


def _assemble(records, sources, params, groups: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """(groups, dim) in the order of `params` (written into `out` when given): each layer's group sums in its
    columns."""
    out, dests = _output(records[0][2], sources, params, groups, out)
    done: set = set()
    for layer, a, d in records:
        _group_grads_into(layer, a, d, groups, _layer_dests(dests, layer), done)
    _check_done(done, sources, params)
    return out


def _grouped(model, layers, sources, params, x, y, groups: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """x (N, ...), y (N,) -> (groups, dim): each group's gradient of its mean cross-entropy (of its per-sample
    cross-entropy when groups == N), written into `out` when given."""
    records = _forward_backward(model, layers, sources, params, x, y, groups / len(y))
    with torch.no_grad():
        return _assemble(records, sources, params, groups, out)


def _grouped_chunks(model, layers, sources, params, x, y, groups: int, chunk: int) -> torch.Tensor:
    """`_grouped` over `chunk` groups at a time (x, y: (groups, s, ...)), into one preallocated result."""
    if groups <= chunk:
        return _grouped(model, layers, sources, params, x.reshape(-1, *x.shape[2:]), y.reshape(-1), groups)
    out = x.new_empty(groups, sum(p.numel() for p in params.values()))
    for g in range(0, groups, chunk):
        xs, ys = x[g:g + chunk], y[g:g + chunk]
        _grouped(model, layers, sources, params, xs.reshape(-1, *xs.shape[2:]), ys.reshape(-1), len(ys),
                 out[g:g + chunk])
    return out


# ------------------------------------------------------------------------------- per-sample factors (dedupe)

class _Factor:
    """One layer call's per-sample factors for `total` samples: its per-sample gradient (weight then bias,
    flattened) when that is smaller than the layer's input and output gradient, else A and D."""

    def __init__(self, layer: nn.Module, a: torch.Tensor, d: torch.Tensor, total: int):
        self.layer, self.rule = layer, rule_of(layer)
        self.sizes = [layer.weight.numel()] + ([layer.bias.numel()] if layer.bias is not None else [])
        self.per_sample = sum(self.sizes) <= a[0].numel() + d[0].numel()
        if self.per_sample:
            self.g = a.new_empty(total, sum(self.sizes))
        else:
            self.a = a.new_empty(total, *a.shape[1:])
            self.d = d.new_empty(total, *d.shape[1:])

    @staticmethod
    def floats(layer: nn.Module, a: torch.Tensor, d: torch.Tensor) -> int:
        sizes = layer.weight.numel() + (layer.bias.numel() if layer.bias is not None else 0)
        return min(sizes, a[0].numel() + d[0].numel())

    def fill(self, start: int, a: torch.Tensor, d: torch.Tensor) -> None:
        n = a.shape[0]
        stop = start + n
        if self.per_sample:
            _group_grads_into(self.layer, a, d, n, self._columns(self.g[start:stop]), set())
        else:
            self.a[start:stop] = a
            self.d[start:stop] = d

    def _columns(self, g: torch.Tensor) -> dict:
        dests, col = {}, 0
        for pname, size in zip(_layer_params(self.layer), self.sizes):
            dests[pname] = g[:, col:col + size]
            col += size
        return dests

    def sums(self, members: torch.Tensor, dests: dict, done: set) -> None:
        """members (m, b) indices into the samples: each row's sums written into `dests`."""
        m = len(members)
        if self.per_sample:
            total = F.embedding_bag(members, self.g, mode="sum")
            for pname, value in self._columns(total).items():
                _write(dests.get(pname), value, (id(self.layer), pname), done)
        else:
            flat = members.reshape(-1)
            _group_grads_into(self.layer, self.a.index_select(0, flat), self.d.index_select(0, flat), m, dests, done)

    def combinations(self, rows: torch.Tensor, weights: torch.Tensor, dests: dict, done: set) -> None:
        """rows, weights (P, M): Σ_m weights[p, m]·g_rows[p, m] for every p, written into `dests` (P leading rows)."""
        flat = rows.reshape(-1)
        if self.per_sample:
            value = torch.bmm(weights.unsqueeze(1), self.g.index_select(0, flat).view(*rows.shape, -1)).squeeze(1)
            for pname, v in self._columns(value).items():
                _write(dests.get(pname), v, (id(self.layer), pname), done)
        else:
            d = self.d.index_select(0, flat) * weights.reshape(-1, *[1] * (self.d.dim() - 1))
            _group_grads_into(self.layer, self.a.index_select(0, flat), d, len(rows), dests, done)

    def materialised(self) -> torch.Tensor:
        """(N, weight + bias floats): the per-sample gradients."""
        if self.per_sample:
            return self.g
        out = self.a.new_empty(len(self.a), sum(self.sizes))
        _group_grads_into(self.layer, self.a, self.d, len(self.a), self._columns(out), set())
        return out

    def gram(self) -> torch.Tensor:
        """(N, N): the inner products of this layer call's per-sample gradients, by ghost products when they are
        the cheaper way (see the module docstring)."""
        if self.per_sample:
            return self.g @ self.g.T
        t = self.rule.positions(self.layer, self.a, self.d)
        u, dd = self.rule.factors(self.layer, self.a, self.d)
        k, o = u.shape[-1], dd.shape[-1]
        if t * t * (k + o) >= sum(self.sizes):
            m = self.materialised()
            return m @ m.T
        bias = 1.0 if self.layer.bias is not None else 0.0
        if t == 1:
            u2, d2 = u.reshape(len(u), k), dd.reshape(len(dd), o)
            return (u2 @ u2.T).add_(bias).mul_(d2 @ d2.T)
        return _ghost_gram(u, dd, bias)


def _ghost_gram(u: torch.Tensor, d: torch.Tensor, bias: float) -> torch.Tensor:
    """Σ_{p,q} (U_ap·U_bq + bias)(D_ap·D_bq) for all pairs (a, b), in row blocks bounded by GHOST_BLOCK."""
    n, t = u.shape[:2]
    uf, df = u.reshape(n * t, -1), d.reshape(n * t, -1)
    out = u.new_empty(n, n)
    rows = max(1, GHOST_BLOCK // (n * t * t))
    for s in range(0, n, rows):
        e = min(n, s + rows)
        prod = (uf[s * t:e * t] @ uf.T).add_(bias).mul_(df[s * t:e * t] @ df.T)
        out[s:e] = prod.view(e - s, t, n, t).sum((1, 3))
    return out


class SampleGradients:
    """The per-sample gradients of N samples at one θ, as per-layer factors (`_Factor`), in the order of `params`.
    Built from one or more recorded passes ([(layer, A, D)] each, samples concatenated in pass order); gives the
    Gram matrix of the per-sample gradients and exact sums of any equal-size rows of samples."""

    def __init__(self, passes: list, sources: dict, params: dict[str, torch.Tensor]):
        self.sources, self.params = sources, params
        first = passes[0]
        self.n = sum(len(p[0][1]) for p in passes)
        self.factors = [_Factor(layer, a, d, self.n) for layer, a, d in first]
        start = 0
        with torch.no_grad():
            for records in passes:
                if [f.layer for f in self.factors] != [r[0] for r in records]:
                    raise UnsupportedModel("the model's layers ran in a different order for different inputs")
                for f, (_, a, d) in zip(self.factors, records):
                    f.fill(start, a, d)
                start += len(records[0][1])

    def gram(self) -> torch.Tensor:
        """(N, N) g_a·g_b. A layer called more than once contributes the Gram of its summed per-sample gradient."""
        by_layer: dict[int, list[_Factor]] = {}
        for f in self.factors:
            by_layer.setdefault(id(f.layer), []).append(f)
        with torch.no_grad():
            out = None
            for calls in by_layer.values():
                if len(calls) == 1:
                    g = calls[0].gram()
                else:
                    m = sum(f.materialised() for f in calls)
                    g = m @ m.T
                out = g if out is None else out.add_(g)
        return out

    def sums(self, rows: torch.Tensor) -> torch.Tensor:
        """rows (m, c) sample indices -> (m, dim): each row's sum of per-sample gradients, in `params` order."""
        return self._each_factor(len(rows), lambda f, dests, done: f.sums(rows, dests, done))

    def combination(self, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """(dim,): Σ_i weights[i]·g_rows[i] (e.g. +1 for samples that come in, −1 for those that leave)."""
        return self.combinations(rows.unsqueeze(0), weights.unsqueeze(0))[0]

    def combinations(self, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """rows, weights (P, M) -> (P, dim): `combination` of every row of `rows` at once (pad a short row with
        weight 0), one gather and one group sum per layer for all P."""
        return self._each_factor(len(rows), lambda f, dests, done: f.combinations(rows, weights, dests, done))

    def _each_factor(self, groups: int, write) -> torch.Tensor:
        with torch.no_grad():
            like = self.factors[0].g if self.factors[0].per_sample else self.factors[0].a
            out, dests = _output(like, self.sources, self.params, groups)
            done: set = set()
            for f in self.factors:
                write(f, _layer_dests(dests, f.layer), done)
            _check_done(done, self.sources, self.params)
        return out


# ------------------------------------------------------------------------------------------------ public API

class GroupedGradients:
    """Same interface as `CandidateGradients`, exact for models of hooked layers without BatchNorm or dropout:
    a chunk of m candidate minibatches costs one forward+backward over its m·b samples plus one batched group sum
    per layer; `distances` further runs each distinct (point, flip) once (see the module docstring)."""

    def __init__(self, model: nn.Module, chunk: int, dedupe: bool = True, dedupe_budget: int = DEDUPE_BUDGET):
        _check_supported(model)
        self.model = copy.deepcopy(model)
        self.model.train()
        self.chunk = max(1, int(chunk))
        self.dedupe, self.dedupe_budget = dedupe, int(dedupe_budget)
        self.evaluations = 0  # minibatch gradients computed (the paper's unit of cost)
        self._sources = _param_sources(self.model)
        self._layers = _hooked_layers(self.model)
        self._factor_floats: dict[tuple, int] = {}  # input shape -> factor floats per sample

    def __call__(self, params: dict[str, torch.Tensor], xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        """xs: (m, b, C, H, W), ys: (m, b) -> (m, dim) gradients of each candidate's mean cross-entropy, in the
        order of `params` (the model's parameter order); `chunk` candidates per forward+backward."""
        out = _grouped_chunks(self.model, self._layers, self._sources, params, xs, ys, len(ys), self.chunk)
        self.evaluations += len(ys)
        return out

    def records(self, params, x: torch.Tensor, y: torch.Tensor, scale: float) -> list:
        """[(layer, A, D)] of one forward+backward over x at `params`, D the gradient of scale·Σ CE."""
        return _forward_backward(self.model, self._layers, self._sources, params, x, y, scale)

    def training_step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        """`training_step_records` on `model` (a model of the same architecture, e.g. the one stepping the
        trajectory), its records mapped onto this evaluator's layers for `sample_gradients`."""
        grads, records = training_step_records(model, x, y)
        own = dict(zip(map(id, _hooked_layers(model)), self._layers))
        return grads, [(own[id(layer)], a, d) for layer, a, d in records]

    def sample_gradients(self, passes: list, params) -> SampleGradients:
        """`SampleGradients` of the samples of recorded passes (from `records` or `training_step_records`)."""
        return SampleGradients(passes, self._sources, params)

    def distances(self, params, data: TensorData, idx: np.ndarray, flips: np.ndarray,
                  target: torch.Tensor) -> torch.Tensor:
        """ℓ2 distance to `target` (a flat gradient) of the gradient of each candidate minibatch idx[m] (with
        flips[m]). Holds `chunk` minibatches of activations at a time, plus at most `dedupe_budget` floats of
        per-sample factors when deduplicating."""
        return torch.cat([torch.linalg.vector_norm(g - target, dim=1)
                          for g in self._chunks(params, data, idx, flips)])

    def gradients(self, params, data: TensorData, idx: np.ndarray, flips: np.ndarray | None) -> torch.Tensor:
        """(m, dim): the gradient of each candidate minibatch idx[m] (with flips[m]), as `distances` computes it."""
        return torch.cat(list(self._chunks(params, data, idx, flips)))

    def _chunks(self, params, data, idx, flips):
        """Candidate gradients, `chunk` candidates at a time, deduplicating samples where that pays."""
        idx = np.asarray(idx)
        m, b = idx.shape
        flips = np.zeros((m, b), dtype=bool) if flips is None else np.asarray(flips, dtype=bool)
        if not self.dedupe or m < 2:
            yield from self._plain_chunks(params, data, idx, flips)
            return
        yield from self._dedupe_chunks(params, data, idx, flips, self._per_sample_floats(params, data, idx, flips))

    def _plain_chunks(self, params, data, idx, flips):
        for start in range(0, len(idx), self.chunk):
            yield self(params, *data.stacked(idx[start:start + self.chunk], flips[start:start + self.chunk]))

    def _per_sample_floats(self, params, data, idx, flips) -> int:
        x, y = data.batch(idx[:1, :1].reshape(-1), flips[:1, :1].reshape(-1))
        key = tuple(x.shape[1:])
        if key not in self._factor_floats:
            records = self.records(params, x, y, 1.0)
            self._factor_floats[key] = sum(_Factor.floats(layer, a, d) for layer, a, d in records)
        return self._factor_floats[key]

    def _dedupe_chunks(self, params, data, idx, flips, floats: int):
        m, b = idx.shape
        keys = idx.astype(np.int64) * 2 + flips.astype(np.int64)
        uniq, inverse = np.unique(keys, return_inverse=True)
        if len(uniq) * floats > self.dedupe_budget and m > 1:  # factors too large: halve the candidates
            half = m // 2
            yield from self._dedupe_chunks(params, data, idx[:half], flips[:half], floats)
            yield from self._dedupe_chunks(params, data, idx[half:], flips[half:], floats)
            return
        if len(uniq) > DEDUPE_MAX_FRACTION * m * b or len(uniq) * floats > self.dedupe_budget:
            yield from self._plain_chunks(params, data, idx, flips)
            return
        samples = self._factors(params, data, uniq // 2, (uniq % 2).astype(bool), self.chunk * b)
        members = torch.as_tensor(inverse.reshape(m, b), device=data.device)
        for start in range(0, m, self.chunk):
            rows = members[start:start + self.chunk]
            grads = samples.sums(rows).div_(b)
            self.evaluations += len(rows)
            yield grads

    def _factors(self, params, data, points: np.ndarray, flips: np.ndarray, step: int) -> SampleGradients:
        """Per-sample factors of the given distinct samples, `step` samples per forward+backward."""
        passes = []
        for start in range(0, len(points), step):
            x, y = data.batch(points[start:start + step], flips[start:start + step])
            passes.append(self.records(params, x, y, 1.0))
        return self.sample_gradients(passes, params)


def per_sample_gradients(model: nn.Module, params: dict[str, torch.Tensor] | None, x: torch.Tensor,
                         y: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """x (N, C, H, W), y (N,) -> (N, dim): the gradient of each sample's own cross-entropy at `params` (default: the
    model's parameters), flattened in the order of `params` (the model's parameter order). Exact, one
    forward+backward per `chunk` samples (default all), hooks on `model` only during the call. Raises
    `UnsupportedModel` for BatchNorm or dropout models and parameters outside hooked layers."""
    _check_supported(model)
    params = dict(model.named_parameters()) if params is None else params
    step = max(1, int(chunk)) if chunk else max(1, len(y))
    return _grouped_chunks(model, _hooked_layers(model), _param_sources(model), params, x.unsqueeze(1),
                           y.unsqueeze(1), len(y), step)


def make_gradient_evaluator(model: nn.Module, chunk: int, method: str = "auto"):
    """`GroupedGradients` when the hook path is exact for `model` ("auto"; "hooks" raises `UnsupportedModel`
    otherwise), else `CandidateGradients`: vmapped ("vmap"; "auto" on an accelerator) or one candidate at a time
    ("loop"; "auto" on CPU, where it is faster for BatchNorm convnets: see rayforge.forge.gradients)."""
    if method in ("vmap", "loop"):
        return CandidateGradients(model, chunk, loop=method == "loop")
    if method == "hooks":
        return GroupedGradients(model, chunk)
    if method == "auto":
        if hooks_supported(model):
            return GroupedGradients(model, chunk)
        return CandidateGradients(model, chunk, loop=next(model.parameters()).device.type == "cpu")
    raise RayforgeError(f"unknown gradient method {method!r} (auto, hooks, vmap, loop)")
