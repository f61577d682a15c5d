"""Autograd functions of the BEV decoder's lean pass (``decoder.py``): the same operators as the
modules, values and gradients included, but each keeps only the conv inputs it cannot cheaply
redo for the backward pass and recomputes normalised activations and upsampled maps there.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

#: InstanceNorm2d's default eps, the decoder's norms' (none of them has affine parameters)
NORM_EPS = 1e-5


def upsample(x: torch.Tensor) -> torch.Tensor:
    """Bilinear x2 with aligned corners, as the reference decoder."""
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)


def _norm_relu(x: torch.Tensor) -> torch.Tensor:
    return F.relu(F.instance_norm(x, eps=NORM_EPS), inplace=True)


def _geometry(conv: nn.Conv2d) -> tuple:
    """stride, padding, dilation, transposed, output_padding, groups (convolution_backward)."""
    return conv.stride, conv.padding, conv.dilation, False, [0, 0], conv.groups


class _NormReLUConv(torch.autograd.Function):
    """``conv(relu(instance_norm(x)))``, or ``relu(instance_norm(x))`` without a conv, keeping
    only ``x`` for the backward pass: the normalised activation (as large as ``x``, cheap to
    redo) is recomputed there instead of stored.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, conv: nn.Conv2d | None,  # noqa: D102
                weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
        act = _norm_relu(x)
        ctx.save_for_backward(x, weight)
        ctx.conv = conv
        return act if conv is None or weight is None else conv._conv_forward(act, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: D102
        x, weight = ctx.saved_tensors
        conv = ctx.conv
        with torch.enable_grad():
            x = x.detach().requires_grad_()
            act = _norm_relu(x)
        conv_grads = [None, None]
        if conv is not None:
            bias_sizes = None if conv.bias is None else [conv.bias.shape[0]]
            # under autocast the forward conv ran in the gradient's (low) precision
            grad, *conv_grads = torch.ops.aten.convolution_backward(
                grad, act.to(grad.dtype), weight.to(grad.dtype), bias_sizes, *_geometry(conv),
                [True, True, conv.bias is not None])
        return torch.autograd.grad(act, x, grad.to(act.dtype))[0], None, *conv_grads


def norm_relu_conv(x: torch.Tensor, conv: nn.Conv2d | None = None) -> torch.Tensor:
    """``conv(relu(instance_norm(x)))`` (``relu(instance_norm(x))`` without ``conv``), lean."""
    weight, bias = (None, None) if conv is None else (conv.weight, conv.bias)
    return _NormReLUConv.apply(x, conv, weight, bias)


class _UpSplit(torch.autograd.Function):
    """The shared start of an UpStage: ``up = upsample(x)`` feeds the conv branch's first conv
    and the top-k branch (the ``k`` largest of ``up``'s channels from ``top_from`` on, which
    are the upsampled previous top-k output); returns (conv(up), top-k values).

    Keeps ``x`` and the top-k indices (as bytes when channel numbers fit) for the backward
    pass, which recomputes ``up`` (4x the size of ``x``) for the conv's weight gradient and
    adds the top-k gradient into the conv's input gradient before undoing the upsampling, a
    few channels at a time.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, conv: nn.Conv2d, weight: torch.Tensor,  # noqa: D102
                k: int, top_from: int) -> tuple[torch.Tensor, torch.Tensor]:
        # the conv as a sum over input-channel groups: only the top-k input is upsampled whole
        top = upsample(x[:, top_from:])
        values, index = top.topk(k, dim=1)
        out: torch.Tensor | None = None
        for c0 in range(0, x.shape[1], UP_CHANNELS):
            c1 = min(x.shape[1], c0 + UP_CHANNELS)
            part = (upsample(x[:, c0:c1]) if c1 <= top_from
                    else top[:, c0 - top_from:c1 - top_from] if c0 >= top_from
                    else upsample(x[:, c0:c1]))
            y = conv._conv_forward(part, weight[:, c0:c1], None)
            out = y if out is None else out.add_(y)
        small = x.shape[1] - top_from <= 256
        ctx.save_for_backward(x, weight, index.to(torch.uint8 if small else torch.int32))
        ctx.conv, ctx.top_from = conv, top_from
        assert out is not None  # x has channels
        return out, values

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_conv: torch.Tensor,  # noqa: D102
                 grad_values: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, index = ctx.saved_tensors
        conv, (b, c, h, w) = ctx.conv, x.shape
        grad_x, grad_weight = torch.empty_like(x), torch.empty_like(weight)
        # a few input channels at a time: each channel's upsampled map, weight gradient and
        # input gradient involve that channel only, so none is ever made for all channels
        for c0 in range(0, c, UP_CHANNELS):
            c1 = min(c, c0 + UP_CHANNELS)
            low = grad_conv.dtype  # under autocast the forward conv ran in this precision
            grad_up, grad_weight[:, c0:c1] = torch.ops.aten.convolution_backward(
                grad_conv, upsample(x[:, c0:c1]).to(low), weight[:, c0:c1].to(low).contiguous(),
                None, *_geometry(conv), [True, True, False])[:2]
            if c1 > ctx.top_from:
                _scatter_top(grad_up, index, grad_values, c0 - ctx.top_from)
            grad_x[:, c0:c1] = torch.ops.aten.upsample_bilinear2d_backward(
                grad_up, [2 * h, 2 * w], [b, c1 - c0, h, w], True, None, None)
        return grad_x, None, grad_weight, None, None


#: input channels per step of the UpStage's backward pass (``_UpSplit``)
UP_CHANNELS = 16


def _scatter_top(grad_up: torch.Tensor, index: torch.Tensor, grad_values: torch.Tensor,
                 first: int) -> None:
    """Add the top-k values' gradient into ``grad_up``, the gradient of channels ``first`` ..
    of the top-k input (negative: channels before it); a few rows at a time, so the int64
    index (scatter_add's) stays small."""
    span = grad_up.shape[1]
    for r0 in range(0, index.shape[2], 32):
        rows = slice(r0, r0 + 32)
        idx = index[:, :, rows].long() - first
        inside = (idx >= 0) & (idx < span)
        grad_up[:, :, rows].scatter_add_(1, idx.clamp_(0, span - 1),
                                         (grad_values[:, :, rows] * inside).to(grad_up.dtype))


def up_split(x: torch.Tensor, conv: nn.Conv2d, k: int,
             top_from: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(conv(upsample(x)), top-k values of upsample(x)[:, top_from:]), lean (see _UpSplit)."""
    return _UpSplit.apply(x, conv, conv.weight, k, top_from)
