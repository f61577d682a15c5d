"""The BEV head of the ground branch: polar projection with learned depth, polar -> Cartesian
resampling onto the satellite tile's grid, and the multi-scale decoder (docs/METHOD.md section 2;
the decoder is in ``decoder.py``).

The polar projection computes, for every channel c, depth bin d and column w,
``P[c,d,w] = sum_h softmax_h(L[c,d,h,w]) * F[c,h,w]`` with ``L = conv1x1(F)`` viewed as
(B,C,D,H,W). Written directly that tensor (and its softmax, product and gradients) is held in
memory: 0.45 GB each at the paper's size, per batch of 2. The lean head (``lean=True``)
computes the same values and gradients with memory that does not grow with C*D*H*W: the
projection runs a few channels at a time and recomputes the softmax in the backward pass,
and the decoder keeps only conv outputs and recomputes its 384x384 part per sample there.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ssageo.model.decoder import BEVDecoder
from ssageo.model.polar_lean import LeanPolar, Resampler


def naive_polar_projection(
    features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, depth_bins: int
) -> torch.Tensor:
    """Reference formulation: (B,C,H,W) -> (B,C,D,W) through the full (B,C,D,H,W) logits."""
    b, c, h, w = features.shape
    logits = F.conv2d(features, weight, bias).view(b, c, depth_bins, h, w)
    return (logits.softmax(dim=3) * features.unsqueeze(2)).sum(dim=3)


class PolarProjection(nn.Module):
    """Learned-depth polar projection (B,C,H,W) -> (B,C,D,W); ``lean`` picks the formulation.

    Both formulations share the parameters (a 1x1 conv C -> C*D), so weights move freely
    between them. ``chunk_elements`` bounds the size of the lean version's work buffers; below
    ``lean_from`` elements of (B,C,D,H,W) logits the straightforward code runs even when
    ``lean`` (same maths; at such sizes it is faster and its memory small).
    """

    def __init__(self, channels: int, depth_bins: int, lean: bool = True,
                 chunk_elements: int = 1 << 20, lean_from: int = 1 << 24) -> None:
        super().__init__()
        self.depth_bins = depth_bins
        self.lean = lean
        self.chunk_elements = chunk_elements
        self.lean_from = lean_from
        self.depth = nn.Conv2d(channels, channels * depth_bins, kernel_size=1)

    def runs_lean(self, shape: torch.Size) -> bool:
        """Whether the lean formulation runs for features of ``shape`` (B,C,H,W)."""
        return self.lean and math.prod(shape) * self.depth_bins >= self.lean_from

    def forward(self, features: torch.Tensor,
                resample: Resampler | None = None) -> torch.Tensor:
        """(B,C,H,W) -> (B,C,D,W); with ``resample`` (lean only) -> (B,C,N,N), resampled
        chunk by chunk (``polar_lean``)."""
        b, c, h, w = features.shape
        if not self.runs_lean(features.shape):
            return naive_polar_projection(
                features, self.depth.weight, self.depth.bias, self.depth_bins
            )
        chunk = max(1, self.chunk_elements // (b * self.depth_bins * h * w))
        return LeanPolar.apply(
            features, self.depth.weight, self.depth.bias, self.depth_bins, chunk, resample
        )


def polar_sampling_grid(size: int, azimuth_bins: int,
                        device: torch.device | str | None = None,
                        fov: float = 360.0) -> torch.Tensor:
    """``grid_sample`` grid (1,N,N,2) that maps a polar map onto an N x N BEV grid.

    The polar map is (D, W+2): depth bin d (radius, bin 0 nearest the camera) by image column,
    padded by one column on each side (the wrap-around at south for a panorama, the edge
    column for a crop). Cell (i, j) of the output has right/ahead coordinates x, y in
    [-1, 1] (row 0 ahead, column 0 left; for a panorama, ahead is north: the tile's grid);
    its azimuth clockwise from ahead, ``atan2(x, y)``, picks the column (a column covering
    [u, u+1) of W looks at ``fov * u / W - fov / 2`` degrees: README "Conventions" for the
    whole panorama, ``ssageo.data.fov`` for a crop) and its radius picks the depth bin, bins
    spanning 0 .. sqrt(2) so the tile's corners are covered. Cells outside a crop's wedge
    take its edge columns; the loss ignores them (``fov.camera_frame_label``). Building the
    grid in that convention replaces the flip + 90 degree rotation of the original
    formulation.
    """
    coords = (torch.arange(size, dtype=torch.float64, device=device) * 2 + 1) / size - 1
    north = -coords.view(size, 1).expand(size, size)
    east = coords.view(1, size).expand(size, size)
    azimuth = torch.rad2deg(torch.atan2(east, north))  # [-180, 180], 0 = ahead
    radius = torch.sqrt(east**2 + north**2) / math.sqrt(2)  # [0, 1]
    # normalised x over the padded width: real columns occupy [1, W+1) of W+2
    column = (azimuth + fov / 2) / fov * azimuth_bins
    gx = (column + 1) * 2 / (azimuth_bins + 2) - 1
    gy = radius * 2 - 1
    return torch.stack([gx, gy], dim=-1).unsqueeze(0).float()


class _Resample(torch.autograd.Function):
    """``grid_sample`` (bilinear, border padding, corners not aligned) keeping only the grid for
    the backward pass: the gradient of the input does not read the input's values."""

    @staticmethod
    def forward(ctx: Any, polar: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:  # noqa: D102
        ctx.save_for_backward(grid)
        ctx.shape, ctx.dtype = polar.shape, polar.dtype
        return F.grid_sample(polar, grid, mode="bilinear", padding_mode="border",
                             align_corners=False)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: D102
        (grid,) = ctx.saved_tensors
        values_unread = grad.new_empty(1).expand(ctx.shape)
        # under autocast grid_sample runs in float32 whatever the polar map's precision
        grad_polar = torch.ops.aten.grid_sampler_2d_backward(  # 0: bilinear, 1: border
            grad, values_unread, grid.to(grad.dtype), 0, 1, False, [True, False])[0]
        return grad_polar.to(ctx.dtype), None


def _padding(width: int, fov: float, device: torch.device) -> torch.Tensor:
    """The W+2 source columns of the padded polar map: one column more on each side, wrapped
    at south for a panorama, the edge column repeated for a crop."""
    pad = torch.arange(-1, width + 1, device=device)
    return pad % width if fov >= 360.0 else pad.clamp(0, width - 1)


def polar_to_cartesian(polar: torch.Tensor, size: int, lean: bool = False,
                       fov: float = 360.0) -> torch.Tensor:
    """(B,C,D,W) polar features of a ``fov``-degree view -> (B,C,N,N) Cartesian grid in the
    view's frame (north-up for a panorama; see polar_sampling_grid); ``lean`` keeps only the
    grid (not the padded polar map) for the backward pass."""
    b, _, _, w = polar.shape
    pad = _padding(w, fov, polar.device)
    padded = polar.index_select(-1, pad)
    grid = polar_sampling_grid(size, w, polar.device, fov).to(polar.dtype)
    grid = grid.expand(b, -1, -1, -1)
    if lean and torch.is_grad_enabled():
        return _Resample.apply(padded, grid)
    return F.grid_sample(padded, grid, mode="bilinear", padding_mode="border",
                         align_corners=False)


class BEVHead(nn.Module):
    """Trunk features of the panorama (B,C,H,W) -> BEV logits (B,K,8N,8N) on the tile's grid.

    ``lean`` selects the memory-lean projection and decoder (benchmarks/RESULTS.md); it does
    not change the maths. ``fov``: the degrees the query's columns span (``data.fov``); below
    360 the logits are in the crop's camera frame and only its visible wedge is meaningful.
    """

    def __init__(self, channels: int, depth_bins: int, grid_size: int, classes: int,
                 lean: bool = True) -> None:
        super().__init__()
        self.grid_size = grid_size
        self.fov = 360.0
        self.projection = PolarProjection(channels, depth_bins, lean=lean)
        self.decoder = BEVDecoder(channels, classes, lean=lean)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        n = self.grid_size
        if self.projection.runs_lean(features.shape):
            # projected and resampled chunk by chunk: no (B,C,D,W) polar map or gradient
            w = features.shape[-1]
            resample = Resampler(polar_sampling_grid(n, w, features.device, self.fov),
                                 _padding(w, self.fov, features.device),
                                 self.projection.depth_bins)
            return self.decoder(self.projection(features, resample))
        polar = self.projection(features)
        lean = (self.decoder.runs_lean((features.shape[0], features.shape[1], n, n))
                if isinstance(self.decoder, BEVDecoder) else self.projection.lean)  # benchmarks
        return self.decoder(polar_to_cartesian(polar, n, lean, self.fov))
