"""Heavy packages imported on first use, for the commands that should start at once.

`mergeyard methods` imports every method module, and those `import torch` (1.1 s here) and scipy (0.3 s) at the
top although listing their parameters never touches either. Python 3.11's own `importlib.util.LazyLoader`
cannot help: `import torch` of a lazily loaded module reads its `__spec__`, which loads it. A `Deferred` module
answers the attributes the import system and `inspect` read (`__spec__`, `__file__`) itself and imports the
real package on any other, so a command that does use torch still gets it, a second later.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

HEAVY = ("torch", "scipy", "numpy")


class Deferred(types.ModuleType):
    def __init__(self, name: str, spec) -> None:
        super().__init__(name)
        self.__spec__ = spec
        self.__file__ = spec.origin
        self.__loader__ = spec.loader

    def __getattr__(self, attr: str):
        # `__path__` is not set on purpose: importing a submodule asks for it, which must load the package first
        name = self.__name__
        if sys.modules.get(name) is self:
            del sys.modules[name]
        real = importlib.import_module(name)
        self.__dict__.update(real.__dict__)  # later reads through modules that bound this one are plain lookups
        return getattr(real, attr)


def defer(names: tuple[str, ...] = HEAVY) -> None:
    """Put a `Deferred` in sys.modules for each package not imported yet (and importable)."""
    for name in names:
        if name in sys.modules:
            continue
        spec = importlib.util.find_spec(name)
        if spec is not None:
            sys.modules[name] = Deferred(name, spec)
