"""rayforge: Proofs of Repudiation for membership-inference claims, forged from SGD training logs on Ray.

The public API (`import rayforge as rf`): `rf.train`, `rf.forge`, `rf.rebuild`, `rf.attack`, `rf.report`,
`rf.audit`, `rf.export_por`, `rf.verify_por`, `rf.load_config` (rayforge.api) and `rf.Recorder`
(rayforge.train.recorder), the same functions the `rayforge` command line calls.

Several of these names are also subpackages (rayforge.train, .forge, .rebuild, .report, .audit). On the package
they stay the functions: import from the subpackages with `from rayforge.train.trainer import ...` (or
`from rayforge.train import trainer`), never through the attribute (`rayforge.train.trainer`).
"""

import sys as _sys
import types as _types

from rayforge.api import attack, audit, export_por, forge, load_config, rebuild, report, train, verify_por

__version__ = "0.1.0"
__all__ = ["Recorder", "attack", "audit", "export_por", "forge", "load_config", "rebuild", "report", "train",
           "verify_por"]
_FACADE = frozenset(__all__)


def __getattr__(name):
    if name == "Recorder":  # imports torch: only when asked for
        from rayforge.train.recorder import Recorder

        return Recorder
    raise AttributeError(f"module 'rayforge' has no attribute {name!r}")


class _Package(_types.ModuleType):
    """The package module: importing a subpackage must not replace the API function of the same name (the import
    system sets the package attribute of every subpackage it imports)."""

    def __setattr__(self, name, value):
        if name in _FACADE and isinstance(value, _types.ModuleType) and name in self.__dict__:
            return
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package
