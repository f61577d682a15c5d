"""ssageo: cross-view geo-localization with Spatial Semantic Alignment (SSA)."""

from ssageo import _compat  # noqa: F401  (must precede any torchvision/timm import)

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so that `import ssageo` stays light: the Localizer pulls in the model and data stages.
    if name == "Localizer":
        from ssageo.evaluate.index import Localizer

        return Localizer
    raise AttributeError(f"module 'ssageo' has no attribute {name!r}")
