"""ssageo: cross-view geo-localization with Spatial Semantic Alignment (SSA)."""

from ssageo import _compat  # noqa: F401  (must precede any torchvision/timm import)

__version__ = "0.1.0"
