"""Satellite semantic priors: the labels that supervise the SSA BEV head (docs/METHOD.md section 3).

Backends (``langsam``, ``oracle``, ``files``) turn satellite tiles into labels; ``run_priors``
writes them where the dataset readers look, skipping tiles already done.
"""

from ssageo.priors.fusion import (
    NAMED_RULES,
    Rule,
    compile_classes,
    encode_label,
    fuse,
    parse_rule,
)
from ssageo.priors.run import PriorBackend, PriorSummary, Tile, list_tiles, run_priors

__all__ = [
    "NAMED_RULES",
    "PriorBackend",
    "PriorSummary",
    "Rule",
    "Tile",
    "compile_classes",
    "encode_label",
    "fuse",
    "list_tiles",
    "parse_rule",
    "run_priors",
]
