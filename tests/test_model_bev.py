"""The BEV head: lean == straightforward head (projection, decoder, gradients) and what the lean
head keeps for the backward pass (its geometry: test_model_bev_geometry.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from ssageo.config import load_config
from ssageo.model import polar_lean
from ssageo.model.bev import (
    BEVHead,
    PolarProjection,
    naive_polar_projection,
    polar_to_cartesian,
)
from ssageo.model.decoder import BEVDecoder, DoubleConv, ResidualBlock, UpStage, decoder_widths
from ssageo.model.summary import model_info


@pytest.mark.parametrize("chunk_elements", [1, 700, 1 << 22])  # 1 channel .. all at once
def test_lean_projection_matches_the_straightforward_one_with_gradients(chunk_elements):
    torch.manual_seed(0)
    lean = PolarProjection(12, 6, lean=True, chunk_elements=chunk_elements, lean_from=0)
    naive = copy.deepcopy(lean)
    naive.lean = False
    features = torch.randn(2, 12, 5, 9)
    outputs, grads = [], []
    for module in (lean, naive):
        x = features.clone().requires_grad_()
        out = module(x)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outputs.append(out)
        grads.append([x.grad, module.depth.weight.grad, module.depth.bias.grad])
    assert outputs[0].shape == (2, 12, 6, 9)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_lean_projection_passes_gradcheck_in_float64():
    torch.manual_seed(0)
    module = PolarProjection(4, 3, lean=True, chunk_elements=40, lean_from=0).double()
    x = torch.randn(1, 4, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(module, (x,), fast_mode=True)


def _lean_at_any_size(head: BEVHead) -> BEVHead:
    """The lean code paths even at test sizes (by default they start at sizes where they pay)."""
    head.projection.lean_from = head.decoder.lean_from = 0
    return head


def _straightforward(head: BEVHead) -> BEVHead:
    naive = copy.deepcopy(head)
    naive.projection.lean = False
    naive.decoder.lean = False
    return naive


@pytest.mark.parametrize("batch", [1, 3])
def test_whole_head_lean_and_straightforward_agree(batch):
    # float64: the decoder's InstanceNorm amplifies fp32 rounding (~1e-7 after the
    # projection, see the fp32 test above) to ~1e-5 in the logits, which would hide real bugs
    torch.manual_seed(0)
    lean = _lean_at_any_size(BEVHead(16, depth_bins=8, grid_size=6, classes=2)).double()
    lean.projection.chunk_elements = 500  # several chunks
    features = torch.randn(batch, 16, 4, 12, dtype=torch.float64)
    target = torch.randn(batch, 2, 48, 48, dtype=torch.float64)
    results = []
    for head in (lean, _straightforward(lean)):
        x = features.clone().requires_grad_()
        logits = head(x)
        (logits * target).sum().backward()
        results.append((logits, x.grad, {n: p.grad for n, p in head.named_parameters()}))
    assert results[0][0].shape == (batch, 2, 48, 48)  # 8 * grid_size
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-9, atol=1e-9)
    for name, grad in results[0][2].items():
        torch.testing.assert_close(grad, results[1][2][name], rtol=1e-9, atol=1e-9, msg=name)


def test_lean_decoder_functions_pass_gradcheck_in_float64():
    torch.manual_seed(0)
    for stage in (UpStage(8, 3, top_from=0), UpStage(8, 2, top_from=4)):  # first, later stage
        stage = stage.double()
        x = torch.randn(1, 8, 3, 4, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(stage.lean, (x,), fast_mode=True)
    for block in (ResidualBlock(6, 4), ResidualBlock(4, 4)):
        block = block.double()
        x = torch.randn(1, block.body[0].in_channels, 4, 5, dtype=torch.float64,
                        requires_grad=True)
        assert torch.autograd.gradcheck(block.lean, (x,), fast_mode=True)
    refine = DoubleConv(4, 4).double()
    classifier = torch.nn.Conv2d(4, 2, 1).double()
    c1 = torch.randn(1, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: refine.lean(t, classifier), (c1,), fast_mode=True)


# row bands of the upsampled map (6 rows): 1 row (every band at an edge or beside a halo),
# 4 (a partial last band), 32 (one band); top-k over the last channels or all of them
@pytest.mark.parametrize("rows, top_from", [(1, 5), (4, 5), (32, 5), (4, 0)])
def test_up_stage_row_bands_match_the_plain_stage_in_float64(rows, top_from, monkeypatch):
    from ssageo.model import decoder_up

    monkeypatch.setattr(decoder_up, "UP_ROWS", rows)
    torch.manual_seed(0)
    stage = UpStage(8, 3, top_from=top_from).double()
    x = torch.randn(2, 8, 3, 4, dtype=torch.float64)
    target = torch.randn(2, 6, 6, 8, dtype=torch.float64)
    results = []
    for run in (stage.lean, lambda t: stage(t, t[:, top_from:])[0]):
        for layout in (torch.channels_last, torch.contiguous_format):
            xi = x.clone(memory_format=layout).requires_grad_()
            stage.zero_grad()
            out = run(xi)
            (out * target).sum().backward()
            results.append((out, xi.grad, stage.conv[0].weight.grad.clone()))
    for lean in results[:2]:
        for a, b in zip(lean, results[2], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    assert torch.autograd.gradcheck(stage.lean, (x[:1].clone().requires_grad_(),), fast_mode=True)


def test_later_stages_take_the_first_k_of_their_sorted_top_input_where_zeros_tie():
    """Stages after the first take the first k channels of their top-k input (a previous
    top-k output, sorted): same values and gradients as topk, also where ReLU zeros tie, and
    topk runs for the first stage only."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class TopK(TorchDispatchMode):
        channels: list[int] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ == "topk":
                self.channels.append(args[0].shape[1])
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    decoder = BEVDecoder(32, 2).double()
    z = torch.randn(1, 16, 5, 6, dtype=torch.float64) - 1  # ReLU: ~84 % zeros
    target = torch.randn(1, 4, 40, 48, dtype=torch.float64)
    results = []
    for lean in (True, False):
        zi = z.clone(memory_format=torch.channels_last).requires_grad_()
        decoder.zero_grad()
        x = top = F.relu(zi)
        with TopK() as mode:
            for stage in decoder.up:
                x, top = (stage.lean(x), None) if lean else stage(x, top)
            (x * target).sum().backward()
        results.append((x, zi.grad, *[s.conv[0].weight.grad.clone() for s in decoder.up]))
        if lean:
            assert mode.channels and set(mode.channels) == {16}  # the first stage's only
    assert (results[1][0][:, -2:] == 0).any()  # zeros among the last top-k values: ties
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_lean_up_stage_never_makes_top_k_indices_for_the_whole_map():
    """topk's int64 indices (twice the values' bytes) are made a few rows at a time only."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestIndex(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple) else (out,):
                if isinstance(t, torch.Tensor) and t.dtype == torch.int64:
                    self.largest = max(self.largest, t.numel())
            return out

    torch.manual_seed(0)
    stage = UpStage(8, 3, top_from=5)
    x = torch.randn(1, 8, 40, 6, requires_grad=True)  # 80 rows after upsampling
    with LargestIndex() as mode:
        stage.lean(x).sum().backward()
    assert 0 < mode.largest <= 3 * 32 * 12  # k * UP_ROWS * width, not k * 80 * 12


def test_lean_resampling_keeps_only_the_grid_and_matches_grid_sample():
    torch.manual_seed(0)
    polar = torch.randn(2, 3, 5, 8, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    grads = []
    for lean in (True, False):
        out = polar_to_cartesian(polar, 6, lean=lean)
        grads.append((out, *torch.autograd.grad((out * target).sum(), polar)))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda p: polar_to_cartesian(p, 4, lean=True),
                                    (polar[:1, :1],), fast_mode=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t,
                                                  lambda t: t):
        polar_to_cartesian(polar, 6, lean=True)
    assert (2, 3, 5, 10) not in saved  # the padded polar map is not kept


def test_lean_head_trains_under_autocast_like_the_straightforward_one():
    # a GPU trains with fp16 autocast: the lean pieces' backward steps get low-precision
    # gradients beside float32 weights (this failed with a dtype error before)
    torch.manual_seed(0)
    lean = _lean_at_any_size(BEVHead(16, depth_bins=8, grid_size=6, classes=2))
    features = torch.randn(2, 16, 4, 12)

    def grads(head, autocast):
        head.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
            logits = head(features)
        logits.float().square().mean().backward()
        assert all(p.grad.dtype == torch.float32 for p in head.parameters()
                   if p.grad is not None)
        return torch.cat([p.grad.flatten() for p in head.parameters() if p.grad is not None])

    exact = grads(_straightforward(lean), False)
    errors = [(grads(head, True) - exact).norm() / exact.norm()
              for head in (lean, _straightforward(lean))]
    # the same float16 rounding as the straightforward head's (about 6 % here), no more
    assert errors[0] < 1.5 * errors[1] and errors[1] < 0.2


def test_decoder_has_the_reference_size_and_widths():
    # MLSP(backbone_channels=512, classes=2) of the SSA authors' BEV_Layout.py: 3,781,954
    with torch.device("meta"):
        decoder = BEVDecoder(512, 2)
    assert sum(p.numel() for p in decoder.parameters()) == 3_781_954
    assert [stage.out_channels for stage in decoder.up] == [256, 128, 64]
    assert (decoder.refine[0].in_channels, decoder.refine[0].out_channels) == (64, 32)
    assert not any(isinstance(m, torch.nn.InstanceNorm2d) and m.affine
                   for m in decoder.modules())
    assert decoder_widths(256) == (128, (64, 32, 16))  # synth-cpu: half of the paper's widths
    assert decoder_widths(8) == (4, (2, 1, 1))


def test_first_residual_block_is_the_sum_of_two_rectified_branches():
    torch.manual_seed(0)
    block = ResidualBlock(6, 4)
    x = torch.randn(2, 6, 5, 5)
    conv1, conv2, align = block.body[0], block.body[3], block.shortcut[0]

    def norm_relu(t):
        return F.relu(F.instance_norm(t))

    body = norm_relu(conv2(norm_relu(conv1(x))))
    torch.testing.assert_close(block(x), norm_relu(align(x)) + body)
    same = ResidualBlock(4, 4)
    y = torch.randn(2, 4, 5, 5)
    expected = y + F.instance_norm(same.body[3](norm_relu(same.body[0](y))))
    torch.testing.assert_close(same(y), expected)


def _stage_outputs(decoder: BEVDecoder, x: torch.Tensor) -> list[torch.Tensor]:
    outputs = []
    hooks = [stage.register_forward_hook(lambda m, i, o: outputs.append(o[0]))
             for stage in decoder.up]
    decoder(x)
    for hook in hooks:
        hook.remove()
    return outputs


def test_top_k_branch_is_a_chain_of_aligned_corner_upsamplings():
    torch.manual_seed(0)
    decoder = BEVDecoder(32, 2, lean=False)
    x = torch.randn(1, 32, 4, 4)
    before = _stage_outputs(decoder, x)
    with torch.no_grad():  # the conv branches change; the top-k chain must not see it
        for stage in decoder.up:
            stage.conv[0].weight.normal_()
    after = _stage_outputs(decoder, x)
    for stage, a, b in zip(decoder.up, before, after, strict=True):
        torch.testing.assert_close(a[:, stage.k:], b[:, stage.k:], rtol=0, atol=0)
        assert not torch.allclose(a[:, :stage.k], b[:, :stage.k])
    # aligned corners: on a 4 -> 8 grid, output column 1 samples input column 3/7
    # (align_corners=False would sample 0.25)
    trunk = F.relu(decoder.blocks(x))[0, :, 0]
    first = before[0][0, decoder.up[0].k:, 0]
    torch.testing.assert_close(first[:, 1], (trunk[:, 0] * 4 / 7 + trunk[:, 1] * 3 / 7).topk(8)
                               .values)
    torch.testing.assert_close(first[:, -1], trunk[:, -1].topk(8).values)


def test_lean_and_straightforward_heads_share_their_state_dict():
    torch.manual_seed(0)
    lean = _lean_at_any_size(BEVHead(16, depth_bins=4, grid_size=4, classes=2))
    plain = BEVHead(16, depth_bins=4, grid_size=4, classes=2, lean=False)
    plain.load_state_dict(lean.state_dict())  # strict: the same keys and shapes
    x = torch.randn(2, 16, 3, 8)
    torch.testing.assert_close(lean(x), plain(x), rtol=1e-5, atol=1e-5)  # as the other fp32 checks
    lean.load_state_dict(BEVHead(16, 4, 4, 2, lean=False).state_dict())


def test_paper_head_size_as_model_info_prints_it():
    # depth conv 512 -> 512*96 with its bias (it cancels in the softmax but is kept, as in the
    # reference) 25,214,976 + the reference decoder 3,781,954
    info = model_info(load_config("cvusa"))
    assert info["parts"]["bev"] == 28_996_930


def test_projection_bias_cancels_in_the_softmax():
    # the 1x1 conv's bias is constant along the softmax axis: no effect, zero gradient
    torch.manual_seed(0)
    module = PolarProjection(6, 4, lean_from=0)
    x = torch.randn(2, 6, 5, 7)
    out = module(x)
    module.depth.bias.data.normal_(0, 3)
    torch.testing.assert_close(module(x), out, rtol=1e-5, atol=1e-5)
    module(x).sum().backward()
    assert torch.equal(module.depth.bias.grad, torch.zeros_like(module.depth.bias))
    weight, bias = module.depth.weight.detach(), module.depth.bias.detach().requires_grad_()
    naive_polar_projection(x, weight, bias, 4).sum().backward()
    assert bias.grad.abs().max() < 1e-5


@pytest.mark.parametrize("onednn", [True, False])
def test_lean_projection_same_with_and_without_onednn(onednn, monkeypatch):
    if onednn and not polar_lean._HAS_ONEDNN_LINEAR:
        pytest.skip("this PyTorch build has no oneDNN linear")
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", onednn)
    torch.manual_seed(0)
    module = PolarProjection(12, 6, chunk_elements=700, lean_from=0)
    x = torch.randn(2, 12, 5, 9, requires_grad=True)
    out = module(x)
    out.sum().backward()
    reference = naive_polar_projection(x, module.depth.weight, module.depth.bias, 6)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(reference.sum(), (x, module.depth.weight))
    torch.testing.assert_close(x.grad, grads[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(module.depth.weight.grad, grads[1], rtol=1e-5, atol=1e-5)


def _saved_bytes(head: BEVHead, x: torch.Tensor) -> int:
    """Bytes the forward pass keeps for the backward pass, parameters and input excluded."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        head(x)
    shared = {p.untyped_storage().data_ptr() for p in head.parameters()}
    shared.add(x.untyped_storage().data_ptr())
    return sum(n for ptr, n in storages.items() if ptr not in shared)


def test_lean_head_keeps_a_small_fraction_for_the_backward_pass():
    torch.manual_seed(0)
    head = BEVHead(64, depth_bins=32, grid_size=16, classes=2)
    x = torch.randn(2, 64, 8, 32, requires_grad=True)
    straightforward = _saved_bytes(_straightforward(head), x)
    assert straightforward > 10 * 2**20  # the (B,C,D,H,W) logits and 128x128 decoder maps
    # at this size the defaults still run the straightforward code (faster, memory small)
    assert _saved_bytes(head, x) == straightforward
    assert _saved_bytes(_lean_at_any_size(head), x) < straightforward / 8
