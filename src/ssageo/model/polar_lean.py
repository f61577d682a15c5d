"""The lean polar projection of the BEV head (``bev.PolarProjection``), optionally followed by the
polar -> Cartesian resampling in the same channel-chunk loop (``bev.polar_to_cartesian``): the
same values and gradients as the straightforward formulation, with memory that does not grow
with C*D*H*W, and, resampled, without the (B,C,D,W) polar map or its gradient ever whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

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


class Resampler:
    """The polar -> Cartesian resampling of ``bev.polar_to_cartesian`` for a few channels at a
    time, on polar maps laid out as the lean projection makes them, (c, D, B, W).

    ``grid``: (1,N,N,2) sampling grid over the padded width W+2; ``pad``: the W+2 source
    columns of the padded map (wrap-around or edge columns); ``depth``: D. Its backward step
    does not read the polar values (bilinear weights come from the grid alone).
    """

    def __init__(self, grid: torch.Tensor, pad: torch.Tensor, depth: int) -> None:
        self.grid, self.pad, self.depth = grid, pad, depth

    def forward(self, polar: torch.Tensor) -> torch.Tensor:
        """(c,D,B,W) -> (B,c,N,N); bilinear, border padding, corners not aligned."""
        padded = polar.index_select(-1, self.pad).permute(2, 0, 1, 3)  # (B,c,D,W+2)
        grid = self.grid.to(padded.dtype).expand(padded.shape[0], -1, -1, -1)
        return F.grid_sample(padded, grid, mode="bilinear", padding_mode="border",
                             align_corners=False)

    def backward(self, grad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Gradient (B,c,N,N) of the output -> gradient (c,D,B,W) of the polar map, in ``dtype``."""
        b, c = grad.shape[:2]
        depth, width = self.depth, self.pad.shape[0] - 2
        unread = grad.new_empty(1).expand(b, c, depth, width + 2)
        # under autocast grid_sample ran in float32 whatever the polar map's precision
        grid = self.grid.to(grad.dtype).expand(b, -1, -1, -1)
        grad_padded = torch.ops.aten.grid_sampler_2d_backward(  # 0: bilinear, 1: border
            grad, unread, grid, 0, 1, False, [True, False])[0]
        grad_polar = grad_padded.new_zeros(b, c, depth, width).index_add_(-1, self.pad,
                                                                          grad_padded)
        return grad_polar.permute(1, 2, 0, 3).to(dtype)


class LeanPolar(torch.autograd.Function):
    """Channel-chunked polar projection; backward recomputes each chunk's softmax.

    Works on the features laid out as (C, B, W, H): the softmax axis (image rows) is innermost
    and each chunk's logits are one matrix product (cc*D, C) @ (C, B*W*H). Only the features
    are kept for the backward pass (the input itself: the (C,B,W,H) copy is remade there). The
    conv's bias is constant along the softmax axis, so it cancels in the softmax: it is left
    out, and its gradient is exactly zero. Per chunk with softmax weights S, the output
    P = sum_h S*F is recomputed in the backward pass (cheap once S is), and the gradients are
    dF += sum_d S*dP (the weighted sum), dL = S * dP * (F - P) (softmax backward, using
    sum_h S*F = P), and dL flows through the 1x1 conv to its weight and input.

    With a ``Resampler`` each chunk's polar map is resampled to the Cartesian grid at once
    (output (B,C,N,N)), and in the backward pass each chunk's polar gradient is made from the
    Cartesian gradient's channels, so neither is ever made for all channels.
    """

    @staticmethod
    def forward(ctx: Any, features: torch.Tensor, weight: torch.Tensor,  # noqa: D102
                bias: torch.Tensor, depth_bins: int, chunk: int,
                resample: Resampler | None) -> torch.Tensor:
        b, c, h, w = features.shape
        cols = features.permute(1, 0, 3, 2).contiguous()  # (C,B,W,H)
        work = _Work(cols, weight, depth_bins, chunk)
        polar = features.new_empty(c if resample is None else work.chunk, depth_bins, b, w)
        out: torch.Tensor | None = None if resample is not None else polar
        for c0, c1 in work.chunks():
            soft, logits = work.softmax(c0, c1)
            part = polar[c0:c1] if resample is None else polar[: c1 - c0]
            torch.sum(soft.mul_(cols[c0:c1].unsqueeze(1)), dim=-1, out=part)
            del logits  # freed before the next chunk's product, not after it
            if resample is not None:
                cart = resample.forward(part)
                if out is None:  # its dtype is grid_sample's (float32 under autocast)
                    out = cart.new_empty(b, c, *cart.shape[2:])
                out[:, c0:c1] = cart
        ctx.save_for_backward(features, weight, bias)
        ctx.depth_bins, ctx.chunk, ctx.resample = depth_bins, chunk, resample
        assert out is not None  # features have channels
        return out if resample is not None else out.permute(2, 0, 1, 3)  # (B,C,D,W)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: D102
        features, weight, bias = ctx.saved_tensors
        depth_bins, resample = ctx.depth_bins, ctx.resample
        cols = features.permute(1, 0, 3, 2).contiguous()
        work = _Work(cols, weight, depth_bins, ctx.chunk)
        if resample is None:
            grad_out = grad_out.permute(1, 2, 0, 3)  # (C,D,B,W), a view
        # dF: through the weighted sum chunk by chunk, plus through the logits (all channels
        # from every chunk), accumulated in place
        grad_cols = torch.zeros_like(cols)
        grad_weight = torch.empty_like(work.weight2d)
        out = cols.new_empty(work.chunk, depth_bins, *cols.shape[1:3], 1)
        for c0, c1 in work.chunks():
            rows = slice(c0 * depth_bins, c1 * depth_bins)
            part = (grad_out[c0:c1] if resample is None
                    else resample.backward(grad_out[:, c0:c1], cols.dtype)).unsqueeze(-1)
            chunk_features = cols[c0:c1].unsqueeze(1)
            soft, spare = work.softmax(c0, c1)  # the logits are spare once S is taken
            p = torch.sum(torch.mul(soft, chunk_features, out=spare), dim=-1, keepdim=True,
                          out=out[: c1 - c0])
            soft.mul_(part)  # S * dP
            del part
            grad_cols[c0:c1] += soft.sum(dim=1)
            d_logits = torch.sub(chunk_features, p, out=spare).mul_(soft)  # S * dP * (F - P)
            d_logits = d_logits.view(rows.stop - rows.start, -1)
            grad_weight[rows] = _matmul(d_logits, work.flat.t())
            grad_cols.view_as(work.flat).add_(_matmul(work.weight2d[rows].t(), d_logits))
            del soft, spare, d_logits  # this chunk's logits go before the next chunk's come
        del work, out, cols  # the work buffers go before the features' gradient is laid out
        grad_features = grad_cols.permute(1, 0, 3, 2).contiguous()
        return (grad_features, grad_weight.view_as(weight), torch.zeros_like(bias),
                None, None, None)


class _Work:
    """The lean projection's chunk loop and its softmax buffer."""

    def __init__(self, cols: torch.Tensor, weight: torch.Tensor, depth_bins: int,
                 chunk: int) -> None:
        self.channels, self.depth_bins = cols.shape[0], depth_bins
        self.chunk = min(chunk, self.channels)
        self.shape = cols.shape[1:]
        self.flat = cols.view(self.channels, -1)
        # under autocast the features arrive in low precision: the products run in theirs,
        # as autocast runs the straightforward conv (the weight's gradient is cast back)
        self.weight2d = weight.reshape(-1, self.channels).to(cols.dtype)
        self.soft = cols.new_empty(self.chunk * depth_bins, self.flat.shape[1])

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
