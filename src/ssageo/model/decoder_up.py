"""The lean start of a decoder UpStage (``decoder.py``): the x2 upsampling, the conv branch's
first conv and the top-k branch in row bands of the output, so that the upsampled map (4x the
input's size) is never whole, in the forward pass or in the backward pass.

A band of ``UP_ROWS`` output rows reads the upsampled map's rows around it (one halo row on
each side for a 3x3 conv), made from the input rows under them only: the rows' interpolation
by its two weights, then the columns' by ``F.interpolate`` on those rows (with as many rows in
as out, aligned corners leave rows as they are). The conv then runs on all input channels at
once (one product per band, as fast per element as the whole map's conv), the top-k values
are taken from the same band, and the backward pass remakes each band for the weight
gradient and undoes the upsampling band by band.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

#: output rows per band of the lean UpStage (``_UpSplit``): its upsampled input rows (all
#: channels, plus two halo rows) and topk's int64 indices exist for these rows only
UP_ROWS = 32


def _row_weights(rows: int, r0: int, r1: int, device: torch.device,
                 dtype: torch.dtype) -> tuple[int, torch.Tensor]:
    """(first source row s, matrix M): rows r0..r1 of a map of ``rows`` rows upsampled x2 with
    aligned corners (bilinear, weights as upsample_bilinear2d's) are M @ its rows s.. ."""
    scale = (rows - 1) / (2 * rows - 1)
    sources = [(int(math.floor(i * scale)), i * scale) for i in range(r0, r1)]
    first, last = sources[0][0], min(sources[-1][0] + 1, rows - 1)
    matrix = [[0.0] * (last - first + 1) for _ in sources]
    for weights, (low, src) in zip(matrix, sources, strict=True):
        weights[low - first] += 1 - (src - low)
        weights[min(low + 1, rows - 1) - first] += src - low
    return first, torch.tensor(matrix, device=device, dtype=dtype)


def _own_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off (products in their inputs' precision) where autocast exists."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """(B,C,H,W) -> (B,H,W*C): a view of a channels-last map (else a copy)."""
    return x.permute(0, 2, 3, 1).reshape(x.shape[0], x.shape[2], -1)


def _upsampled_rows(x: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """Rows r0..r1 of ``upsample(x)`` (x2, bilinear, aligned corners), channels-last: the
    rows' interpolation as one small product over the channels-last rows, then the columns'."""
    first, matrix = _row_weights(x.shape[2], r0, r1, x.device, x.dtype)
    b, c, _, w = x.shape
    with _own_precision(x.device):  # in x's precision, as upsample
        rows = torch.matmul(matrix, _as_rows(x)[:, first:first + matrix.shape[1]])
    rows = rows.view(b, r1 - r0, w, c).permute(0, 3, 1, 2)
    return F.interpolate(rows, size=(r1 - r0, 2 * w), mode="bilinear", align_corners=True)


def _upsampled_rows_backward(grad: torch.Tensor, grad_x: torch.Tensor, r0: int) -> None:
    """Add into ``grad_x`` (channels-last) the gradient of ``x`` from ``grad``, the gradient
    of ``_upsampled_rows(x, r0, r0 + len(grad rows))``."""
    b, c, n, w2 = grad.shape
    columns = torch.ops.aten.upsample_bilinear2d_backward(
        grad, [n, w2], [b, c, n, w2 // 2], True, None, None)
    first, matrix = _row_weights(grad_x.shape[2], r0, r0 + n, grad.device, grad_x.dtype)
    columns = _as_rows(columns.to(grad_x.dtype))
    with _own_precision(grad.device):
        _as_rows(grad_x)[:, first:first + matrix.shape[1]] += torch.matmul(matrix.t(), columns)


def _band(x: torch.Tensor, r0: int, r1: int, halo: int) -> torch.Tensor:
    """Rows r0 - halo .. r1 + halo of ``upsample(x)``, zero rows beyond the map (the conv's
    zero padding)."""
    rows = 2 * x.shape[2]
    lo, hi = max(r0 - halo, 0), min(r1 + halo, rows)
    up = _upsampled_rows(x, lo, hi)
    if (lo, hi) == (r0 - halo, r1 + halo):
        return up
    return F.pad(up, (0, 0, lo - (r0 - halo), r1 + halo - hi)).contiguous(
        memory_format=torch.channels_last)


def _bands(rows: int) -> list[tuple[int, int]]:
    return [(r0, min(rows, r0 + UP_ROWS)) for r0 in range(0, rows, UP_ROWS)]


def _geometry(conv: nn.Conv2d) -> tuple[int, tuple[int, int]]:
    """(halo rows, padding of a band's conv) of ``conv``, a 3x3-like conv with 'same' rows."""
    halo, columns = int(conv.padding[0]), int(conv.padding[1])
    assert tuple(conv.stride) == (1, 1) and conv.kernel_size[0] == 2 * halo + 1, conv
    return halo, (0, columns)


class _UpSplit(torch.autograd.Function):
    """The shared start of an UpStage: ``up = upsample(x)`` feeds the conv branch's first conv
    and the top-k branch (the ``k`` largest of ``up``'s channels from ``top_from`` on, which
    are the upsampled previous top-k output); returns (conv(up), top-k values).

    Keeps ``x`` and the top-k indices (as bytes when channel numbers fit) for the backward
    pass, which remakes ``up`` band by band for the conv's weight gradient and adds the top-k
    gradient into the band's input gradient before undoing the upsampling.

    ``sorted_top``: the top-k input's channels are sorted (descending) at every pixel, as a
    previous stage's top-k output is, and stay so upsampled (each output pixel is a sum of
    input pixels with weights >= 0, and rounding keeps such sums in order); its ``k``
    largest are then its first ``k`` channels, so neither topk nor its indices are needed.
    (Where values tie, topk may pick other channels of equal value; the tied values are
    zeros passed on from the first stage's ReLU, which gives them no gradient, so the
    gradients are the same.)
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, conv: nn.Conv2d, weight: torch.Tensor,  # noqa: D102
                k: int, top_from: int, sorted_top: bool) -> tuple[torch.Tensor, torch.Tensor]:
        halo, padding = _geometry(conv)
        b, _, h, w = x.shape
        layout = torch.channels_last  # the bands' (_upsampled_rows)
        values = torch.empty(b, k, 2 * h, 2 * w, dtype=x.dtype, device=x.device,
                             memory_format=layout)
        index = None if sorted_top else torch.empty(
            b, k, 2 * h, 2 * w, device=x.device, memory_format=layout,
            dtype=torch.uint8 if x.shape[1] - top_from <= 256 else torch.int32)
        out: torch.Tensor | None = None
        for r0, r1 in _bands(2 * h):
            band = _band(x, r0, r1, halo)
            y = F.conv2d(band, weight, None, 1, padding)
            if out is None:  # under autocast the conv's precision is the output's
                out = torch.empty((b, y.shape[1], 2 * h, 2 * w), dtype=y.dtype,
                                  device=x.device, memory_format=layout)
            out[:, :, r0:r1] = y
            top = band[:, top_from:, halo:halo + r1 - r0]
            if index is None:
                values[:, :, r0:r1] = top[:, :k]
            else:
                values[:, :, r0:r1], index[:, :, r0:r1] = top.topk(k, dim=1)
        ctx.save_for_backward(x, weight, index)
        ctx.conv, ctx.top_from = conv, top_from
        assert out is not None  # x has rows
        return out, values

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_conv: torch.Tensor,  # noqa: D102
                 grad_values: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, index = ctx.saved_tensors
        halo, padding = _geometry(ctx.conv)
        rows, top_from = 2 * x.shape[2], ctx.top_from
        grad_weight = torch.zeros_like(weight)
        # channels-last, so that its rows are a view (_upsampled_rows_backward)
        grad_x = x.new_zeros(x.shape[0], x.shape[2], x.shape[3], x.shape[1]).permute(0, 3, 1, 2)
        low = grad_conv.dtype  # under autocast the forward conv ran in this precision
        grad_conv = grad_conv.contiguous(memory_format=torch.channels_last)
        weight = weight.to(low)
        for r0, r1 in _bands(rows):
            band = _band(x, r0, r1, halo).to(low)
            grad_band, part = torch.ops.aten.convolution_backward(
                grad_conv[:, :, r0:r1], band, weight, None, (1, 1), padding, (1, 1), False,
                [0, 0], 1, [True, True, False])[:2]
            del band
            grad_weight += part
            # the top-k values' gradient into the band's own rows of the top-k input
            top = grad_band[:, top_from:, halo:halo + r1 - r0]
            if index is None:  # sorted_top: the values are the first k channels
                top[:, :grad_values.shape[1]] += grad_values[:, :, r0:r1]
            else:
                top.scatter_add_(1, index[:, :, r0:r1].long(),
                                 grad_values[:, :, r0:r1].to(top.dtype))
            lo, hi = max(r0 - halo, 0), min(r1 + halo, rows)
            _upsampled_rows_backward(grad_band[:, :, lo - (r0 - halo):hi - (r0 - halo)],
                                     grad_x, lo)
        return grad_x, None, grad_weight, None, None, None


def up_split(x: torch.Tensor, conv: nn.Conv2d, k: int, top_from: int,
             sorted_top: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(conv(upsample(x)), top-k values of upsample(x)[:, top_from:]), lean (see _UpSplit)."""
    return _UpSplit.apply(x, conv, conv.weight, k, top_from, sorted_top)
