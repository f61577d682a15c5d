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


@pytest.fixture(scope="module")
def small_run(synth_world):
    """A synth world's training manifest, a small real model and a config to drive them."""
    from ssageo.config import load_config
    from ssageo.data import load_manifest
    from ssageo.model import build_model

    world = synth_world("cvusa")
    cfg = load_config("synth-cpu", [
        f"data.root={world}", "data.workers=0", "model.bev.enabled=false", "eval.batch_size=40",
        "train.sampling.similarity_start=2", "train.sampling.similarity_every=2",
        "train.sampling.neighbour_select=4", "train.sampling.neighbour_range=8",
    ])
    torch.manual_seed(0)
    d = cfg["data"]
    model = build_model(cfg["model"], d["reference_size"], d["query_size"])
    return load_manifest(world), model, cfg


def _similarity(model, manifest, cfg):
    from ssageo.evaluate.embed import embed_manifest

    q, r = embed_manifest(model, manifest, cfg, progress=False)
    k = cfg["train"]["sampling"]["neighbour_range"]
    return similarity_neighbours(q, r, manifest.positive, k)


@pytest.mark.parametrize("first", ["random", "gps", "similarity"])
def test_sampling_first_decides_the_neighbours_until_the_first_recomputation(small_run, first):
    from ssageo.config import apply_overrides
    from ssageo.data.neighbours import gps_neighbours
    from ssageo.train.sampler import epoch_neighbours

    manifest, model, base = small_run
    cfg = apply_overrides(base, [f"train.sampling.first={first}"])
    sampler = HardNegativeSampler(manifest.positive, 8, 4, 8, seed=0)
    epoch_neighbours(sampler, model, manifest, cfg, 0, log=lambda msg: None)
    expected = {"random": None, "gps": gps_neighbours(manifest, k=128),
                "similarity": _similarity(model, manifest, cfg)}[first]
    assert sampler.neighbour_source == {"random": "none", "gps": "gps",
                                        "similarity": "similarity@epoch0"}[first]
    if expected is None:
        assert sampler.neighbours is None
    else:
        assert np.array_equal(sampler.neighbours, expected)
    # the first epoch's batches are the ones those lists give (and differ between sources)
    twin = HardNegativeSampler(manifest.positive, 8, 4, 8, seed=0)
    twin.set_neighbours(expected, "expected")
    assert [b.tolist() for b in sampler.plan()] == [b.tolist() for b in twin.plan()]
    other = HardNegativeSampler(manifest.positive, 8, 4, 8, seed=0)
    other.set_neighbours(None if first != "random" else gps_neighbours(manifest, k=128), "x")
    assert [b.tolist() for b in sampler.plan()] != [b.tolist() for b in other.plan()]
    # epoch 1 keeps them even though the model changed; epoch 2 recomputes with the new model
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    kept = sampler.neighbours
    epoch_neighbours(sampler, model, manifest, cfg, 1, log=lambda msg: None)
    assert sampler.neighbours is kept
    epoch_neighbours(sampler, model, manifest, cfg, 2, log=lambda msg: None)
    assert sampler.neighbour_source == "similarity@epoch2"
    assert np.array_equal(sampler.neighbours, _similarity(model, manifest, cfg))


def test_sampling_first_is_checked_and_gps_without_coordinates_says_what_to_do(
        small_run, synth_world, tmp_path):
    import shutil

    from ssageo.config import ConfigError, apply_overrides
    from ssageo.data import load_manifest
    from ssageo.io import DataError
    from ssageo.train.sampler import epoch_neighbours, first_source

    manifest, model, cfg = small_run
    with pytest.raises(ConfigError, match="train.sampling.first must be one of random, gps"):
        first_source(apply_overrides(cfg, ["train.sampling.first=nearest"])["train"]["sampling"])
    assert first_source({"gps": False}) == "random"  # a run config from before the key
    root = tmp_path / "world"
    shutil.copytree(synth_world("cvusa"), root)
    (root / "split_locations/all.csv").unlink()
    no_gps = load_manifest(root, use_cache=False)
    sampler = HardNegativeSampler(no_gps.positive, 8, 4, 8)
    with pytest.raises(DataError, match=r"no GPS .* set train.sampling.first=random"):
        epoch_neighbours(sampler, model, no_gps, cfg, 0, log=lambda msg: None)
