"""Name -> factory registry for the models used in training, forging and rebuilding.

A factory is ``fn(in_shape: tuple[int, int, int], num_classes: int) -> nn.Module``; it is
registered with the :func:`register_model` decorator and built with :func:`build_model`.
The built-in models register themselves when :mod:`rayforge.models` is imported.

A name of the form ``module:callable`` (e.g. ``mynets:small_cnn``, ``pkg.models:Net``) names the user's own
factory with the same signature, imported on demand (the current directory is searched too, as ``python -m``
does). Importing it runs the user's code: a model owner does so for their own runs, and `rayforge verify`
does so only when told to trust it (``--trust-model-code``).
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from typing import Callable

from torch import nn

from rayforge.errors import RayforgeError, UnusableInput

class UntrustedModelCode(UnusableInput):
    """A `module:callable` model that may only be built when its code is explicitly trusted (exit 2)."""


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
_DOTTED = r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"
CODE_REFERENCE = re.compile(rf"^{_DOTTED}:{_DOTTED}$")


def is_code_reference(name: str) -> bool:
    """True for ``module:callable`` names (the user's own architecture), False for registry names."""
    return isinstance(name, str) and len(name) <= 256 and CODE_REFERENCE.match(name) is not None


def import_factory(reference: str) -> Factory:
    """The callable named by ``module:callable``, imported (with the current directory on the path)."""
    if not is_code_reference(reference):
        raise RayforgeError(f"model {reference!r} is not of the form module:callable")
    module_name, _, attr = reference.partition(":")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.append(cwd)
    try:
        target = importlib.import_module(module_name)
    except ImportError as exc:
        raise RayforgeError(f"model {reference!r}: cannot import {module_name} ({exc})") from None
    finally:
        if added:
            sys.path.remove(cwd)
    for part in attr.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise RayforgeError(f"model {reference!r}: {module_name} has no attribute {attr}")
    if not callable(target):
        raise RayforgeError(f"model {reference!r} is not callable")
    return target


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

    ``name`` is a registered name or ``module:callable`` (imported: runs the user's code).
    Raises :class:`RayforgeError` for an unknown name, a malformed ``in_shape`` or ``num_classes``,
    or an input shape the architecture cannot take.
    """
    _ensure_builtins()
    factory = _REGISTRY.get(name)
    if factory is None and is_code_reference(name):
        factory = import_factory(name)
    if factory is None:
        raise RayforgeError(f"unknown model {name!r} (known: {', '.join(sorted(_REGISTRY))}, or module:callable)")
    shape = _check_in_shape(in_shape)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise RayforgeError(f"num_classes must be a positive integer, got {num_classes!r}")
    model = factory(shape, num_classes)
    if not isinstance(model, nn.Module):
        raise RayforgeError(f"model {name!r}: the factory returned {type(model).__name__}, not a torch.nn.Module")
    return model


def param_count(model: nn.Module) -> int:
    """Number of trainable parameters (``requires_grad``), buffers excluded; shared tensors counted once."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
