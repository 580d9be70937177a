"""Name -> factory registry for the models used in training, forging and rebuilding.

A factory is ``fn(in_shape: tuple[int, int, int], num_classes: int) -> nn.Module``; it is
registered with the :func:`register_model` decorator and built with :func:`build_model`.
The built-in models register themselves when :mod:`rayforge.models` is imported.
"""

from __future__ import annotations

import importlib
from typing import Callable

from torch import nn

from rayforge.errors import RayforgeError

Factory = Callable[[tuple[int, int, int], int], nn.Module]

_REGISTRY: dict[str, Factory] = {}

# Modules whose import registers the built-in models.
_BUILTIN_MODULES = (
    "rayforge.models.lenet5",
    "rayforge.models.vgg_mini",
    "rayforge.models.resnet_mini",
    "rayforge.models.logreg",
    "rayforge.models.cnn32",
    "rayforge.models.wrn",
)
_builtins_loaded = False


def _ensure_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for mod in _BUILTIN_MODULES:
            importlib.import_module(mod)


def register_model(name: str) -> Callable[[Factory], Factory]:
    """Decorator: register ``factory(in_shape, num_classes) -> nn.Module`` under ``name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name must be a non-empty string, got {name!r}")

    def decorator(factory: Factory) -> Factory:
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not factory:
            raise ValueError(f"model {name!r} is already registered (by {existing.__module__}.{existing.__qualname__})")
        _REGISTRY[name] = factory
        return factory

    return decorator


def model_names() -> list[str]:
    """The registered model names, sorted."""
    _ensure_builtins()
    return sorted(_REGISTRY)


def _check_in_shape(in_shape) -> tuple[int, int, int]:
    try:
        shape = tuple(int(d) for d in in_shape)
        ok = len(shape) == 3 and all(d > 0 for d in shape) and all(int(d) == d for d in in_shape)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise RayforgeError(f"in_shape must be three positive integers (C, H, W), got {in_shape!r}")
    return shape  # type: ignore[return-value]


def build_model(name: str, in_shape=(1, 32, 32), num_classes: int = 10) -> nn.Module:
    """Build a fresh (randomly initialised, from torch's global RNG) model by name.

    Raises :class:`RayforgeError` for an unknown name, a malformed ``in_shape`` or ``num_classes``,
    or an input shape the architecture cannot take.
    """
    _ensure_builtins()
    factory = _REGISTRY.get(name)
    if factory is None:
        raise RayforgeError(f"unknown model {name!r} (known: {', '.join(sorted(_REGISTRY))})")
    shape = _check_in_shape(in_shape)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise RayforgeError(f"num_classes must be a positive integer, got {num_classes!r}")
    return factory(shape, num_classes)


def param_count(model: nn.Module) -> int:
    """Number of trainable parameters (``requires_grad``), buffers excluded; shared tensors counted once."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
