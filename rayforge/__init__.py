"""rayforge: Proofs of Repudiation for membership-inference claims, forged from SGD training logs on Ray.

The public API (`import rayforge as rf`): `rf.train`, `rf.forge`, `rf.rebuild`, `rf.attack`, `rf.report`,
`rf.audit`, `rf.export_por`, `rf.verify_por`, `rf.load_config` (rayforge.api) and `rf.Recorder`
(rayforge.train.recorder), the same functions the `rayforge` command line calls.

`train`, `forge`, `rebuild`, `report` and `audit` are also subpackages: on the package each name is one object
that calls the API function and, for any other attribute, is the subpackage (`rayforge.forge.driver`,
`import rayforge.train.run as run` and `from rayforge.forge import swap` all work as before).
"""

import functools as _functools
import importlib as _importlib
import sys as _sys
import types as _types

from rayforge import api as _api

__version__ = "0.1.0"
__all__ = ["Recorder", "attack", "audit", "export_por", "forge", "load_config", "rebuild", "report", "train",
           "verify_por"]


class _Stage:
    """An API function that also stands for the subpackage of the same name."""

    def __init__(self, fn, package: str):
        _functools.update_wrapper(self, fn)
        self._package = package

    def __call__(self, *args, **kwargs):
        return self.__wrapped__(*args, **kwargs)

    def __getattr__(self, name):  # only for what the function itself does not have: the subpackage's attributes
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(_importlib.import_module(self._package), name)

    def __repr__(self) -> str:
        return f"<rayforge API function {self.__wrapped__.__name__} (also the package {self._package})>"


train = _Stage(_api.train, "rayforge.train")
forge = _Stage(_api.forge, "rayforge.forge")
rebuild = _Stage(_api.rebuild, "rayforge.rebuild")
report = _Stage(_api.report, "rayforge.report")
audit = _Stage(_api.audit, "rayforge.audit")
attack, export_por, verify_por, load_config = _api.attack, _api.export_por, _api.verify_por, _api.load_config
_STAGES = frozenset({"train", "forge", "rebuild", "report", "audit"})


def __getattr__(name):
    if name == "Recorder":  # imports torch: only when asked for
        from rayforge.train.recorder import Recorder

        return Recorder
    raise AttributeError(f"module 'rayforge' has no attribute {name!r}")


class _Package(_types.ModuleType):
    """The package module: importing a subpackage must not replace the API object of the same name (the import
    system sets the package attribute of every subpackage it imports); the object forwards to the subpackage."""

    def __setattr__(self, name, value):
        if name in _STAGES and isinstance(value, _types.ModuleType):
            return
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package
