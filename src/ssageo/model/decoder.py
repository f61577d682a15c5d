"""The BEV head's multi-scale decoder (METHOD.md section 2): two residual blocks, three x2
stages (a DoubleConv branch beside a parameter-free bilinear + channel top-k branch), a
DoubleConv and a 1x1 classifier, (B,C,N,N) -> (B,K,8N,8N).

Its lean pass (``lean=True``, at large sizes) computes the same values and gradients keeping
far fewer activations: checkpointed parts, the full-resolution part one sample at a time, and
layers that store only conv outputs and recompute the rest in their backward step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint


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
