"""ssageo: cross-view geo-localization with Spatial Semantic Alignment (SSA)."""

import sys
from importlib.abc import MetaPathFinder


class _BeforeTorchvision(MetaPathFinder):
    """Runs :mod:`ssageo._compat` just before torchvision's first import (and so timm's).

    Deferred rather than imported here: ``_compat`` imports torch, and ``import ssageo`` must
    stay torch-free for the ONNX deployment path (``ssageo locate --onnx``).
    """

    def find_spec(self, name, path=None, target=None):  # noqa: D102 - importlib protocol
        if name == "torchvision":
            sys.meta_path.remove(self)
            from ssageo import _compat  # noqa: F401  (registers the fallback ops)
        return None  # the normal finders import torchvision itself


if "torchvision" in sys.modules:  # already imported: _compat decides whether it can help
    from ssageo import _compat  # noqa: F401
elif not any(isinstance(f, _BeforeTorchvision) for f in sys.meta_path):
    sys.meta_path.insert(0, _BeforeTorchvision())

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so that `import ssageo` stays light: the Localizer pulls in the model and data stages.
    if name == "Localizer":
        from ssageo.evaluate.index import Localizer

        return Localizer
    raise AttributeError(f"module 'ssageo' has no attribute {name!r}")
