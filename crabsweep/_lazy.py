"""PEP 562 lazy exports: a package's public names imported on first use, so importing it stays cheap."""

from __future__ import annotations

import importlib


def lazy_exports(package: str, exports: dict[str, str], namespace: dict):
    """A module `__getattr__` for `package` that imports `exports[name]` (a submodule) on first use."""
    def __getattr__(name: str):
        if name in exports:
            value = getattr(importlib.import_module(f".{exports[name]}", package), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    return __getattr__
