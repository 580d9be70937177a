"""Exact candidate-minibatch and per-sample gradients from one batched forward+backward, for models whose
parameters all live in `nn.Conv2d` / `nn.Linear` layers and whose samples do not interact (no BatchNorm).

`CandidateGradients` (`gradients.py`) runs `vmap(grad(loss))` over candidate minibatches; on a CPU that costs about
one plain `.backward()` per candidate. Here (the per-sample-gradient hooks of Opacus, but summed per group):

  1. the m·b samples of m candidates go through the model as ONE batch, with the parameters detached (autograd
     computes no weight gradients) and forward hooks recording every Conv2d/Linear input A and output;
  2. one `torch.autograd.grad` of  Σ_c mean-CE(candidate c) = Σ_samples CE / b  gives the gradient D at every
     recorded output (each candidate's samples carry its own 1/b);
  3. a layer's gradient for candidate c is the GROUP sum over its b samples of the per-sample gradients, done per
     layer for all candidates at once without forming per-sample gradients:
        Linear    W_c = D_cᵀ A_c  (one bmm over candidates; extra input dims fold into the sample axis), bias Σ D_c;
        Conv2d    W_c = D_c U_cᵀ  with U the unfolded input, contracted over samples and positions in one bmm,
                  when unfolding at most doubles the input (e.g. LeNet's last conv, whose output is 1x1); for
                  spatially large outputs the unfold is 10-25x the input and materialising it dominates the cost,
                  so there the group sum is the native convolution weight-gradient kernel run once per candidate
                  (m calls of b samples each, no per-sample work); bias Σ over samples and positions.

`GroupedGradients.distances` (the phase-1 entry point; `.gradients` gives the gradients themselves) also
DEDUPLICATES samples: candidates drawn from the same points share (point, flip) pairs (MNIST n=10K, κ=5, μ=200:
20,000 draws hit ~7,300 distinct points), and without BatchNorm a sample's A and D at θ do not depend on the
candidate it is in. So each distinct sample goes through the forward+backward once, compact per-sample factors are
kept (a layer's per-sample gradient where that is smaller than its A and D, e.g. LeNet's first two convs, else A
and D), and every candidate's gradient is summed from them (`embedding_bag`, gathered bmm). Exact up to float
summation order; the factors held are bounded by `dedupe_budget` floats (candidates are split into blocks beyond
it), and plain chunks are used when the distinct samples are more than DEDUPE_MAX_FRACTION of those drawn.

`per_sample_gradients` is the same machinery with groups of one sample (each sample's own cross-entropy).

Checked, raised as `UnsupportedModel` (on the static checks `make_gradient_evaluator` picks vmap instead):
BatchNorm anywhere (a candidate's batch statistics couple its samples, so group sums are wrong), dropout (random
per call), parameters held by any module other than Conv2d/Linear, grouped convolutions, parameters shared by two
modules; at run time a layer output modified in place, a layer whose parameters are asked for but whose forward
never ran (parameters used functionally by a parent), and a layer input whose leading dimension is not the sample
axis. The remaining assumption, as for any hook-based method: a layer's parameters enter the loss only through its
own forward, and each sample's loss depends on that sample alone.
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
                               f"layers, without BatchNorm or dropout: {reason}")


def _param_sources(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Parameter name (as in model.named_parameters()) -> (layer, 'weight' | 'bias')."""
    out = {}
    for mname, module in model.named_modules():
        if isinstance(module, _LAYERS):
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


def _forward_backward(model, layers, sources, params, x, y, scale: float):
    """[(layer, A, D)] per layer call, in call order: the layer's input and the gradient of scale·Σ CE at its
    output, from one forward and one backward that computes no parameter gradients."""
    missing = [name for name in params if name not in sources]
    if missing:
        raise UnsupportedModel(f"parameters {missing} are not Conv2d/Linear weights or biases of the model")
    detached = {name: p.detach() for name, p in params.items()}
    with torch.enable_grad():
        with _recording(layers) as records:
            try:
                logits = functional_call(model, detached, (x,))
            except RuntimeError as e:
                if "in-place" not in str(e):
                    raise
                raise UnsupportedModel(f"a Conv2d/Linear output was modified in place ({e}); the hook path needs "
                                       f"out-of-place ops after Conv2d/Linear layers") from e
        loss = F.cross_entropy(logits, y, reduction="sum")
        if scale != 1:
            loss = loss * scale
        if not records or not loss.requires_grad:
            raise UnsupportedModel("no Conv2d/Linear layer of the model ran in its forward pass")
        for layer, _, output, version in records:
            if output._version != version:
                raise UnsupportedModel(f"the output of a {type(layer).__name__} was modified in place; the hook "
                                       f"path needs out-of-place ops after Conv2d/Linear layers")
        douts = torch.autograd.grad(loss, [r[2] for r in records], allow_unused=True)
    n = len(y)
    out = []
    for (layer, a, output, _), d in zip(records, douts):
        if a.shape[0] != n or output.shape[0] != n:
            raise UnsupportedModel(f"a {type(layer).__name__} saw input/output of leading dims "
                                   f"{a.shape[0]}/{output.shape[0]}, not the sample axis of {n} samples")
        out.append((layer, a, torch.zeros_like(output) if d is None else d.detach()))
    return out


# --------------------------------------------------------------------------------------------- group sums

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


def _conv_weight_per_sample(layer: nn.Conv2d, a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """(N, *weight.shape): per-sample weight gradients, unfolding cache-sized blocks of samples."""
    n, o, ho, wo = d.shape
    k = a.shape[1] * layer.kernel_size[0] * layer.kernel_size[1]
    out = d.new_empty(n, o, k)
    step = max(1, PER_SAMPLE_BLOCK // (k * ho * wo))
    for s in range(0, n, step):
        u = _patches(layer, a[s:s + step], ho, wo, len(a[s:s + step]))  # (n', K, L)
        torch.bmm(d[s:s + step].reshape(-1, o, ho * wo), u.transpose(1, 2), out=out[s:s + step])
    return out.view(n, *layer.weight.shape)


def _group_grads(layer: nn.Module, a: torch.Tensor, d: torch.Tensor, groups: int) -> dict[str, torch.Tensor]:
    """{'weight', 'bias'} -> (G, *shape): the sums over `groups` consecutive equal groups of samples of the layer's
    per-sample gradients (per-sample gradients themselves only when a group is one sample)."""
    n = a.shape[0]
    if n % groups:
        raise RayforgeError(f"{n} samples do not split into {groups} equal groups")
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
        raise UnsupportedModel(f"Conv2d hooks need batched 4-d inputs, got shape {tuple(a.shape)}")
    o, ho, wo = d.shape[1:]
    length = ho * wo
    k = a.shape[1] * layer.kernel_size[0] * layer.kernel_size[1]
    if s == 1:
        out["weight"] = _conv_weight_per_sample(layer, a, d)
    elif k * length <= UNFOLD_MAX_GROWTH * a[0].numel():
        u = _patches(layer, a, ho, wo, groups)  # (G, K, s·L)
        d3 = d.reshape(groups, s, o, length).transpose(1, 2).reshape(groups, o, s * length)
        out["weight"] = torch.bmm(d3, u.transpose(1, 2)).view(groups, *layer.weight.shape)
    else:
        out["weight"] = _conv_weight_per_group(layer, a, d, groups)
    if layer.bias is not None:
        out["bias"] = d.reshape(groups, s, o, length).sum((1, 3))
    return out


def _outer_factors(layer: nn.Module, a: torch.Tensor, d: torch.Tensor, groups: int):
    """(D (G, out, 1), A (G, 1, in)) when each group's gradient is a single outer product (one sample and one
    position: per-sample Linear over plain vectors, per-sample conv with a 1x1 output), else None."""
    if a.shape[0] != groups:
        return None
    if isinstance(layer, nn.Linear):
        if a.numel() != groups * a.shape[-1]:
            return None
        return d.reshape(groups, -1, 1), a.reshape(groups, 1, -1)
    if a.dim() != 4 or d.dim() != 4 or d.shape[2] * d.shape[3] != 1:
        return None
    return d.reshape(groups, -1, 1), _patches(layer, a, 1, 1, groups).view(groups, 1, -1)


def _write(dest: torch.Tensor | None, value: torch.Tensor, key, done: set) -> None:
    if dest is None:
        return
    if key in done:  # a layer called more than once in a forward: its gradient sums over the calls
        dest.add_(value.reshape(dest.shape))
    else:
        dest.copy_(value.reshape(dest.shape))
        done.add(key)


def _group_grads_into(layer, a, d, groups: int, dests: dict, done: set) -> None:
    """`_group_grads` written into `dests` ({'weight'/'bias': view or None}); outer products (per-sample gradients
    of Linear layers and 1x1-output convs) go straight into the output, without a freshly allocated temporary."""
    if all(v is None for v in dests.values()):
        return
    outer = _outer_factors(layer, a, d, groups)
    if outer is None:
        for pname, g in _group_grads(layer, a, d, groups).items():
            _write(dests.get(pname), g, (id(layer), pname), done)
        return
    d2, a2 = outer
    dest, key = dests.get("weight"), (id(layer), "weight")
    if dest is not None:
        dest = dest.view(groups, d2.shape[1], a2.shape[2])
        if key in done:
            dest.addcmul_(d2, a2)
        else:
            torch.mul(d2, a2, out=dest)
            done.add(key)
    if "bias" in dests:
        _write(dests["bias"], d2.reshape(groups, -1), (id(layer), "bias"), done)


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
    """One layer call's per-sample factors for U distinct samples: its per-sample gradient (weight then bias,
    flattened) when that is smaller than the layer's input and output gradient, else A and D."""

    def __init__(self, layer: nn.Module, a: torch.Tensor, d: torch.Tensor, total: int):
        self.layer = layer
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
            dests, col = {}, 0
            for pname, size in zip(_layer_params(self.layer), self.sizes):
                dests[pname] = self.g[start:stop, col:col + size]
                col += size
            _group_grads_into(self.layer, a, d, n, dests, set())
        else:
            self.a[start:stop] = a
            self.d[start:stop] = d

    def sums(self, members: torch.Tensor, dests: dict, done: set) -> None:
        """members (m, b) indices into the U samples: each row's sums written into `dests`."""
        m = len(members)
        if self.per_sample:
            total = F.embedding_bag(members, self.g, mode="sum")
            col = 0
            for pname, size in zip(_layer_params(self.layer), self.sizes):
                _write(dests.get(pname), total[:, col:col + size], (id(self.layer), pname), done)
                col += size
        else:
            flat = members.reshape(-1)
            _group_grads_into(self.layer, self.a.index_select(0, flat), self.d.index_select(0, flat), m, dests, done)


# ------------------------------------------------------------------------------------------------ public API

class GroupedGradients:
    """Same interface as `CandidateGradients`, exact for Conv2d/Linear-only models without BatchNorm or dropout:
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
        self._layers = [m for m in self.model.modules() if isinstance(m, _LAYERS)]
        self._factor_floats: dict[tuple, int] = {}  # input shape -> factor floats per sample

    def __call__(self, params: dict[str, torch.Tensor], xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        """xs: (m, b, C, H, W), ys: (m, b) -> (m, dim) gradients of each candidate's mean cross-entropy, in the
        order of `params` (the model's parameter order); `chunk` candidates per forward+backward."""
        out = _grouped_chunks(self.model, self._layers, self._sources, params, xs, ys, len(ys), self.chunk)
        self.evaluations += len(ys)
        return out

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
            records = _forward_backward(self.model, self._layers, self._sources, params, x, y, 1.0)
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
        factors = self._factors(params, data, uniq // 2, (uniq % 2).astype(bool), self.chunk * b)
        members = torch.as_tensor(inverse.reshape(m, b), device=data.device)
        for start in range(0, m, self.chunk):
            rows = members[start:start + self.chunk]
            with torch.no_grad():
                grads = self._from_factors(factors, rows, params).div_(b)
            self.evaluations += len(rows)
            yield grads

    def _from_factors(self, factors: list[_Factor], rows: torch.Tensor, params) -> torch.Tensor:
        """(len(rows), dim): the sums of the per-sample gradients of each row of sample indices."""
        like = factors[0].g if factors[0].per_sample else factors[0].a
        out, dests = _output(like, self._sources, params, len(rows))
        done: set = set()
        for f in factors:
            f.sums(rows, _layer_dests(dests, f.layer), done)
        _check_done(done, self._sources, params)
        return out

    def _factors(self, params, data, points: np.ndarray, flips: np.ndarray, step: int) -> list[_Factor]:
        """Per-sample factors of the given distinct samples, `step` samples per forward+backward."""
        factors: list[_Factor] | None = None
        for start in range(0, len(points), step):
            x, y = data.batch(points[start:start + step], flips[start:start + step])
            records = _forward_backward(self.model, self._layers, self._sources, params, x, y, 1.0)
            with torch.no_grad():
                if factors is None:
                    factors = [_Factor(layer, a, d, len(points)) for layer, a, d in records]
                if [f.layer for f in factors] != [r[0] for r in records]:
                    raise UnsupportedModel("the model's layers ran in a different order for different inputs")
                for f, (_, a, d) in zip(factors, records):
                    f.fill(start, a, d)
        return factors


def per_sample_gradients(model: nn.Module, params: dict[str, torch.Tensor] | None, x: torch.Tensor,
                         y: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """x (N, C, H, W), y (N,) -> (N, dim): the gradient of each sample's own cross-entropy at `params` (default: the
    model's parameters), flattened in the order of `params` (the model's parameter order). Exact, one
    forward+backward per `chunk` samples (default all), hooks on `model` only during the call. Raises
    `UnsupportedModel` for BatchNorm or dropout models and parameters outside Conv2d/Linear layers."""
    _check_supported(model)
    params = dict(model.named_parameters()) if params is None else params
    sources = _param_sources(model)
    layers = [m for m in model.modules() if isinstance(m, _LAYERS)]
    step = max(1, int(chunk)) if chunk else max(1, len(y))
    return _grouped_chunks(model, layers, sources, params, x.unsqueeze(1), y.unsqueeze(1), len(y), step)


def make_gradient_evaluator(model: nn.Module, chunk: int, method: str = "auto"):
    """`GroupedGradients` when the hook path is exact for `model` ("auto"; "hooks" raises `UnsupportedModel`
    otherwise), else `CandidateGradients` ("vmap" always)."""
    if method == "vmap":
        return CandidateGradients(model, chunk)
    if method == "hooks":
        return GroupedGradients(model, chunk)
    if method == "auto":
        return GroupedGradients(model, chunk) if hooks_supported(model) else CandidateGradients(model, chunk)
    raise RayforgeError(f"unknown gradient method {method!r} (auto, hooks, vmap)")
