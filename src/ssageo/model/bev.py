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
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ssageo.model.decoder import BEVDecoder


def naive_polar_projection(
    features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, depth_bins: int
) -> torch.Tensor:
    """Reference formulation: (B,C,H,W) -> (B,C,D,W) through the full (B,C,D,H,W) logits."""
    b, c, h, w = features.shape
    logits = F.conv2d(features, weight, bias).view(b, c, depth_bins, h, w)
    return (logits.softmax(dim=3) * features.unsqueeze(2)).sum(dim=3)


_HAS_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(
    torch.ops.mkldnn, "_linear_pointwise")


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` (2-d); float32 CPU products go through oneDNN where PyTorch has it.

    PyTorch sends float32 ``mm`` to its BLAS (MKL), which on AVX-512 CPUs that are not
    Intel's runs about half as fast as oneDNN's kernels (benchmarks/RESULTS.md); results are
    float32 products either way (summation order differs, ~1e-7 relative).
    """
    if (a.dtype == torch.float32 and a.device.type == "cpu" and torch.backends.mkldnn.enabled
            and _HAS_ONEDNN_LINEAR):
        return torch.ops.mkldnn._linear_pointwise(a, b.t(), None, "none", [], "")
    return torch.mm(a, b)


class _LeanPolar(torch.autograd.Function):
    """Channel-chunked polar projection; backward recomputes each chunk's softmax.

    Works on the features laid out as (C, B, W, H): the softmax axis (image rows) is innermost
    and each chunk's logits are one matrix product (cc*D, C) @ (C, B*W*H). Only the features
    are kept for the backward pass. The conv's bias is constant along the softmax axis, so it
    cancels in the softmax: it is left out, and its gradient is exactly zero. Per chunk with
    softmax weights S, the output P = sum_h S*F is recomputed in the backward pass (cheap once
    S is), and the gradients are dF += sum_d S*dP (the weighted sum), dL = S * dP * (F - P)
    (softmax backward, using sum_h S*F = P), and dL flows through the 1x1 conv to its weight
    and input.
    """

    @staticmethod
    def forward(ctx: Any, features: torch.Tensor, weight: torch.Tensor,  # noqa: D102
                bias: torch.Tensor, depth_bins: int, chunk: int) -> torch.Tensor:
        b, c, h, w = features.shape
        cols = features.permute(1, 0, 3, 2).contiguous()  # (C,B,W,H)
        out = features.new_empty(c, depth_bins, b, w)
        work = _Work(cols, weight, depth_bins, chunk)
        for c0, c1 in work.chunks():
            soft, logits = work.softmax(c0, c1)
            torch.sum(soft.mul_(cols[c0:c1].unsqueeze(1)), dim=-1, out=out[c0:c1])
            del logits  # freed before the next chunk's product, not after it
        ctx.save_for_backward(cols, weight, bias)
        ctx.depth_bins, ctx.chunk = depth_bins, chunk
        return out.permute(2, 0, 1, 3)  # (B,C,D,W)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: D102
        cols, weight, bias = ctx.saved_tensors
        depth_bins = ctx.depth_bins
        work = _Work(cols, weight, depth_bins, ctx.chunk)
        grad_out = grad_out.permute(1, 2, 0, 3).unsqueeze(-1)  # (C,D,B,W,1), a view
        # dF: through the weighted sum chunk by chunk, plus through the logits (all channels
        # from every chunk), accumulated in place
        grad_cols = torch.zeros_like(cols)
        grad_weight = torch.empty_like(work.weight2d)
        out = cols.new_empty(ctx.chunk, depth_bins, *cols.shape[1:3], 1)
        for c0, c1 in work.chunks():
            rows = slice(c0 * depth_bins, c1 * depth_bins)
            features = cols[c0:c1].unsqueeze(1)
            soft, spare = work.softmax(c0, c1)  # the logits are spare once S is taken
            p = torch.sum(torch.mul(soft, features, out=spare), dim=-1, keepdim=True,
                          out=out[: c1 - c0])
            soft.mul_(grad_out[c0:c1])  # S * dP
            grad_cols[c0:c1] += soft.sum(dim=1)
            d_logits = torch.sub(features, p, out=spare).mul_(soft)  # S * dP * (F - P)
            d_logits = d_logits.view(rows.stop - rows.start, -1)
            grad_weight[rows] = _matmul(d_logits, work.flat.t())
            grad_cols.view_as(work.flat).add_(_matmul(work.weight2d[rows].t(), d_logits))
            del soft, spare, d_logits  # this chunk's logits go before the next chunk's come
        grad_features = grad_cols.permute(1, 0, 3, 2).contiguous()
        return grad_features, grad_weight.view_as(weight), torch.zeros_like(bias), None, None


class _Work:
    """The lean projection's chunk loop and its softmax buffer."""

    def __init__(self, cols: torch.Tensor, weight: torch.Tensor, depth_bins: int,
                 chunk: int) -> None:
        self.channels, self.depth_bins, self.chunk = cols.shape[0], depth_bins, chunk
        self.shape = cols.shape[1:]
        self.flat = cols.view(self.channels, -1)
        # under autocast the features arrive in low precision: the products run in theirs,
        # as autocast runs the straightforward conv (the weight's gradient is cast back)
        self.weight2d = weight.reshape(-1, self.channels).to(cols.dtype)
        self.soft = cols.new_empty(min(chunk, self.channels) * depth_bins, self.flat.shape[1])

    def chunks(self) -> Iterator[tuple[int, int]]:
        """(first, end) channel of every chunk."""
        return ((c0, min(self.channels, c0 + self.chunk))
                for c0 in range(0, self.channels, self.chunk))

    def softmax(self, c0: int, c1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax over image rows of the logits of channels c0..c1, and the logits (free for
        reuse): both (c1-c0, D, B, W, H)."""
        shape = (c1 - c0, self.depth_bins, *self.shape)
        logits = _matmul(self.weight2d[c0 * self.depth_bins:c1 * self.depth_bins], self.flat)
        soft = self.soft[: (c1 - c0) * self.depth_bins].view(shape)
        return torch.softmax(logits.view(shape), dim=-1, out=soft), logits.view(shape)


class PolarProjection(nn.Module):
    """Learned-depth polar projection (B,C,H,W) -> (B,C,D,W); ``lean`` picks the formulation.

    Both formulations share the parameters (a 1x1 conv C -> C*D), so weights move freely
    between them. ``chunk_elements`` bounds the size of the lean version's work buffers; below
    ``lean_from`` elements of (B,C,D,H,W) logits the straightforward code runs even when
    ``lean`` (same maths; at such sizes it is faster and its memory small).
    """

    def __init__(self, channels: int, depth_bins: int, lean: bool = True,
                 chunk_elements: int = 1 << 21, lean_from: int = 1 << 24) -> None:
        super().__init__()
        self.depth_bins = depth_bins
        self.lean = lean
        self.chunk_elements = chunk_elements
        self.lean_from = lean_from
        self.depth = nn.Conv2d(channels, channels * depth_bins, kernel_size=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        b, c, h, w = features.shape
        if not self.lean or b * c * self.depth_bins * h * w < self.lean_from:
            return naive_polar_projection(
                features, self.depth.weight, self.depth.bias, self.depth_bins
            )
        chunk = max(1, self.chunk_elements // (b * self.depth_bins * h * w))
        return _LeanPolar.apply(
            features, self.depth.weight, self.depth.bias, self.depth_bins, chunk
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


def polar_to_cartesian(polar: torch.Tensor, size: int, lean: bool = False,
                       fov: float = 360.0) -> torch.Tensor:
    """(B,C,D,W) polar features of a ``fov``-degree view -> (B,C,N,N) Cartesian grid in the
    view's frame (north-up for a panorama; see polar_sampling_grid); ``lean`` keeps only the
    grid (not the padded polar map) for the backward pass."""
    b, _, _, w = polar.shape
    pad = torch.arange(-1, w + 1, device=polar.device)  # one column more on each side
    pad = pad % w if fov >= 360.0 else pad.clamp(0, w - 1)  # wrap at south; edge of a crop
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
        polar = self.projection(features)
        n = self.grid_size
        lean = (self.decoder.runs_lean((features.shape[0], features.shape[1], n, n))
                if isinstance(self.decoder, BEVDecoder) else self.projection.lean)  # benchmarks
        return self.decoder(polar_to_cartesian(polar, n, lean, self.fov))
