"""ssageo: cross-view geo-localization with Spatial Semantic Alignment (SSA)."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

__version__ = "0.1.0"


class _CompatBeforeTorchvision(importlib.abc.MetaPathFinder):
    """Runs ``ssageo._compat`` (the torchvision::nms fallback) just before torchvision's first
    import, wherever that import comes from (ours, timm's, the user's).

    ``import ssageo`` stays light this way (no torch until something needs it), and the fallback
    is still in place before torchvision registers its kernels. The finder finds nothing itself:
    it removes itself, lets ``_compat`` act, and leaves the import to the normal finders.
    """

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname == "torchvision":
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            from ssageo import _compat  # noqa: F401  (registers the fallback on import)
        return None


if "torchvision" in sys.modules:  # already imported: _compat decides whether it can help
    from ssageo import _compat  # noqa: F401
elif not any(isinstance(f, _CompatBeforeTorchvision) for f in sys.meta_path):
    sys.meta_path.insert(0, _CompatBeforeTorchvision())


def __getattr__(name: str) -> Any:
    # Lazy, so that `import ssageo` stays light: the Localizer pulls in the model and data stages.
    if name == "Localizer":
        from ssageo.evaluate.index import Localizer

        return Localizer
    raise AttributeError(f"module 'ssageo' has no attribute {name!r}")
