import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ssageo.evaluate.metrics import (
    EARTH_RADIUS_M,
    haversine_m,
    one_percent_k,
    rank_queries,
    retrieval_metrics,
)


def brute_force(query, reference, positive, semi_positive=None):
    """The protocol written out over the full similarity matrix, in exact integer arithmetic."""
    sim = query.astype(np.int64) @ reference.astype(np.int64).T
    pos_sim = sim[np.arange(len(query)), positive][:, None]
    above = sim > pos_sim
    rank = above.sum(1)
    hit = None
    if semi_positive is not None:
        mask = above.copy()
        for i, row in enumerate(semi_positive):
            mask[i, row[row >= 0]] = False
        hit = ~mask.any(1)
    return rank, hit


def quantised_world(seed, n_q=37, n_r=53, dim=6):
    """Integer-valued descriptors: exact dot products, so ties are many and exact."""
    rng = np.random.default_rng(seed)
    reference = rng.integers(-2, 3, size=(n_r, dim)).astype(np.float32)
    reference[n_r // 2 :] = reference[: n_r - n_r // 2]  # duplicated references: exact ties
    positive = rng.integers(0, n_r, size=n_q)
    query = reference[positive] + rng.integers(-1, 2, size=(n_q, dim)).astype(np.float32)
    semi = rng.integers(-1, n_r, size=(n_q, 3))
    return query, reference, positive, semi


@pytest.mark.parametrize("block_size", [1, 5, 16, 36, 37, 1000])
def test_ranks_match_brute_force_with_exact_ties_for_any_block_size(block_size):
    query, reference, positive, semi = quantised_world(seed=block_size)
    rank, hit = brute_force(query, reference, positive, semi)
    assert (rank > 0).any() and (rank == 0).any()
    got = rank_queries(query, reference, positive, semi, block_size=block_size)
    np.testing.assert_array_equal(got["rank"], rank)
    np.testing.assert_array_equal(got["hit"], hit)
    metrics = retrieval_metrics(query, reference, positive, semi, block_size=block_size)
    for k in (1, 5, 10):
        assert metrics[f"R@{k}"] == pytest.approx(100 * np.mean(rank < k))
    assert metrics["hit_rate"] == pytest.approx(100 * np.mean(hit))
    assert (metrics["queries"], metrics["gallery"]) == (37, 53)


def test_tie_with_the_positive_favours_the_query():
    reference = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    query = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    metrics = retrieval_metrics(query, reference, positive=[1, 0])
    np.testing.assert_array_equal(rank_queries(query, reference, [1, 0])["rank"], [0, 1])
    assert metrics["R@1"] == 50.0 and metrics["R@5"] == 100.0


def test_random_unit_descriptors_match_float64_reference():
    rng = np.random.default_rng(0)
    query = rng.normal(size=(120, 16))
    reference = rng.normal(size=(300, 16))
    query /= np.linalg.norm(query, axis=1, keepdims=True)
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)
    positive = rng.permutation(300)[:120]
    sim = query @ reference.T
    rank = (sim > sim[np.arange(120), positive][:, None]).sum(1)
    got = rank_queries(query, reference, positive, block_size=7)
    np.testing.assert_array_equal(got["rank"], rank)
    np.testing.assert_array_equal(got["top1"], sim.argmax(1))
    metrics = retrieval_metrics(query, reference, positive, block_size=7)
    assert metrics["k_1%"] == 3
    assert metrics["R@1%"] == pytest.approx(100 * np.mean(rank < 3))


def test_half_precision_descriptors_give_the_same_exact_ranks():
    query, reference, positive, _ = quantised_world(seed=3)
    rank, _ = brute_force(query, reference, positive)
    half = torch.from_numpy(query).half(), torch.from_numpy(reference).half()
    np.testing.assert_array_equal(rank_queries(*half, positive, block_size=8)["rank"], rank)


def test_one_percent_k_follows_floor_and_is_at_least_one():
    assert [one_percent_k(n) for n in (1, 99, 100, 199, 8884, 92802)] == [1, 1, 1, 1, 88, 928]


def test_vigor_hit_rate_on_constructed_cases():
    reference = np.array([[4, 0], [3, 1], [2, 2], [0, 4], [1, 3]], dtype=np.float32)
    query = np.array([[1, 3], [3, 1], [2, 2], [3, 1], [3, 1]], dtype=np.float32)
    positive = np.array([2, 1, 2, 2, 2])
    semi = np.array(
        [
            [3, 4, -1],  # tiles 3 and 4 beat the positive, both semi-positives: a hit
            [-1, -1, -1],  # tile 0 beats the positive and is no semi-positive: a miss
            [0, 1, 3],  # every tile ties with the positive: R@1 and a hit
            [1, 2, 1],  # tile 1 is forgiven (listed twice), tile 0 is not: a miss
            [1, 0, -1],  # both tiles above are semi-positives: a hit
        ]
    )
    ranked = rank_queries(query, reference, positive, semi)
    np.testing.assert_array_equal(ranked["rank"], [2, 1, 0, 2, 2])
    np.testing.assert_array_equal(ranked["hit"], [True, False, True, False, True])
    metrics = retrieval_metrics(query, reference, positive, semi)
    assert metrics["R@1"] == 20.0 and metrics["hit_rate"] == 60.0


def test_metre_error_of_top1_tile_centre():
    reference = np.eye(3, dtype=np.float32)
    query = np.array([[1, 0, 0], [0, 0, 1]], dtype=np.float32)  # top-1: tiles 0 and 2
    ref_coords = np.array([[0.0, 0.0], [10.0, 10.0], [1.0, 0.0]])
    query_coords = np.array([[0.0, 0.0], [0.0, 0.0]])
    metrics = retrieval_metrics(query, reference, [0, 1], None, query_coords, ref_coords)
    one_degree = EARTH_RADIUS_M * math.pi / 180  # ~111.2 km of latitude
    assert metrics["mean_error_m"] == pytest.approx(one_degree / 2)
    assert metrics["median_error_m"] == pytest.approx(one_degree / 2)
    quarter = haversine_m([[0.0, 0.0]], [[0.0, 90.0]])[0]
    assert quarter == pytest.approx(EARTH_RADIUS_M * math.pi / 2)
    # CVACT gives UTM easting/northing in metres: the error is their Euclidean distance
    utm = np.array([[500_000.0, 6_100_000.0], [500_100.0, 6_100_000.0], [500_130.0, 6_100_040.0]])
    planar = retrieval_metrics(query, reference, [0, 1], None, utm[:2], utm, planar_coords=True)
    assert planar["median_error_m"] == planar["mean_error_m"] == pytest.approx(25.0)  # 0 and 50


def test_bad_inputs_are_refused_with_clear_messages():
    q = np.zeros((2, 4), dtype=np.float32)
    r = np.zeros((3, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="dimension mismatch"):
        retrieval_metrics(q, np.zeros((3, 5), dtype=np.float32), [0, 1])
    with pytest.raises(ValueError, match=r"positive: indices must lie in \[0, 3\)"):
        retrieval_metrics(q, r, [0, 3])
    with pytest.raises(ValueError, match="positive: expected shape"):
        retrieval_metrics(q, r, [0, 1, 2])
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(np.full((2, 4), np.nan, dtype=np.float32), r, [0, 1])
    with pytest.raises(ValueError, match="both query_coords and reference_coords"):
        retrieval_metrics(q, r, [0, 1], query_coords=np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"reference_coords: expected shape \(3, 2\)"):
        retrieval_metrics(q, r, [0, 1], None, np.zeros((2, 2)), np.zeros((2, 2)))


def _peak_rss_growth(fn) -> int:
    """Bytes the process's peak resident memory grew by while running ``fn`` (Linux only)."""
    status = Path("/proc/self/status")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pytest.skip("cannot reset the peak RSS on this system")

    def read(field):
        line = next(x for x in status.read_text().splitlines() if x.startswith(field))
        return int(line.split()[1]) * 1024

    before = read("VmRSS:")
    fn()
    return read("VmHWM:") - before


def test_memory_is_bounded_by_the_block_not_the_gallery():
    n, dim = 8_000, 8
    rng = np.random.default_rng(1)
    query = rng.normal(size=(n, dim)).astype(np.float32)
    reference = rng.normal(size=(n, dim)).astype(np.float32)
    positive = np.arange(n)
    rank_queries(query[:10], reference, positive[:10], block_size=128)  # warm up the allocator
    grown = _peak_rss_growth(lambda: rank_queries(query, reference, positive, block_size=128))
    full_matrix = n * n * 4  # 256 MB; one block is 4 MB
    assert grown < full_matrix / 8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_ranking_matches_brute_force():
    query, reference, positive, semi = quantised_world(seed=5)
    rank, hit = brute_force(query, reference, positive, semi)
    got = rank_queries(query, reference, positive, semi, block_size=8, device="cuda")
    np.testing.assert_array_equal(got["rank"], rank)
    np.testing.assert_array_equal(got["hit"], hit)
