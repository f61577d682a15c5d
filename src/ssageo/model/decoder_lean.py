"""Autograd functions of the BEV decoder's lean pass (``decoder.py``): the same operators as the
modules, values and gradients included, but each keeps only the conv inputs it cannot cheaply
redo for the backward pass and recomputes normalised activations and upsampled maps there.
"""

from __future__ import annotations

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
    def forward(ctx, x, conv, weight, bias):  # noqa: D102
        act = _norm_relu(x)
        ctx.save_for_backward(x, weight)
        ctx.conv = conv
        return act if conv is None else conv._conv_forward(act, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # noqa: D102
        x, weight = ctx.saved_tensors
        conv = ctx.conv
        with torch.enable_grad():
            x = x.detach().requires_grad_()
            act = _norm_relu(x)
        conv_grads = [None, None]
        if conv is not None:
            bias_sizes = None if conv.bias is None else [conv.bias.shape[0]]
            grad, *conv_grads = torch.ops.aten.convolution_backward(
                grad, act, weight, bias_sizes, *_geometry(conv),
                [True, True, conv.bias is not None])
        return torch.autograd.grad(act, x, grad)[0], None, *conv_grads


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
    adds the top-k gradient into the conv's input gradient before undoing the upsampling.
    """

    @staticmethod
    def forward(ctx, x, conv, weight, k, top_from):  # noqa: D102
        up = upsample(x)
        values, index = up[:, top_from:].topk(k, dim=1)
        small = up.shape[1] - top_from <= 256
        ctx.save_for_backward(x, weight, index.to(torch.uint8 if small else torch.int32))
        ctx.conv, ctx.top_from = conv, top_from
        return conv._conv_forward(up, weight, None), values

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_conv, grad_values):  # noqa: D102
        x, weight, index = ctx.saved_tensors
        conv, (b, c, h, w) = ctx.conv, x.shape
        grad_weight = torch.ops.aten.convolution_backward(
            grad_conv, upsample(x), weight, None, *_geometry(conv), [False, True, False])[1]
        grad_up = torch.ops.aten.convolution_backward(  # up's values are not read here
            grad_conv, grad_conv.new_empty(1).expand(b, c, 2 * h, 2 * w), weight, None,
            *_geometry(conv), [True, False, False])[0]
        grad_up[:, ctx.top_from:].scatter_add_(1, index.long(), grad_values)
        grad_x = torch.ops.aten.upsample_bilinear2d_backward(
            grad_up, [2 * h, 2 * w], [b, c, h, w], True, None, None)
        return grad_x, None, grad_weight, None, None


def up_split(x: torch.Tensor, conv: nn.Conv2d, k: int,
             top_from: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(conv(upsample(x)), top-k values of upsample(x)[:, top_from:]), lean (see _UpSplit)."""
    return _UpSplit.apply(x, conv, conv.weight, k, top_from)
