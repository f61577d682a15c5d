"""Autograd functions of the BEV decoder's lean pass (``decoder.py``): the same operators as the
modules, values and gradients included, but each keeps only the conv inputs it cannot cheaply
redo for the backward pass and recomputes normalised activations there (the UpStages' lean
start, which recomputes upsampled maps, is in ``decoder_up.py``).
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


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """``x``'s memory format: channels-last (the lean decoder's, see ``decoder.py``) or not."""
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last and not x.is_contiguous() else \
        torch.contiguous_format


def _norm_relu(x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
               relu: bool = True) -> torch.Tensor:
    # not F.instance_norm: it returns a contiguous map whatever the input's memory format, and
    # (PyTorch 2.13, CPU) its gradient is wrong for a channels-last input whose incoming
    # gradient is channels-last too (tests/test_model_bev_lean.py)
    xhat = (x - mean).mul_(rstd)
    return xhat.relu_() if relu else xhat


def _geometry(conv: nn.Conv2d) -> tuple:
    """stride, padding, dilation, transposed, output_padding, groups (convolution_backward)."""
    return conv.stride, conv.padding, conv.dilation, False, [0, 0], conv.groups


class _NormReLUConv(torch.autograd.Function):
    """``conv(relu(instance_norm(x)))``, or ``relu(instance_norm(x))`` without a conv (without
    ``relu``: ``instance_norm(x)``), keeping only ``x`` for the backward pass: the normalised
    activation (as large as ``x``, cheap to redo) is recomputed there instead of stored.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, conv: nn.Conv2d | None,  # noqa: D102
                weight: torch.Tensor | None, bias: torch.Tensor | None,
                relu: bool = True) -> torch.Tensor:
        # the norm's statistics (two numbers per channel) are kept for the backward step
        mean, rstd = _statistics(x)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.conv, ctx.relu = conv, relu
        if conv is None or weight is None:
            return _norm_relu(x, mean, rstd, relu)
        if not _banded(conv):
            return conv._conv_forward(_norm_relu(x, mean, rstd), weight, bias)
        # a few output rows at a time from the activation's rows around them: the activation
        # is never made for the whole map
        out: torch.Tensor | None = None
        for r0, r1 in _bands(x.shape[2]):
            band = _act_band(x, mean, rstd, r0, r1, _pads(conv)[0], x.dtype)
            y = F.conv2d(band, weight, bias, 1, (0, _pads(conv)[1]))
            if out is None:  # under autocast the conv's precision is the output's
                out = torch.empty((x.shape[0], y.shape[1], *x.shape[2:]), dtype=y.dtype,
                                  device=x.device, memory_format=memory_format(x))
            out[:, :, r0:r1] = y
        assert out is not None  # x has rows
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: D102
        x, weight, mean, rstd = ctx.saved_tensors
        conv = ctx.conv
        conv_grads: list[torch.Tensor | None] = [None, None]
        if conv is not None:
            # the incoming gradient in the map's layout (the head's output is contiguous)
            grad = grad.contiguous(memory_format=memory_format(x))
            bias_sizes = None if conv.bias is None else [conv.bias.shape[0]]
            # under autocast the forward conv ran in the gradient's (low) precision
            low = weight.to(grad.dtype)
            # the weight's gradient from the activation, which then goes; the input's gradient
            # (the conv input's values are not read: x stands in for its shape and layout);
            # the norm's backward step in row bands: at most the incoming gradient and one
            # more full-size map at once
            if _banded(conv):  # the weight's gradient as a sum over row bands
                conv_grads = _banded_weight_grad(x, mean, rstd, grad, low, conv)
            else:
                act = (x - mean).mul_(rstd).relu_().to(grad.dtype)
                conv_grads = torch.ops.aten.convolution_backward(
                    grad, act, low, bias_sizes, *_geometry(conv),
                    [False, True, conv.bias is not None])[1:]
                del act
            grad = torch.ops.aten.convolution_backward(
                grad, x.to(grad.dtype), low, None, *_geometry(conv), [True, False, False])[0]
        return (_norm_relu_backward(x, mean, rstd, grad, owned=conv is not None, relu=ctx.relu),
                None, *conv_grads, None)


#: output rows per band of a lean norm-relu-conv (``_NormReLUConv``)
CONV_ROWS = 32


def _pads(conv: nn.Conv2d) -> tuple[int, int]:
    """``conv``'s (rows, columns) zero padding; (-1, -1) for a padding given by name."""
    pad = conv.padding
    return (-1, -1) if isinstance(pad, str) else (int(pad[0]), int(pad[1]))


def _banded(conv: nn.Conv2d) -> bool:
    """Whether ``conv`` runs in row bands: stride 1, no dilation, one group, 'same' rows."""
    return (tuple(conv.stride) == (1, 1) and tuple(conv.dilation) == (1, 1)
            and conv.groups == 1 and conv.kernel_size[0] == 2 * _pads(conv)[0] + 1)


def _bands(rows: int) -> list[tuple[int, int]]:
    return [(r0, min(rows, r0 + CONV_ROWS)) for r0 in range(0, rows, CONV_ROWS)]


def _act_band(x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, r0: int, r1: int,
              halo: int, dtype: torch.dtype) -> torch.Tensor:
    """relu(instance_norm(x)) on rows r0 - halo .. r1 + halo, zero rows beyond the map (the
    conv's zero padding), in ``x``'s layout and ``dtype``."""
    lo, hi = max(r0 - halo, 0), min(r1 + halo, x.shape[2])
    band = torch.empty((x.shape[0], x.shape[1], r1 - r0 + 2 * halo, x.shape[3]), dtype=dtype,
                       device=x.device, memory_format=memory_format(x))
    # written in place (no temporary, no copy); only the rows beyond the map are zeroed
    start, stop = lo - r0 + halo, hi - r0 + halo
    torch.sub(x[:, :, lo:hi], mean, out=band[:, :, start:stop]).mul_(rstd).relu_()
    band[:, :, :start].zero_()
    band[:, :, stop:].zero_()
    return band


def _banded_weight_grad(x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                        grad: torch.Tensor, weight: torch.Tensor,
                        conv: nn.Conv2d) -> list[torch.Tensor | None]:
    """[weight gradient, bias gradient] of ``conv`` over relu(instance_norm(x)), summed over
    row bands of the output (each band's activation rows made on their own)."""
    total: list[torch.Tensor | None] = [None, None]
    bias = conv.bias is not None
    for r0, r1 in _bands(x.shape[2]):
        band = _act_band(x, mean, rstd, r0, r1, _pads(conv)[0], grad.dtype)
        part = torch.ops.aten.convolution_backward(
            grad[:, :, r0:r1], band, weight, [weight.shape[0]] if bias else None, (1, 1),
            (0, _pads(conv)[1]), (1, 1), False, [0, 0], 1, [False, True, bias])[1:]
        total = [p if t is None else t.add_(p) if p is not None else None
                 for t, p in zip(total, part, strict=True)]
    return total


def _statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, 1/std) per sample and channel, as F.instance_norm's (biased variance, NORM_EPS):
    the mean, then the variance as the mean square deviation from it (two passes, as
    precise as ``torch.var_mean``), the deviations a few rows at a time. ``torch.var_mean``
    (a Welford reduction) takes 10-20x longer on these maps (benchmarks/RESULTS.md); in low
    precision the sums run in float32."""
    acc = torch.promote_types(x.dtype, torch.float32)
    pixels = x.shape[2] * x.shape[3]
    mean = x.sum((2, 3), keepdim=True, dtype=acc).div_(pixels)
    var = torch.zeros_like(mean)
    for r0 in range(0, x.shape[2], NORM_ROWS):
        var += (x[:, :, r0:r0 + NORM_ROWS] - mean).square_().sum((2, 3), keepdim=True)
    return mean.to(x.dtype), var.div_(pixels).add_(NORM_EPS).rsqrt_().to(x.dtype)


#: image rows per step of the norm's backward pass (``_norm_relu_backward``)
NORM_ROWS = 32


def _norm_relu_backward(x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                        grad: torch.Tensor, owned: bool, relu: bool = True) -> torch.Tensor:
    """Gradient of relu(instance_norm(x)) w.r.t. ``x`` (without ``relu``: of instance_norm(x))
    from the statistics ``mean``, ``rstd``: ``rstd * (g - mean(g) - xhat * mean(g * xhat))``
    with ``g = grad * (xhat > 0)``, in place in ``grad`` when the caller ``owned`` it (else in
    one new tensor). The normalised values ``xhat`` are made a few rows at a time, twice (for
    the per-channel sums, then for the result), so the gradient is the only full-size map
    (autograd's batch-norm backward makes 3-4 more)."""
    g = grad.to(x.dtype, copy=not owned)
    b, c, h, w = x.shape
    sum_g = g.new_zeros(b, c)
    sum_gx = g.new_zeros(b, c)
    bands = [slice(r0, r0 + NORM_ROWS) for r0 in range(0, h, NORM_ROWS)]
    for rows in bands:
        xhat, part = (x[:, :, rows] - mean).mul_(rstd), g[:, :, rows]
        if relu:
            part.mul_(xhat > 0)
        sum_g += part.sum((2, 3))
        sum_gx += xhat.mul_(part).sum((2, 3))
    mean_g, mean_gx = (sum_g / (h * w)).view(b, c, 1, 1), (sum_gx / (h * w)).view(b, c, 1, 1)
    for rows in bands:
        xhat = (x[:, :, rows] - mean).mul_(rstd)
        g[:, :, rows].sub_(mean_g).addcmul_(xhat, mean_gx, value=-1).mul_(rstd)
    return g


def norm_relu_conv(x: torch.Tensor, conv: nn.Conv2d | None = None,
                   weight: torch.Tensor | None = None, relu: bool = True) -> torch.Tensor:
    """``conv(relu(instance_norm(x)))`` (``relu(instance_norm(x))`` without ``conv``), lean;
    ``weight``: the conv's weight or a part of it (input channels), default all of it;
    ``relu=False`` (no conv): ``instance_norm(x)``."""
    if conv is not None and weight is None:
        weight = conv.weight
    return _NormReLUConv.apply(x, conv, weight, None if conv is None else conv.bias, relu)
