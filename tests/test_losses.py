"""Losses: symmetric InfoNCE (temperature, smoothing, 2-process gather), Dice, the SSA loss."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from ssageo.model.losses import InfoNCE, bev_loss, dice_loss, resize_prior, ssa_loss

LOSS_CFG = {"ssa_weight": 1.0, "label_smoothing": 0.1, "logit_scale_init": 1 / 0.07,
            "logit_scale_multiplier": 1.5, "logit_scale_max": 100.0}


def _descriptors(n: int = 8, d: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(n, d, generator=g), dim=1)
    r = F.normalize(q + 0.3 * torch.randn(n, d, generator=g), dim=1)
    return q, r


def test_infonce_matches_the_written_out_formula():
    q, r = _descriptors()
    log_scale = torch.tensor(math.log(1 / 0.07))
    loss = InfoNCE(label_smoothing=0.1, multiplier=1.5)(q, r, log_scale)
    s = 1.5 / 0.07
    labels = torch.arange(8)
    expected = (F.cross_entropy(s * q @ r.t(), labels, label_smoothing=0.1)
                + F.cross_entropy(s * r @ q.t(), labels, label_smoothing=0.1)) / 2
    torch.testing.assert_close(loss, expected)


def test_infonce_rewards_matching_pairs_and_clamps_the_scale():
    q, r = _descriptors()
    loss_fn = InfoNCE(label_smoothing=0.0)
    scale = torch.tensor(math.log(20.0))
    assert loss_fn(q, r, scale) < loss_fn(q, r.roll(1, dims=0), scale)
    # exp(10) is far beyond 100: the clamp applies to exp(logit_scale), then the multiplier
    big = torch.tensor(10.0, requires_grad=True)
    assert InfoNCE(multiplier=1.5).scale(big).item() == pytest.approx(150.0)
    InfoNCE()(q, r, big).backward()
    assert big.grad.item() == 0.0  # clamped: the temperature stops growing


def test_dice_is_zero_for_a_perfect_prediction_and_high_for_the_opposite():
    target = torch.zeros(2, 8, 8, dtype=torch.long)
    target[:, 2:6, 2:6] = 1
    perfect = F.one_hot(target, 2).permute(0, 3, 1, 2).float() * 50
    assert dice_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-4)
    assert dice_loss(-perfect, target).item() > 0.9


def _dice_by_loops(logits: torch.Tensor, target: torch.Tensor, eps: float) -> float:
    """The reference formula written out pixel by pixel, in float64."""
    b_count, k_count, height, width = logits.shape
    probs = logits.double().softmax(dim=1)
    losses = []
    for b in range(b_count):
        for k in range(k_count):
            inter = p_sum = y_sum = 0.0
            for i in range(height):
                for j in range(width):
                    p, y = probs[b, k, i, j].item(), float(target[b, i, j].item() == k)
                    inter, p_sum, y_sum = inter + p * y, p_sum + p, y_sum + y
            losses.append(1 - (2 * inter + eps) / (p_sum + y_sum + eps))
    return sum(losses) / len(losses)


def test_dice_is_per_sample_and_class_with_the_reference_smoothing():
    torch.manual_seed(0)
    logits = 3 * torch.randn(3, 3, 5, 6, dtype=torch.float64)
    target = torch.randint(0, 3, (3, 5, 6))
    target[1] = 0  # classes 1 and 2 absent from sample 1
    loss = dice_loss(logits, target)
    assert loss.item() == pytest.approx(_dice_by_loops(logits, target, 1e-6), abs=1e-12)
    # the former form (sums pooled over the batch, eps 1) gives another value
    probs = logits.softmax(dim=1)
    onehot = F.one_hot(target, 3).permute(0, 3, 1, 2).double()
    pooled = (1 - (2 * (probs * onehot).sum((0, 2, 3)) + 1)
              / (probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3)) + 1)).mean()
    assert abs(loss.item() - pooled.item()) > 0.05


def test_prior_is_resized_nearest_neighbour_and_bev_term_weighted():
    prior = torch.zeros(1, 4, 4, dtype=torch.long)
    prior[0, 0, 0] = 1
    big = resize_prior(prior, (8, 8))
    assert big.dtype == torch.long and set(big.unique().tolist()) == {0, 1}
    assert big[0, :2, :2].eq(1).all() and big.sum() == 4
    q, r = _descriptors(4)
    logits = torch.randn(4, 2, 8, 8, requires_grad=True)
    outputs = {"query": q, "reference": r, "bev_logits": logits,
               "logit_scale": torch.tensor(math.log(1 / 0.07))}
    prior = torch.randint(0, 2, (4, 16, 16))
    base = ssa_loss(outputs, prior, LOSS_CFG)
    torch.testing.assert_close(base["bev"], bev_loss(logits, prior))
    torch.testing.assert_close(base["loss"], base["infonce"] + base["bev"])
    double = ssa_loss(outputs, prior, dict(LOSS_CFG, ssa_weight=2.0))
    torch.testing.assert_close(double["bev"], 2 * base["bev"])
    assert ssa_loss(outputs, None, LOSS_CFG)["bev"].item() == 0.0
    assert ssa_loss(dict(outputs, bev_logits=None), prior, LOSS_CFG)["bev"].item() == 0.0
    with pytest.raises(ValueError, match="outside the model's 2 BEV classes"):
        bev_loss(logits, prior * 3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gather_worker(rank: int, world: int, port: int, q, r, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world)
    try:
        b = q.shape[0] // world
        q_local = q[rank * b:(rank + 1) * b].clone().requires_grad_()
        r_local = r[rank * b:(rank + 1) * b].clone().requires_grad_()
        scale = torch.tensor(math.log(10.0), requires_grad=True)
        loss = InfoNCE(label_smoothing=0.1, multiplier=1.5)(q_local, r_local, scale)
        loss.backward()
        results[rank] = (loss.detach(), q_local.grad, r_local.grad, scale.grad)
    finally:
        dist.destroy_process_group()


def test_gathered_infonce_over_two_processes_equals_one_process_on_the_whole_batch():
    world = 2
    q, r = _descriptors(8)
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_gather_worker, args=(world, _free_port(), q, r, results), nprocs=world)
        results = dict(results)
    qs, rs = q.clone().requires_grad_(), r.clone().requires_grad_()
    scale = torch.tensor(math.log(10.0), requires_grad=True)
    loss = InfoNCE(label_smoothing=0.1, multiplier=1.5)(qs, rs, scale)
    loss.backward()
    # DDP averages over ranks: mean of rank losses/gradients == the whole-batch ones
    torch.testing.assert_close(sum(results[k][0] for k in range(world)) / world, loss.detach())
    torch.testing.assert_close(torch.cat([results[k][1] for k in range(world)]) / world, qs.grad)
    torch.testing.assert_close(torch.cat([results[k][2] for k in range(world)]) / world, rs.grad)
    torch.testing.assert_close(sum(results[k][3] for k in range(world)) / world, scale.grad)
    # without the gather a rank sees only its own negatives: a different loss
    local = InfoNCE(label_smoothing=0.1, multiplier=1.5, gather=False)(
        q[:4], r[:4], torch.tensor(math.log(10.0)))
    assert not torch.isclose(local, results[0][0])
