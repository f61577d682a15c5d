"""The BEV head of the ground branch: polar projection with learned depth, polar -> Cartesian
resampling onto the satellite tile's grid, and the multi-scale decoder (METHOD.md section 2).

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
    def forward(ctx, features, weight, bias, depth_bins, chunk):  # noqa: D102
        b, c, h, w = features.shape
        cols = features.permute(1, 0, 3, 2).contiguous()  # (C,B,W,H)
        out = features.new_empty(c, depth_bins, b, w)
        work = _Work(cols, weight, depth_bins, chunk)
        for c0, c1 in work.chunks():
            soft, _ = work.softmax(c0, c1)
            torch.sum(soft.mul_(cols[c0:c1].unsqueeze(1)), dim=-1, out=out[c0:c1])
        ctx.save_for_backward(cols, weight, bias)
        ctx.depth_bins, ctx.chunk = depth_bins, chunk
        return out.permute(2, 0, 1, 3)  # (B,C,D,W)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # noqa: D102
        cols, weight, bias = ctx.saved_tensors
        depth_bins = ctx.depth_bins
        work = _Work(cols, weight, depth_bins, ctx.chunk)
        grad_out = grad_out.permute(1, 2, 0, 3).unsqueeze(-1)  # (C,D,B,W,1), a view
        grad_cols = torch.empty_like(cols)  # dF through the weighted sum, chunk by chunk
        grad_flat = torch.zeros_like(work.flat)  # dF through the logits, accumulated
        grad_weight = torch.empty_like(work.weight2d)
        out = cols.new_empty(ctx.chunk, depth_bins, *cols.shape[1:3], 1)
        for c0, c1 in work.chunks():
            rows = slice(c0 * depth_bins, c1 * depth_bins)
            features = cols[c0:c1].unsqueeze(1)
            soft, spare = work.softmax(c0, c1)  # the logits are spare once S is taken
            p = torch.sum(torch.mul(soft, features, out=spare), dim=-1, keepdim=True,
                          out=out[: c1 - c0])
            soft.mul_(grad_out[c0:c1])  # S * dP
            torch.sum(soft, dim=1, out=grad_cols[c0:c1])
            d_logits = torch.sub(features, p, out=spare).mul_(soft)  # S * dP * (F - P)
            d_logits = d_logits.view(rows.stop - rows.start, -1)
            grad_weight[rows] = _matmul(d_logits, work.flat.t())
            grad_flat += _matmul(work.weight2d[rows].t(), d_logits)
        grad_features = grad_cols.add_(grad_flat.view_as(cols)).permute(1, 0, 3, 2).contiguous()
        return grad_features, grad_weight.view_as(weight), torch.zeros_like(bias), None, None


class _Work:
    """The lean projection's chunk loop and its softmax buffer."""

    def __init__(self, cols: torch.Tensor, weight: torch.Tensor, depth_bins: int,
                 chunk: int) -> None:
        self.channels, self.depth_bins, self.chunk = cols.shape[0], depth_bins, chunk
        self.shape = cols.shape[1:]
        self.flat = cols.view(self.channels, -1)
        self.weight2d = weight.reshape(-1, self.channels)
        self.soft = cols.new_empty(min(chunk, self.channels) * depth_bins, self.flat.shape[1])

    def chunks(self):
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
                 chunk_elements: int = 1 << 23, lean_from: int = 1 << 24) -> None:
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
    wrap = torch.arange(-1, w + 1, device=polar.device) % w  # one column more on each side
    padded = polar.index_select(-1, wrap)
    grid = polar_sampling_grid(size, w, polar.device).to(polar.dtype).expand(b, -1, -1, -1)
    return F.grid_sample(padded, grid, mode="bilinear", padding_mode="border",
                         align_corners=False)


def _upsample(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


def _norm_relu(x, norm_weight, norm_bias, eps: float) -> torch.Tensor:
    return F.relu(F.instance_norm(x, weight=norm_weight, bias=norm_bias, eps=eps), inplace=True)


class _NormReLUConv(torch.autograd.Function):
    """``conv(relu(instance_norm(x)))``, or ``relu(instance_norm(x))`` without a conv, that
    keeps only ``x`` for the backward pass: the normalised activation (as large as ``x``, and
    cheap to redo) is recomputed there instead of stored. Values and gradients are those of
    the modules: the same operators run, the conv's backward included.
    """

    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, eps, conv, weight, bias):  # noqa: D102
        act = _norm_relu(x, norm_weight, norm_bias, eps)
        ctx.save_for_backward(x, norm_weight, norm_bias, weight)
        ctx.eps, ctx.conv = eps, conv
        return act if conv is None else conv._conv_forward(act, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # noqa: D102
        x, norm_weight, norm_bias, weight = ctx.saved_tensors
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_() for t in (x, norm_weight, norm_bias)]
            act = _norm_relu(*inputs, ctx.eps)
        conv_grads = [None, None]
        if ctx.conv is not None:
            grad, *conv_grads = torch.ops.aten.convolution_backward(
                grad, act, weight, _bias_sizes(ctx.conv), *_geometry(ctx.conv),
                [True, True, ctx.conv.bias is not None])
        return *torch.autograd.grad(act, inputs, grad), None, None, *conv_grads


def _geometry(conv: nn.Conv2d) -> tuple:
    """stride, padding, dilation, transposed, output_padding, groups (convolution_backward)."""
    return conv.stride, conv.padding, conv.dilation, False, [0, 0], conv.groups


def _bias_sizes(conv: nn.Conv2d) -> list[int] | None:
    return None if conv.bias is None else [conv.bias.shape[0]]


def _norm_relu_conv(x: torch.Tensor, norm: nn.InstanceNorm2d,
                    conv: nn.Conv2d | None = None) -> torch.Tensor:
    """``conv(relu(norm(x)))`` (``relu(norm(x))`` without ``conv``) through _NormReLUConv."""
    weight, bias = (None, None) if conv is None else (conv.weight, conv.bias)
    return _NormReLUConv.apply(x, norm.weight, norm.bias, norm.eps, conv, weight, bias)


class _UpSplit(torch.autograd.Function):
    """The shared start of an UpStage: ``up = bilinear x2(x)`` feeds the first conv of the
    conv branch and the channel top-k branch; returns (conv(up), top-k values).

    Keeps ``x`` and the top-k indices (as bytes when channel numbers fit) for the backward
    pass, which recomputes ``up`` (4x the size of ``x``) for the conv's weight gradient and
    adds the top-k gradient into the conv's input gradient before undoing the upsampling.
    """

    @staticmethod
    def forward(ctx, x, conv, weight, k):  # noqa: D102
        up = _upsample(x)
        values, index = up.topk(k, dim=1)
        ctx.save_for_backward(x, weight, index.to(torch.uint8 if up.shape[1] <= 256
                                                  else torch.int32))
        ctx.conv = conv
        return conv._conv_forward(up, weight, None), values

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_conv, grad_values):  # noqa: D102
        x, weight, index = ctx.saved_tensors
        conv, (b, c, h, w) = ctx.conv, x.shape
        grad_weight = torch.ops.aten.convolution_backward(
            grad_conv, _upsample(x), weight, None, *_geometry(conv), [False, True, False])[1]
        grad_up = torch.ops.aten.convolution_backward(  # up's values are not read here
            grad_conv, grad_conv.new_empty(1).expand(b, c, 2 * h, 2 * w), weight, None,
            *_geometry(conv), [True, False, False])[0]
        grad_up.scatter_add_(1, index.long(), grad_values)
        grad_x = torch.ops.aten.upsample_bilinear2d_backward(
            grad_up, [2 * h, 2 * w], [b, c, h, w], False, 2.0, 2.0)
        return grad_x, None, grad_weight, None


class DoubleConv(nn.Sequential):
    """Two 3x3 conv + InstanceNorm + ReLU."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.InstanceNorm2d(c_out, affine=True),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            nn.InstanceNorm2d(c_out, affine=True), nn.ReLU(inplace=True),
        )

    def lean(self, c1: torch.Tensor, head: nn.Conv2d | None = None) -> torch.Tensor:
        """The block after its first conv (output ``c1``), then ``head`` if given, keeping
        only the two conv outputs for the backward pass."""
        _, norm1, _, conv2, norm2, _ = self
        return _norm_relu_conv(_norm_relu_conv(c1, norm1, conv2), norm2, head)


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

    def lean(self, x: torch.Tensor) -> torch.Tensor:
        """forward, keeping the input, the two conv outputs and the output only."""
        conv1, norm1, _, conv2, norm2 = self.body
        body = norm2(_norm_relu_conv(conv1(x), norm1, conv2))
        return F.relu(body + self.shortcut(x))


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
        up = _upsample(x)
        return torch.cat([self.conv(up), up.topk(self.k, dim=1).values], dim=1)

    def lean(self, x: torch.Tensor) -> torch.Tensor:
        """forward, keeping the input, the top-k indices and the two conv outputs only."""
        c1, values = _UpSplit.apply(x, self.conv[0], self.conv[0].weight, self.k)
        return torch.cat([self.conv.lean(c1), values], dim=1)


class BEVDecoder(nn.Module):
    """(B,C,N,N) -> (B,K,8N,8N): two residual blocks (C -> C/2), three UpStages, DoubleConv,
    1x1 classifier.

    ``lean`` (when gradients are recorded) runs the same layers under activation
    checkpointing: the low-resolution part (residual blocks, first two UpStages) for the
    batch, the 384x384 part (last UpStage, DoubleConv, classifier) one sample at a time
    (InstanceNorm is per sample and keeps no running statistics, so values and gradients are
    unchanged). Between the forward and the backward pass only the decoder input and each
    sample's 192x192 map are kept. When a part is recomputed, its layers keep only conv
    outputs, block inputs and top-k indices; normalised activations and upsampled maps are
    recomputed once more in their backward step (_NormReLUConv, _UpSplit). Below ``lean_from``
    output pixels per batch the plain pass runs (same maths, faster there, little memory).
    """

    def __init__(self, channels: int, classes: int, lean: bool = True,
                 lean_from: int = 1 << 17) -> None:
        super().__init__()
        self.lean = lean
        self.lean_from = lean_from
        half = max(1, channels // 2)
        self.blocks = nn.Sequential(ResidualBlock(channels, half), ResidualBlock(half, half))
        stages, c = [], half
        for _ in range(3):
            stages.append(UpStage(c))
            c = stages[-1].out_channels
        self.up = nn.Sequential(*stages)
        self.refine = DoubleConv(c, c)
        self.classifier = nn.Conv2d(c, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = x.shape[0] * (8 * x.shape[-2]) * (8 * x.shape[-1])
        if not (self.lean and torch.is_grad_enabled() and pixels >= self.lean_from):
            return self.classifier(self.refine(self.up(self.blocks(x))))
        x = checkpoint(self._lean_bottom, x, use_reentrant=False)
        return torch.cat([checkpoint(self._lean_top, x[i:i + 1], use_reentrant=False)
                          for i in range(x.shape[0])])

    def _lean_bottom(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block.lean(x)
        for stage in self.up[:-1]:
            x = stage.lean(x)
        return x

    def _lean_top(self, x: torch.Tensor) -> torch.Tensor:
        x = self.up[-1].lean(x)
        return self.refine.lean(self.refine[0](x), self.classifier)


class BEVHead(nn.Module):
    """Trunk features of the panorama (B,C,H,W) -> BEV logits (B,K,8N,8N) on the tile's grid.

    ``lean`` selects the memory-lean projection and decoder (benchmarks/RESULTS.md); it does
    not change the maths.
    """

    def __init__(self, channels: int, depth_bins: int, grid_size: int, classes: int,
                 lean: bool = True) -> None:
        super().__init__()
        self.grid_size = grid_size
        self.projection = PolarProjection(channels, depth_bins, lean=lean)
        self.decoder = BEVDecoder(channels, classes, lean=lean)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        polar = self.projection(features)
        return self.decoder(polar_to_cartesian(polar, self.grid_size))
