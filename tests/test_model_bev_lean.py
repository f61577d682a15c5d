"""The BEV head's lean pass, second part: the projection fused with the polar -> Cartesian
resampling (``model/polar_lean.py``) and the channels-last decoder (tests/test_model_bev.py has
the rest)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ssageo.model.bev import BEVHead, PolarProjection, polar_sampling_grid, polar_to_cartesian
from ssageo.model.decoder import BEVDecoder, ResidualBlock
from ssageo.model.polar_lean import LeanPolar, Resampler


class _Ops(TorchDispatchMode):
    """Records every aten operator's name, inputs and outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, tuple, object]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        self.calls.append((func.overloadpacket.__name__, args, out))
        return out


def _tensors(value: object) -> list[torch.Tensor]:
    items = value if isinstance(value, (tuple, list)) else [value]
    return [t for t in items if isinstance(t, torch.Tensor)]


# fov 360: wrap-around columns; 90: edge columns repeated. chunk 3 of 7 channels: 3, 3, 1
@pytest.mark.parametrize("fov, chunk_elements", [(360.0, 3 * 2 * 5 * 4 * 9), (90.0, 1)])
def test_fused_projection_and_resampling_match_the_two_steps_in_float64(fov, chunk_elements):
    torch.manual_seed(0)
    projection = PolarProjection(7, 5, chunk_elements=chunk_elements, lean_from=0).double()
    features = torch.randn(2, 7, 4, 9, dtype=torch.float64)
    target = torch.randn(2, 7, 6, 6, dtype=torch.float64)
    results = []
    for fused in (True, False):
        x = features.clone().requires_grad_()
        projection.zero_grad()
        if fused:
            resample = Resampler(polar_sampling_grid(6, 9, fov=fov),
                                 torch.arange(-1, 10) % 9 if fov >= 360 else
                                 torch.arange(-1, 10).clamp(0, 8), 5)
            out = projection(x, resample)
        else:
            out = polar_to_cartesian(projection(x), 6, fov=fov)
        (out * target).sum().backward()
        results.append((out, x.grad, projection.depth.weight.grad))
    assert results[0][0].shape == (2, 7, 6, 6)
    for a, b in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_fused_projection_passes_gradcheck_in_float64():
    torch.manual_seed(0)
    weight = torch.randn(3 * 4, 3, 1, 1, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(3 * 4, dtype=torch.float64)
    x = torch.randn(1, 3, 3, 5, dtype=torch.float64, requires_grad=True)
    resample = Resampler(polar_sampling_grid(4, 5), torch.arange(-1, 6) % 5, 4)
    assert torch.autograd.gradcheck(
        lambda f, w: LeanPolar.apply(f, w, bias, 4, 2, resample), (x, weight), fast_mode=True)


def test_lean_head_never_makes_the_whole_polar_map_or_its_gradient():
    # primes: (B,C,D,W) = (2,13,7,11) shares its size with no other tensor of the pass
    torch.manual_seed(0)
    head = BEVHead(13, depth_bins=7, grid_size=5, classes=2)
    head.projection.lean_from = head.decoder.lean_from = 0
    head.projection.chunk_elements = 4 * 2 * 7 * 3 * 11  # 4 channels a chunk
    x = torch.randn(2, 13, 3, 11, requires_grad=True)
    with _Ops() as ops:
        head(x).sum().backward()
    sizes = {t.numel() for _, _, out in ops.calls for t in _tensors(out)}
    assert 2 * 4 * 7 * 11 in sizes  # a chunk's polar map is made
    assert not sizes & {2 * 13 * 7 * 11, 2 * 13 * 7 * 13}  # never all channels, padded or not
    plain = copy.deepcopy(head)
    plain.projection.lean = plain.decoder.lean = False
    with _Ops() as ops:
        plain(x).sum().backward()
    assert 2 * 13 * 7 * 11 in {t.numel() for _, _, out in ops.calls for t in _tensors(out)}


def test_lean_decoder_convolves_channels_last_maps_and_returns_a_contiguous_one():
    # oneDNN reads and writes channels-last maps as they are; a contiguous (NCHW) map is
    # copied into its blocked layout and back, buffers as large as the maps
    torch.manual_seed(0)
    decoder = BEVDecoder(32, 2, lean=True, lean_from=0)
    x = torch.randn(2, 32, 6, 6, requires_grad=True)
    with _Ops() as ops:
        logits = decoder(x)
        logits.sum().backward()
    assert logits.is_contiguous()
    maps = [args[0] for name, args, _ in ops.calls
            if name in ("convolution", "convolution_backward")]
    assert len(maps) > 20
    for m in maps:
        assert m.is_contiguous(memory_format=torch.channels_last), m.shape


# row bands of the backward step: 2 (a partial last band of 5 rows), one band; relu or not;
# contiguous or channels-last maps
@pytest.mark.parametrize("owned, rows, relu, channels_last",
                         [(False, 2, True, False), (True, 32, True, True),
                          (True, 2, False, True), (False, 1, False, False)])
def test_norm_relu_backward_formula_equals_autograd_in_float64(owned, rows, relu,
                                                               channels_last, monkeypatch):
    from ssageo.model import decoder_lean
    from ssageo.model.decoder_lean import _norm_relu_backward, _statistics

    monkeypatch.setattr(decoder_lean, "NORM_ROWS", rows)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 6, 5, 7, dtype=torch.float64)[:, 1::2]  # a strided view
    y = torch.nn.functional.instance_norm(x)
    (expected,) = torch.autograd.grad(torch.relu(y) if relu else y, x, grad)
    kept = grad.clone()
    data = x.detach().contiguous(memory_format=torch.channels_last) if channels_last \
        else x.detach()
    mean, rstd = _statistics(data)
    got = _norm_relu_backward(data, mean, rstd, grad.contiguous() if owned else grad,
                              owned, relu)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(grad, kept)  # a gradient it does not own is left as it was


def test_lean_residual_block_gradient_is_right_on_channels_last_maps():
    # PyTorch 2.13 (CPU): instance_norm's gradient is wrong for a channels-last input whose
    # incoming gradient is channels-last too (x + instance_norm(x), loss x^2: off by ~10);
    # the lean layers use their own norm (decoder_lean._NormReLUConv)
    torch.manual_seed(0)
    block = ResidualBlock(4, 4).double()
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    cl = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    plain = x.clone().requires_grad_()
    (lean,) = torch.autograd.grad(block.lean(cl).square().sum(), cl)
    (expected,) = torch.autograd.grad(block(plain).square().sum(), plain)
    torch.testing.assert_close(lean, expected, rtol=1e-9, atol=1e-9)


def _lean_and_plain(channels: int, batch: int, dtype: torch.dtype) -> list[list[torch.Tensor]]:
    """[logits, input gradient, conv weight gradients] of a lean decoder and its plain copy."""
    torch.manual_seed(0)
    lean = BEVDecoder(channels, 2, lean=True, lean_from=0).to(dtype)
    plain = copy.deepcopy(lean)
    plain.lean = False
    features = torch.randn(batch, channels, 6, 6, dtype=dtype)
    target = torch.randn(batch, 2, 48, 48, dtype=dtype)
    results = []
    for decoder in (lean, plain):
        x = features.clone().requires_grad_()
        logits = decoder(x)
        (logits * target).sum().backward()
        # conv weights only: the residual convs' biases cancel in the InstanceNorm after them
        # (their gradients are rounding noise in both passes)
        convs = [m.weight.grad for m in decoder.modules() if isinstance(m, torch.nn.Conv2d)]
        results.append([logits, x.grad, *convs])
    return results


@pytest.mark.parametrize("channels", [32, 40])  # 40: widths 20, 10, 5, 2 (rounded down)
def test_lean_decoder_matches_the_plain_one_in_float32(channels):
    lean, plain = _lean_and_plain(channels, 2, torch.float32)
    for a, b in zip(lean, plain, strict=True):
        scale = b.abs().max()  # weight gradients sum ~10^4 terms: compare at their scale
        torch.testing.assert_close(a / scale, b / scale, rtol=1e-5, atol=1e-5)


# row bands of the lean norm-relu-convs: one row (every band an edge or a halo), 5 (a partial
# last band at every resolution of this decoder: 6, 12, 24, 48 rows)
@pytest.mark.parametrize("rows", [1, 5])
def test_lean_decoder_in_row_bands_matches_the_plain_one_in_float64(rows, monkeypatch):
    from ssageo.model import decoder_lean

    monkeypatch.setattr(decoder_lean, "CONV_ROWS", rows)
    lean, plain = _lean_and_plain(16, 1, torch.float64)
    for a, b in zip(lean, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("rows, channels_last", [(2, True), (32, False)])
def test_norm_statistics_match_var_mean_taken_in_row_bands_in_float64(rows, channels_last,
                                                                     monkeypatch):
    from ssageo.model import decoder_lean
    from ssageo.model.decoder_lean import NORM_EPS, _statistics

    monkeypatch.setattr(decoder_lean, "NORM_ROWS", rows)  # 2: a partial last band of 1 row
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64) * 3 + 10
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    var, mean = torch.var_mean(x, dim=(2, 3), correction=0, keepdim=True)
    with _Ops() as ops:
        got_mean, got_rstd = _statistics(x)
    torch.testing.assert_close(got_mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_rstd, (var + NORM_EPS).rsqrt(), rtol=1e-12, atol=1e-12)
    # not torch.var_mean's Welford reduction (10-20x slower on the decoder's maps), and no
    # temporary as large as the map
    assert not [name for name, _, _ in ops.calls if name == "var_mean"]
    assert max(t.numel() for _, _, out in ops.calls for t in _tensors(out)) <= 2 * 3 * rows * 7


def test_lean_norm_relu_conv_takes_the_statistics_once_for_both_passes(monkeypatch):
    from ssageo.model import decoder_lean

    calls = []
    statistics = decoder_lean._statistics
    monkeypatch.setattr(decoder_lean, "_statistics",
                        lambda x: calls.append(x.shape) or statistics(x))
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 3, 3, padding=1)
    x = torch.randn(1, 4, 6, 5, requires_grad=True)
    decoder_lean.norm_relu_conv(x, conv).square().sum().backward()
    assert calls == [(1, 4, 6, 5)]  # the forward step's, kept for the backward step
    assert x.grad is not None and conv.weight.grad is not None


def test_lean_up_stage_never_makes_the_whole_upsampled_map():
    # the 8-channel input upsampled to 80 x 12 is made in row bands only (decoder_up.UP_ROWS),
    # in the forward and the backward pass
    from ssageo.model.decoder import UpStage

    torch.manual_seed(0)
    stage = UpStage(8, 3, top_from=5)
    x = torch.randn(1, 8, 40, 6, requires_grad=True)
    with _Ops() as ops:
        stage.lean(x).sum().backward()
    shapes = {tuple(t.shape) for _, _, out in ops.calls for t in _tensors(out)}
    assert (1, 8, 34, 12) in shapes  # a band: 32 rows and a halo row on each side
    assert not [s for s in shapes if len(s) == 4 and s[1] == 8 and s[2] > 34 and s[3] == 12]
