"""Lazy package attributes (PEP 562): a package's public names imported on first use, so that
importing one light submodule (or the CLI) does not load torch through the package's others."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, where: dict[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` giving ``name`` from ``package.<where[name]>`` when first used."""
    def __getattr__(name: str) -> object:
        if name in where:
            return getattr(importlib.import_module(f"{package}.{where[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
