"""The BEV head's multi-scale decoder (docs/METHOD.md section 2), (B,C,N,N) -> (B,K,8N,8N), built as
the SSA authors' ``MLSP`` (``model_training/sample4geo/BEV_Layout.py``):

- two residual blocks C -> C/2 -> C/2 (3x3 convs with bias, InstanceNorm without affine
  parameters); the first adds ``ReLU(IN(conv1x1 x))`` to ``ReLU(IN(conv(ReLU(IN(conv x)))))``,
  the second ``x`` to ``IN(conv(ReLU(IN(conv x))))``; a ReLU after both;
- three x2 stages, bilinear with ``align_corners=True``. Stage i concatenates a DoubleConv of
  the upsampled input (the previous concatenation) with a parameter-free branch: the k_i
  largest channel values, per pixel and sorted, of the upsampled *previous top-k output* (the
  residual blocks' output for the first stage), so the top-k branch is a chain of its own;
- a DoubleConv 2*k_3 -> k_3 and a 1x1 classifier (with bias) k_3 -> K.

Widths: the reference's fractions of C, rounded down and at least 1: C/2 after the residual
blocks, k_1, k_2, k_3 = C/4, C/8, C/16 (each stage outputs 2*k_i channels). At C=512 this is the
reference exactly (256; 256, 128, 64 channels out of the stages; 3,781,954 parameters at K=2),
and at any C divisible by 16 it is the reference built with ``backbone_channels=C``; smaller
presets (synth-cpu's C=256) get the same shape at proportionally smaller widths.

Its lean pass (``lean=True``, at large sizes) computes the same values and gradients keeping far
fewer activations: checkpointed parts, the full-resolution part one sample at a time, and layers
that store only conv outputs and recompute the rest in their backward step (``decoder_lean``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ssageo.model.decoder_lean import norm_relu_conv, upsample
from ssageo.model.decoder_up import up_split


def decoder_widths(channels: int) -> tuple[int, tuple[int, int, int]]:
    """(residual width, top-k widths of the three stages) for a C-channel input (see above)."""
    return max(1, channels // 2), (max(1, channels // 4), max(1, channels // 8),
                                   max(1, channels // 16))


class DoubleConv(nn.Sequential):
    """Two (3x3 conv without bias, InstanceNorm, ReLU)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.InstanceNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.InstanceNorm2d(c_out),
            nn.ReLU(inplace=True),
        )

    def lean(self, c1: torch.Tensor, head: nn.Conv2d | None = None,
             head_weight: torch.Tensor | None = None) -> torch.Tensor:
        """The block after its first conv (output ``c1``), then ``head`` if given (with
        ``head_weight``, default its own), keeping only the two conv outputs for the backward
        pass."""
        return norm_relu_conv(norm_relu_conv(c1, self[3]), head, head_weight)


class ResidualBlock(nn.Module):
    """``conv3x3-IN-ReLU-conv3x3-IN`` (3x3 convs with bias) plus a shortcut, no ReLU after the sum.

    Same widths: ``x + body(x)``. Projected (c_in != c_out): the body ends with a ReLU too and
    the shortcut is ``ReLU(IN(conv1x1 x))`` (1x1 conv with bias).
    """

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.projected = c_in != c_out
        body = [nn.Conv2d(c_in, c_out, 3, padding=1), nn.InstanceNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.Conv2d(c_out, c_out, 3, padding=1), nn.InstanceNorm2d(c_out)]
        self.body = nn.Sequential(*body, *([nn.ReLU(inplace=True)] if self.projected else []))
        self.shortcut = (nn.Sequential(nn.Conv2d(c_in, c_out, 1), nn.InstanceNorm2d(c_out),
                                       nn.ReLU(inplace=True))
                         if self.projected else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.body(x)

    def lean(self, x: torch.Tensor) -> torch.Tensor:
        """forward, keeping the input and the conv outputs only."""
        c2 = norm_relu_conv(self.body[0](x), self.body[3])
        if not self.projected:
            return x + norm_relu_conv(c2, relu=False)  # in c2's (channels-last) layout
        return norm_relu_conv(self.shortcut[0](x)) + norm_relu_conv(c2)


class UpStage(nn.Module):
    """x2 upsampling: a DoubleConv of the upsampled input beside the top-k branch.

    ``forward(x, top)`` -> (cat[DoubleConv(up(x)), topk], topk) with ``topk`` the ``k`` largest
    channel values (sorted) of ``up(top)``. The previous stage's output ends with its top-k
    output, so ``top`` is ``x``'s last channels from ``top_from`` on (the first stage:
    ``top = x``, ``top_from = 0``); the lean pass relies on that. ``sorted_top``: ``top`` is a
    previous stage's top-k output (channels sorted at every pixel): the lean pass then takes its
    first ``k`` channels (``decoder_up._UpSplit``).
    """

    def __init__(self, c_in: int, k: int, top_from: int, sorted_top: bool = False) -> None:
        super().__init__()
        self.k, self.top_from, self.sorted_top = k, top_from, sorted_top
        self.conv = DoubleConv(c_in, k)
        self.out_channels = 2 * k

    def forward(self, x: torch.Tensor, top: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values = upsample(top).topk(self.k, dim=1).values
        return torch.cat([self.conv(upsample(x)), values], dim=1), values

    def lean(self, x: torch.Tensor) -> torch.Tensor:
        """forward's first output, keeping the input, the top-k indices and the conv outputs."""
        c1, values = up_split(x, self.conv[0], self.k, self.top_from, self.sorted_top)
        return torch.cat([self.conv.lean(c1), values], dim=1)


class BEVDecoder(nn.Module):
    """(B,C,N,N) -> (B,K,8N,8N): two residual blocks, three UpStages, DoubleConv, 1x1 classifier.

    ``lean`` (when gradients are recorded) runs the same layers under activation
    checkpointing, one sample at a time (InstanceNorm is per sample and keeps no running
    statistics, so values and gradients are unchanged), and inside a sample the low-resolution
    part (residual blocks, first two UpStages) checkpointed again, so that the 8N x 8N part
    (last UpStage, DoubleConv, classifier) runs its backward step beside the sample's 4N x 4N
    map only; the last UpStage is checkpointed within that part too. Between the forward and
    the backward pass only the decoder input is kept. When a part is recomputed, its layers
    keep only conv outputs, block inputs and the first stage's top-k indices; normalised
    activations are recomputed once more in their backward step, in row bands from InstanceNorm
    statistics kept from the forward step (``decoder_lean``), the UpStages' upsampled maps in
    row bands too (``decoder_up``; later stages take the first k channels of their sorted
    top-k input), the refining DoubleConv's first conv runs as two halves (no 2k-channel
    concatenation at 8N x 8N), and every map is channels-last (oneDNN's convolutions then copy
    nothing). Below
    ``lean_from`` output pixels per batch the plain pass runs (same maths, faster there,
    little memory).
    """

    def __init__(self, channels: int, classes: int, lean: bool = True,
                 lean_from: int = 1 << 17) -> None:
        super().__init__()
        self.lean = lean
        self.lean_from = lean_from
        half, widths = decoder_widths(channels)
        self.blocks = nn.Sequential(ResidualBlock(channels, half), ResidualBlock(half, half))
        stages, c_in, top = [], half, half
        for k in widths:
            stages.append(UpStage(c_in, k, top_from=c_in - top, sorted_top=bool(stages)))
            c_in, top = stages[-1].out_channels, k
        self.up = nn.ModuleList(stages)
        self.refine = DoubleConv(c_in, widths[-1])
        self.classifier = nn.Conv2d(widths[-1], classes, 1)

    def runs_lean(self, shape: Sequence[int]) -> bool:
        """Whether the lean pass runs for an input of ``shape`` (B,C,N,N)."""
        pixels = shape[0] * (8 * shape[-2]) * (8 * shape[-1])
        return self.lean and torch.is_grad_enabled() and pixels >= self.lean_from

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.runs_lean(x.shape):
            x = top = F.relu(self.blocks(x))
            for stage in self.up:
                x, top = stage(x, top)
            return self.classifier(self.refine(x))
        # one checkpoint per sample over the whole decoder: between the passes only the
        # decoder input is kept (a batch-wide low-resolution part would keep every sample's
        # 4N x 4N map until its backward step). split, not slices: each slice's backward would
        # allocate a zero gradient of the whole batch; split's backward joins them once
        # channels-last maps: oneDNN's convolutions read and write them as they are, where a
        # contiguous map is copied into its blocked layout and back (buffers as large as the
        # maps, unseen by autograd, and time)
        return torch.cat([checkpoint(self._lean_sample,
                                     part.contiguous(memory_format=torch.channels_last),
                                     use_reentrant=False)
                          for part in x.split(1)]).contiguous()

    def _lean_sample(self, x: torch.Tensor) -> torch.Tensor:
        return self._lean_top(checkpoint(self._lean_bottom, x, use_reentrant=False))

    def _lean_bottom(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block.lean(x)
        x = F.relu(x)
        for stage in self.up[:-1]:
            x = stage.lean(x)
        return x

    def _lean_top(self, x: torch.Tensor) -> torch.Tensor:
        # checkpointed once more: the refining DoubleConv's backward step runs without the last
        # UpStage's conv outputs, which are recomputed for that stage's own backward step
        x = checkpoint(self._lean_last_stage, x, use_reentrant=False)
        return self.refine.lean(x, self.classifier)

    def _lean_last_stage(self, x: torch.Tensor) -> torch.Tensor:
        """The last UpStage and the refining DoubleConv's first conv. That conv reads the
        concatenation [DoubleConv output, top-k values]: it runs as the sum of its two halves,
        so neither the concatenation (2k channels at 8N x 8N) nor its gradient is ever made,
        and the DoubleConv's output is recomputed from its conv output in the backward step."""
        stage, first = self.up[-1], self.refine[0]
        c1, values = up_split(x, stage.conv[0], stage.k, stage.top_from, stage.sorted_top)
        k = stage.k
        # in place: no third 8N x 8N map (fresh pages cost time)
        return stage.conv.lean(c1, first, first.weight[:, :k]).add_(
            F.conv2d(values, first.weight[:, k:], None, first.stride, first.padding))
