"""BatchNorm running statistics per view, for an encoder both views share.

A shared encoder sees panoramas and satellite tiles in separate forward passes. In training,
BatchNorm normalises each pass by that batch's own statistics, but its running averages (what
eval mode normalises by) are updated by both views in turn, so they end as a mixture that
describes neither: at evaluation every descriptor is computed with the wrong normalisation.
Measured on the demo's world (benchmarks/RESULTS.md, "The demo's training regime"): an
ImageNet-pretrained EfficientNet-Lite0 at R@1 0.5 % (chance) in eval mode gave 13.0 % with each
view's statistics re-estimated on its own images, weights unchanged.

``add_view_stats`` gives every BatchNorm layer of a module a second set of running statistics
(buffers ``<name>_reference``), and ``reference_stats`` swaps them in while the reference view
runs, in training (its batches update only its own averages) and in evaluation. Weights and
the normalisation's maths are shared; only the running averages are per view. LayerNorm
backbones (ConvNeXt, the paper's; ViT) have no running statistics and are unaffected.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

SUFFIX = "_reference"
STATS = ("running_mean", "running_var", "num_batches_tracked")


def _norms(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.track_running_stats and all(m._buffers.get(s) is not None for s in STATS)]


def add_view_stats(module: nn.Module) -> int:
    """Give each BatchNorm layer of ``module`` the reference view's own running statistics,
    starting as a copy of the current ones (e.g. ImageNet's); returns how many layers."""
    norms = _norms(module)
    for m in norms:
        for name in STATS:
            stat = m._buffers[name]
            assert stat is not None  # _norms keeps layers that have all three
            m.register_buffer(name + SUFFIX, stat.detach().clone())
    return len(norms)


@contextmanager
def reference_stats(module: nn.Module) -> Iterator[None]:
    """While active, ``module``'s BatchNorm layers read and update the reference view's
    running statistics (swapped in place of the query view's, then swapped back)."""
    norms = [m for m in _norms(module) if (STATS[0] + SUFFIX) in m._buffers]
    _swap(norms)
    try:
        yield
    finally:
        _swap(norms)


def _swap(norms: list[nn.Module]) -> None:
    for m in norms:
        b = m._buffers
        for name in STATS:
            b[name], b[name + SUFFIX] = b[name + SUFFIX], b[name]


def fill_view_stats(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]
                    ) -> dict[str, torch.Tensor]:
    """``state`` saved before per-view statistics existed (no ``*_reference`` buffers) made
    loadable into a model that has them: each view starts from the saved shared statistics."""
    filled = dict(state)
    for key in own:
        if key.endswith(SUFFIX) and key not in state:
            shared = key[: -len(SUFFIX)]
            if shared in state:
                filled[key] = state[shared]
    return filled
