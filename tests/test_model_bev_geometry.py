"""The BEV head's geometry: north-up/east-right polar -> Cartesian resampling, and the learned-depth
projection's formula."""

from __future__ import annotations

import pytest
import torch

from ssageo.model.bev import PolarProjection, naive_polar_projection, polar_to_cartesian


def _polar_with_columns(columns: list[int], width: int = 32, depth: int = 8) -> torch.Tensor:
    """A (1,1,D,W) polar map that is 1 in the given panorama columns, 0 elsewhere."""
    polar = torch.zeros(1, 1, depth, width)
    polar[..., columns] = 1.0
    return polar


def _mass(bev: torch.Tensor) -> dict[str, float]:
    n = bev.shape[-1]
    b = bev[0, 0]
    return {"top": b[: n // 2].sum().item(), "bottom": b[n // 2:].sum().item(),
            "left": b[:, : n // 2].sum().item(), "right": b[:, n // 2:].sum().item()}


def test_panorama_centre_lands_at_the_top_and_three_quarters_on_the_right():
    # 32 columns: north is the centre (columns 15, 16), east at 3W/4 (23, 24), west at W/4
    north = _mass(polar_to_cartesian(_polar_with_columns([15, 16]), 16))
    assert north["top"] > 0 and north["bottom"] == 0
    assert north["left"] == pytest.approx(north["right"])  # symmetric about the N-S axis
    east = _mass(polar_to_cartesian(_polar_with_columns([23, 24]), 16))
    assert east["right"] > 0 and east["left"] == 0
    west = _mass(polar_to_cartesian(_polar_with_columns([7, 8]), 16))
    assert west["left"] > 0 and west["right"] == 0


def test_panorama_roll_equals_tile_rotation():
    # README "Conventions": rot90(tile, k) <-> roll(pano, -k*W/4); the BEV grid must agree
    torch.manual_seed(0)
    polar = torch.randn(2, 3, 8, 32)
    bev = polar_to_cartesian(polar, 16)
    for k in (1, 2, 3):
        rolled = polar_to_cartesian(torch.roll(polar, -k * 8, dims=-1), 16)
        torch.testing.assert_close(rolled, torch.rot90(bev, k, dims=(-2, -1)),
                                   rtol=1e-5, atol=1e-5)


def test_radius_grows_outward_from_the_tile_centre():
    polar = torch.arange(8.0).view(1, 1, 8, 1).expand(1, 1, 8, 32).contiguous()  # value = bin
    bev = polar_to_cartesian(polar, 16)[0, 0]
    assert bev[7:9, 7:9].max() < 1.0  # the centre reads the nearest bins
    assert bev[0, 0] > 6.5 and bev[-1, -1] > 6.5  # the corners the farthest


def test_feature_facing_north_ends_in_the_top_of_the_head_input():
    # through the learned-depth projection: whatever the depth weights, a feature present
    # only in the north-facing columns of the trunk map reaches only the northern half
    torch.manual_seed(0)
    features = torch.zeros(1, 4, 3, 32)
    features[..., 15:17] = torch.rand(1, 4, 3, 2) + 0.5
    projection = PolarProjection(4, 8)
    bev = _mass(polar_to_cartesian(projection(features), 16).abs().sum(1, keepdim=True))
    assert bev["top"] > 0 and bev["bottom"] == 0


def test_naive_reference_is_the_formula_of_the_method():
    torch.manual_seed(0)
    f = torch.randn(1, 2, 3, 4)
    weight, bias = torch.randn(2 * 5, 2, 1, 1), torch.randn(10)
    out = naive_polar_projection(f, weight, bias, 5)
    logits = torch.einsum("oi,bihw->bohw", weight[:, :, 0, 0], f) + bias.view(1, -1, 1, 1)
    c, d, w = 1, 3, 2
    soft = logits[0, c * 5 + d, :, w].softmax(0)
    assert out[0, c, d, w].item() == pytest.approx((soft * f[0, c, :, w]).sum().item(), abs=1e-6)
