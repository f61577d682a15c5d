import numpy as np
import pytest
import torch

from ssageo.train.sampler import HardNegativeSampler, plan_epoch, similarity_neighbours


def _line_neighbours(n: int, k: int) -> np.ndarray:
    """Places on a line: neighbours ordered by distance (ties: lower index first), self excluded."""
    pos = np.arange(n)
    dist = np.abs(pos[:, None] - pos[None, :]).astype(float)
    np.fill_diagonal(dist, np.inf)
    return np.argsort(dist, axis=1, kind="stable")[:, :k]


def test_no_duplicate_place_or_tile_in_a_batch_and_each_place_once_per_epoch():
    keys = np.repeat(np.arange(60), 3)  # VIGOR-like: three panoramas per satellite tile
    neigh = _line_neighbours(len(keys), 32)
    sampler = HardNegativeSampler(keys, batch_size=12, neighbour_select=8, neighbour_range=24)
    sampler.set_neighbours(neigh, "gps")
    seen = []
    for batch in sampler:
        assert len(batch) == 12
        assert len(set(keys[batch])) == 12, "two samples of one tile in a batch"
        seen.extend(batch)
    assert len(seen) == len(set(seen)), "a place was used twice in one epoch"
    assert len(seen) >= 0.8 * len(keys)  # only the tail that cannot fill a batch is dropped


def test_cobatched_neighbours_are_the_nearest_half_plus_a_random_half_of_the_list():
    n, select, rng_ = 200, 8, 20
    neigh = _line_neighbours(n, 64)
    sampler = HardNegativeSampler(
        np.arange(n), batch_size=1 + select, neighbour_select=select, neighbour_range=rng_,
        seed=3,
    )
    sampler.set_neighbours(neigh, "gps")
    first = list(sampler)[0]
    anchor = first[0]
    assert first[1:1 + select // 2] == neigh[anchor, :select // 2].tolist()
    drawn = first[1 + select // 2:]
    assert set(drawn) <= set(neigh[anchor, select // 2:rng_].tolist())
    assert len(set(drawn)) == select // 2
    # Fixed seed: the same plan every time; another epoch or seed gives another one.
    again = HardNegativeSampler(
        np.arange(n), batch_size=1 + select, neighbour_select=select, neighbour_range=rng_,
        seed=3,
    )
    again.set_neighbours(neigh, "gps")
    assert [b.tolist() for b in again.plan()] == [b.tolist() for b in sampler.plan()]
    again.set_epoch(1)
    assert [b.tolist() for b in again.plan()] != [b.tolist() for b in sampler.plan()]
    # The drawn half really varies with the seed (not always the same list entries).
    draws = set()
    for seed in range(10):
        rng = np.random.default_rng(seed)
        b = plan_epoch(np.arange(n), 1 + select, neigh, select, rng_, rng)[0]
        draws.add(tuple(sorted(np.asarray(b[1 + select // 2:]) - b[0])))
    assert len(draws) > 1


def test_ranks_take_contiguous_slices_of_the_global_batch_and_resume_replays():
    keys = np.arange(96)
    neigh = _line_neighbours(96, 16)
    single = HardNegativeSampler(keys, 8, 4, 16, seed=1)
    single.set_neighbours(neigh, "gps")
    ranks = [HardNegativeSampler(keys, 8, 4, 16, seed=1, world_size=2, rank=r) for r in (0, 1)]
    for r in ranks:
        r.set_neighbours(neigh, "gps")
    for whole, a, b in zip(single, ranks[0], ranks[1], strict=True):
        assert whole == a + b
    # Resume mid-epoch: a sampler restored from state yields the remaining batches exactly.
    single.set_epoch(2, start_batch=3)
    state = single.state_dict()
    restored = HardNegativeSampler(keys, 8, 4, 16, seed=99)
    restored.load_state_dict(state)
    assert list(restored) == list(single)
    full = HardNegativeSampler(keys, 8, 4, 16, seed=1)
    full.set_neighbours(neigh, "gps")
    full.set_epoch(2)
    assert list(full)[3:] == list(restored)
    # Short epochs (smoke runs): the same plan, cut.
    short = HardNegativeSampler(keys, 8, 4, 16, seed=1, max_batches=2)
    short.set_neighbours(neigh, "gps")
    short.set_epoch(2)
    assert len(short) == 2 and list(short) == list(full)[:2]


def test_bad_batch_sizes_are_refused():
    with pytest.raises(ValueError, match="divisible"):
        HardNegativeSampler(np.arange(50), batch_size=9, world_size=2)
    with pytest.raises(ValueError, match="fewer than"):
        HardNegativeSampler(np.zeros(50, dtype=int), batch_size=4)


def test_similarity_neighbours_rank_confusable_places_and_exclude_the_own_tile():
    torch.manual_seed(0)
    ref = torch.nn.functional.normalize(torch.randn(40, 16), dim=1)
    positive = np.arange(40)
    query = torch.nn.functional.normalize(ref + 0.01 * torch.randn(40, 16), dim=1)
    query[5] = ref[7]  # place 5's query looks exactly like place 7's tile
    neigh = similarity_neighbours(query, ref, positive, k=10, block_size=16)
    assert neigh.shape == (40, 10)
    assert neigh[5, 0] == 7
    assert not (neigh == np.arange(40)[:, None]).any()
    # brute force agreement
    sim = (query @ ref.T).numpy()
    np.fill_diagonal(sim, -np.inf)
    assert (np.argsort(-sim, axis=1)[:, :10] == neigh).all()
