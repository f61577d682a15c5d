"""The BEV head of the ground branch: polar projection with learned depth, polar -> Cartesian
resampling onto the satellite tile's grid, and the multi-scale decoder (METHOD.md section 2).

The polar projection computes, for every channel c, depth bin d and column w,
``P[c,d,w] = sum_h softmax_h(L[c,d,h,w]) * F[c,h,w]`` with ``L = conv1x1(F)`` viewed as
(B,C,D,H,W). Written directly that tensor (and its softmax, product and gradients) is held in
memory: 0.45 GB each at the paper's size, per batch of 2. :class:`LeanPolarProjection`
computes the same values and exact gradients a few channels at a time and recomputes the
softmax in the backward pass instead of storing it, so memory no longer grows with C*D*H*W.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint


def naive_polar_projection(
    features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, depth_bins: int
) -> torch.Tensor:
    """Reference formulation: (B,C,H,W) -> (B,C,D,W) through the full (B,C,D,H,W) logits."""
    b, c, h, w = features.shape
    logits = F.conv2d(features, weight, bias).view(b, c, depth_bins, h, w)
    return (logits.softmax(dim=3) * features.unsqueeze(2)).sum(dim=3)


class _LeanPolar(torch.autograd.Function):
    """Channel-chunked polar projection; backward recomputes each chunk's softmax.

    Works on the features laid out as (C, B, W, H): the softmax axis (image rows) is innermost
    and each chunk's logits are one matrix product (cc*D, C) @ (C, B*W*H), so a chunk costs a
    handful of large operations. Per chunk with softmax weights S and output P, the gradients
    are dF += sum_d S*dP (the weighted sum), dL = S * dP * (F - P) (softmax backward, using
    sum_h S*F = P), and dL flows through the 1x1 conv to its weight, bias and input.
    """

    @staticmethod
    def forward(ctx, features, weight, bias, depth_bins, chunk):  # noqa: D102
        b, c, h, w = features.shape
        cols = features.permute(1, 0, 3, 2).contiguous()  # (C,B,W,H)
        weight2d = weight.reshape(weight.shape[0], c)
        out = features.new_empty(c, depth_bins, b, w)
        buffer = features.new_empty(chunk * depth_bins, b * w * h)
        for c0 in range(0, c, chunk):
            c1 = min(c, c0 + chunk)
            soft = _chunk_softmax(cols, weight2d, bias, c0, c1, depth_bins, buffer)
            soft.mul_(cols[c0:c1].unsqueeze(1))
            torch.sum(soft, dim=-1, out=out[c0:c1])
        ctx.save_for_backward(cols, weight, bias, out)
        ctx.depth_bins, ctx.chunk = depth_bins, chunk
        return out.permute(2, 0, 1, 3)  # (B,C,D,W)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # noqa: D102
        cols, weight, bias, out = ctx.saved_tensors
        depth_bins, chunk = ctx.depth_bins, ctx.chunk
        c, b, w, h = cols.shape
        flat = cols.view(c, b * w * h)
        weight2d = weight.reshape(weight.shape[0], c)
        grad_out = grad_out.permute(1, 2, 0, 3)  # (C,D,B,W)
        grad_cols = torch.zeros_like(cols)
        grad_flat = grad_cols.view(c, b * w * h)
        grad_weight = torch.empty_like(weight2d)
        grad_bias = torch.empty_like(bias)
        buffer = cols.new_empty(chunk * depth_bins, b * w * h)
        for c0 in range(0, c, chunk):
            c1 = min(c, c0 + chunk)
            rows = slice(c0 * depth_bins, c1 * depth_bins)
            soft = _chunk_softmax(cols, weight2d, bias, c0, c1, depth_bins, buffer)
            # S * dP, then the direct path dF[c,b,w,h] += sum_d S * dP
            soft.mul_(grad_out[c0:c1].unsqueeze(-1))
            grad_cols[c0:c1] += soft.sum(dim=1)
            # softmax path, in place: dL = S * dP * (F - P)
            soft.mul_(cols[c0:c1].unsqueeze(1) - out[c0:c1].unsqueeze(-1))
            d_logits = soft.view((c1 - c0) * depth_bins, b * w * h)
            torch.mm(d_logits, flat.t(), out=grad_weight[rows])
            torch.sum(d_logits, dim=1, out=grad_bias[rows])
            grad_flat.addmm_(weight2d[rows].t(), d_logits)
        grad_features = grad_cols.permute(1, 0, 3, 2).contiguous()
        return grad_features, grad_weight.view_as(weight), grad_bias, None, None


def _chunk_softmax(cols, weight2d, bias, c0, c1, depth_bins, buffer) -> torch.Tensor:
    """Softmax over image rows of the logits of channels c0..c1: (c1-c0, D, B, W, H).

    ``cols`` is the (C,B,W,H) feature layout; the logits go to ``buffer``.
    """
    c, b, w, h = cols.shape
    rows = slice(c0 * depth_bins, c1 * depth_bins)
    logits = buffer[: (c1 - c0) * depth_bins]
    torch.addmm(bias[rows].unsqueeze(1), weight2d[rows], cols.view(c, b * w * h), out=logits)
    return logits.view(c1 - c0, depth_bins, b, w, h).softmax(dim=-1)


class PolarProjection(nn.Module):
    """Learned-depth polar projection (B,C,H,W) -> (B,C,D,W); ``lean`` picks the formulation.

    Both formulations share the parameters (a 1x1 conv C -> C*D), so weights move freely
    between them. ``chunk_elements`` bounds the size of the lean version's work buffers.
    """

    def __init__(self, channels: int, depth_bins: int, lean: bool = True,
                 chunk_elements: int = 1 << 23) -> None:
        super().__init__()
        self.depth_bins = depth_bins
        self.lean = lean
        self.chunk_elements = chunk_elements
        self.depth = nn.Conv2d(channels, channels * depth_bins, kernel_size=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if not self.lean:
            return naive_polar_projection(
                features, self.depth.weight, self.depth.bias, self.depth_bins
            )
        b, _, h, w = features.shape
        chunk = max(1, self.chunk_elements // (b * self.depth_bins * h * w))
        return _LeanPolar.apply(
            features, self.depth.weight, self.depth.bias, self.depth_bins, chunk
        )


def polar_sampling_grid(size: int, azimuth_bins: int, device=None) -> torch.Tensor:
    """``grid_sample`` grid (1,N,N,2) that maps a polar map onto a north-up N x N tile.

    The polar map is (D, W+2): depth bin d (radius, bin 0 nearest the camera) by panorama
    column, padded by one column on each side so azimuth wraps around at south. Cell (i, j)
    of the output has east/north coordinates x, y in [-1, 1] (row 0 = north, column 0 = west);
    its azimuth clockwise from north, ``atan2(x, y)``, picks the column (a panorama column
    covering [u, u+1) looks at ``360 * u / W - 180`` degrees, README "Conventions") and its
    radius picks the depth bin, bins spanning 0 .. sqrt(2) so the tile's corners are covered.
    Building the grid in that convention replaces the flip + 90 degree rotation of the
    original formulation.
    """
    coords = (torch.arange(size, dtype=torch.float64, device=device) * 2 + 1) / size - 1
    north = -coords.view(size, 1).expand(size, size)
    east = coords.view(1, size).expand(size, size)
    azimuth = torch.atan2(east, north) / math.pi  # [-1, 1], 0 = north
    radius = torch.sqrt(east**2 + north**2) / math.sqrt(2)  # [0, 1]
    # normalised x over the padded width: real columns occupy [1, W+1) of W+2
    gx = (azimuth * azimuth_bins / 2 + azimuth_bins / 2 + 1) * 2 / (azimuth_bins + 2) - 1
    gy = radius * 2 - 1
    return torch.stack([gx, gy], dim=-1).unsqueeze(0).float()


def polar_to_cartesian(polar: torch.Tensor, size: int) -> torch.Tensor:
    """(B,C,D,W) polar features -> (B,C,N,N) north-up Cartesian grid (see polar_sampling_grid)."""
    b, _, _, w = polar.shape
    padded = torch.cat([polar[..., -1:], polar, polar[..., :1]], dim=-1)
    grid = polar_sampling_grid(size, w, polar.device).to(polar.dtype).expand(b, -1, -1, -1)
    return F.grid_sample(padded, grid, mode="bilinear", padding_mode="border",
                         align_corners=False)


class DoubleConv(nn.Sequential):
    """Two 3x3 conv + InstanceNorm + ReLU."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.InstanceNorm2d(c_out, affine=True),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            nn.InstanceNorm2d(c_out, affine=True), nn.ReLU(inplace=True),
        )


class ResidualBlock(nn.Module):
    """Conv-norm-ReLU-conv-norm plus a (projected) shortcut, then ReLU."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.InstanceNorm2d(c_out, affine=True),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            nn.InstanceNorm2d(c_out, affine=True),
        )
        self.shortcut = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class UpStage(nn.Module):
    """x2 upsampling: a DoubleConv branch beside a parameter-free one (bilinear + channel top-k).

    The top-k branch keeps, per pixel, the k largest channel values (sorted), so coarse
    evidence reaches the next scale without extra weights. Out channels: 2 * (c_in // 4).
    """

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.k = max(1, c_in // 4)
        self.conv = DoubleConv(c_in, self.k)
        self.out_channels = 2 * self.k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        return torch.cat([self.conv(up), up.topk(self.k, dim=1).values], dim=1)


class BEVDecoder(nn.Module):
    """(B,C,N,N) -> (B,K,8N,8N): two residual blocks (C -> C/2), three UpStages, DoubleConv,
    1x1 classifier.

    With ``recompute``, the high-resolution part (last two UpStages, DoubleConv
    and classifier) runs one sample and one stage at a time under activation checkpointing:
    its activations are recomputed in the backward pass instead of kept, so they are held for
    one sample and one stage only. InstanceNorm is per sample and keeps no running statistics,
    so outputs and gradients are those of the plain pass.
    """

    def __init__(self, channels: int, classes: int, recompute: bool = False) -> None:
        super().__init__()
        self.recompute = recompute
        half = max(1, channels // 2)
        self.blocks = nn.Sequential(ResidualBlock(channels, half), ResidualBlock(half, half))
        stages, c = [], half
        for _ in range(3):
            stages.append(UpStage(c))
            c = stages[-1].out_channels
        self.up = nn.Sequential(*stages)
        self.refine = DoubleConv(c, c)
        self.classifier = nn.Conv2d(c, classes, 1)

    def _output(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.refine(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.up[0](self.blocks(x))
        if not (self.recompute and torch.is_grad_enabled()):
            return self._output(self.up[2](self.up[1](x)))
        samples = []
        for i in range(x.shape[0]):
            z = x[i:i + 1]
            for stage in (self.up[1], self.up[2], self._output):
                z = checkpoint(stage, z, use_reentrant=False)
            samples.append(z)
        return torch.cat(samples)


class BEVHead(nn.Module):
    """Trunk features of the panorama (B,C,H,W) -> BEV logits (B,K,8N,8N) on the tile's grid.

    ``lean`` selects the memory-lean polar projection; ``recompute_decoder`` the recomputing
    decoder (less memory, more time: see benchmarks/RESULTS.md). Neither changes the maths.
    """

    def __init__(self, channels: int, depth_bins: int, grid_size: int, classes: int,
                 lean: bool = True, recompute_decoder: bool = False) -> None:
        super().__init__()
        self.grid_size = grid_size
        self.projection = PolarProjection(channels, depth_bins, lean=lean)
        self.decoder = BEVDecoder(channels, classes, recompute=recompute_decoder)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        polar = self.projection(features)
        return self.decoder(polar_to_cartesian(polar, self.grid_size))
