"""University-1652: the reader (both directions, distractors), the groups protocol (R@k, AP)
against a brute-force computation, and synth -> check -> train -> eval through the CLI."""

import json
import shutil
import warnings

import numpy as np
import pytest
from typer.testing import CliRunner

from ssageo.cli import app
from ssageo.config import load_config
from ssageo.data import detect_dataset, load_manifest
from ssageo.evaluate.grouped import group_hits, group_metrics
from ssageo.io import DataError
from ssageo.synth.university import DRONE_VIEWS

runner = CliRunner()


def _run(*args) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def univ(tmp_path_factory):
    """A 16-building synthetic University-1652 copy written by ``ssageo synth`` (64 px)."""
    out = tmp_path_factory.mktemp("univ") / "U1652"
    _run("synth", out, "--layout", "university", "--places", 16, "--sat-size", 64)
    return out


def _brute_force(query, reference, positive, groups):
    """University-1652's evaluation, literally: sort each query's gallery, walk the hits."""
    firsts, aps = [], []
    for i in range(len(query)):
        order = np.argsort(-(reference @ query[i]), kind="stable")
        good = np.flatnonzero(groups[order] == groups[positive[i]])
        ap = 0.0
        for m, row in enumerate(good):
            precision = (m + 1) / (row + 1)
            before = m / row if row else 1.0
            ap += (before + precision) / 2 / len(good)
        firsts.append(good[0])
        aps.append(ap)
    return np.array(firsts), np.array(aps)


@pytest.mark.parametrize("block_size", [1, 7, 4096])
def test_group_ap_and_recall_equal_a_brute_force_computation(block_size):
    rng = np.random.default_rng(block_size)
    query, reference = rng.normal(size=(40, 8)), rng.normal(size=(90, 8))
    groups = rng.integers(0, 12, 90)  # several relevant references per query, some groups none
    positive = rng.integers(0, 90, 40)
    first, ap = group_hits(query, reference, positive, groups, block_size)
    want_first, want_ap = _brute_force(query, reference, positive, groups)
    np.testing.assert_array_equal(first, want_first)
    np.testing.assert_allclose(ap, want_ap, rtol=1e-12)
    got = group_metrics(query, reference, positive, groups, block_size)
    assert got["AP"] == pytest.approx(100 * want_ap.mean())
    assert got["R@1"] == pytest.approx(100 * np.mean(want_first < 1))
    assert got["R@5"] == pytest.approx(100 * np.mean(want_first < 5))
    assert (got["queries"], got["gallery"]) == (40, 90)


def test_group_ap_values_by_hand_and_ties_favour_the_query():
    q = np.array([[1.0, 0.0]])
    refs = np.array([[0.9, 0.1], [1.0, 0.0], [0.5, 0.5], [1.0, 0.0]])
    # one relevant reference, last (position 3): the protocol's trapezoid gives 1 / (2 * 4),
    # half the textbook 1 / 4
    _, ap = group_hits(q, refs, [2], np.array([0, 1, 2, 3]))
    assert ap[0] == pytest.approx(1 / 8)
    # references 1 and 3 tie at the top; reference 3 is relevant: it counts as first
    first, ap = group_hits(q, refs, [3], np.array([0, 1, 2, 3]))
    assert first[0] == 0 and ap[0] == pytest.approx(1.0)
    # two relevant (groups 5) at positions 0 and 2: (1 + 1)/2/2 + (1/2 + 2/3)/2/2
    _, ap = group_hits(q, refs, [1], np.array([5, 5, 0, 1]))
    assert ap[0] == pytest.approx(0.5 + (0.5 + 2 / 3) / 4)


def test_reader_both_directions_with_distractors(univ):
    assert detect_dataset(univ) == "university"
    with pytest.warns(UserWarning, match="the distributed layout has no coordinates"):
        train = load_manifest(univ, split="train")  # the default mode is drone -> satellite
    assert train.num_queries == DRONE_VIEWS * train.num_references
    assert all(q.parent.name == train.reference_paths[p].parent.name
               for q, p in zip(train.query_paths, train.positive, strict=True))
    d2s = load_manifest(univ, split="test")
    assert d2s.vigor_mode == "drone-satellite"
    query_buildings = set(d2s.place_ids)
    gallery = {p.parent.name for p in d2s.reference_paths}
    assert query_buildings < gallery  # distractors: gallery buildings no query shows
    assert np.bincount(d2s.reference_groups).max() == 1
    s2d = load_manifest(univ, split="test", vigor_mode="satellite-drone")
    assert set(s2d.place_ids) == query_buildings and s2d.num_queries == len(query_buildings)
    relevant = [(s2d.reference_groups == s2d.reference_groups[p]).sum() for p in s2d.positive]
    assert relevant == [DRONE_VIEWS] * s2d.num_queries
    assert s2d.num_references == DRONE_VIEWS * len(gallery)
    # a query copy and its gallery copy are the same image, as distributed
    b = d2s.place_ids[0]
    assert (univ / f"test/query_drone/{b}/image-01.jpeg").read_bytes() == (
        univ / f"test/gallery_drone/{b}/image-01.jpeg").read_bytes()
    with pytest.raises(DataError, match="'cross-area' is not a University-1652 reading mode"):
        load_manifest(univ, split="test", vigor_mode="cross-area")
    with pytest.raises(DataError, match="University-1652 has no 'val' split"):
        load_manifest(univ, "university", split="val")


def test_reader_refuses_two_tiles_and_lists_a_query_without_gallery(univ, tmp_path):
    root = tmp_path / "U"
    shutil.copytree(univ, root)
    d2s = load_manifest(root, split="test", use_cache=False)
    lone = d2s.place_ids[0]
    shutil.rmtree(root / "test" / "gallery_satellite" / lone)
    with pytest.warns(UserWarning, match=f"gallery has no image of building {lone}"):
        m = load_manifest(root, split="test", use_cache=False)
    assert m.skipped == DRONE_VIEWS and lone not in m.place_ids
    other = d2s.place_ids[-1]
    tile = root / "test" / "gallery_satellite" / other / f"{other}.jpg"
    shutil.copy(tile, tile.with_name("extra.jpg"))
    with pytest.raises(DataError, match=f"{tile.parent}: a satellite folder holds one tile per "
                                        "building, found 2 images"):
        load_manifest(root, split="test", use_cache=False)


def test_preset_and_cli_synth_check_train_eval(univ, tmp_path):
    """synth -> data check -> train (1 epoch, tiny model) -> eval both directions -> embed."""
    preset = load_config("sample4geo-university")
    assert not preset["model"]["bev"]["enabled"] and preset["data"]["dataset"] == "university"
    report = json.loads(_run("data", "check", univ, "--json"))
    assert (report["dataset"], report["usable"], report["query_kind"]) == (
        "university", True, "perspective")
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no coordinates: no GPS neighbours (said, and expected)
        _run("train", "--config", "sample4geo-university", "--data", univ, "--out", out,
             "model.backbone=resnet18", "model.pretrained=null", "data.query_size=[32,32]",
             "data.reference_size=[32,32]", "data.augment.photometric=false", "train.amp=none",
             "train.epochs=1", "train.batch_size=8", "data.workers=0", "train.device=cpu")
    # a whole epoch: every drone view once (32 queries of 8 tiles, ~4 batches), and the lr
    # schedule spans it (it used to count tiles / batch = 1 step and then stay at 0)
    steps = json.loads((out / "summary.json").read_text())["steps"]
    rates = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "step"]
    assert steps >= 3 and len(rates) == steps and min(rates) > 0
    checkpoint = out / "checkpoints" / "last"
    for mode, queries in (("drone-satellite", 24), ("satellite-drone", 6)):
        path = tmp_path / f"{mode}.json"
        _run("eval", "--checkpoint", checkpoint, "--data", univ, "--vigor-mode", mode,
             "--json", path, "--workers", "0", "--device", "cpu")
        metrics = json.loads(path.read_text())
        assert metrics["queries"] == queries and 0 < metrics["AP"] <= 100
        assert metrics["R@1"] <= metrics["R@5"] <= 100
    # saved descriptors keep the groups: the same AP without the model
    _run("embed", "--checkpoint", checkpoint, "--data", univ, "--vigor-mode", "satellite-drone",
         "--out", tmp_path / "d.npz", "--workers", "0", "--device", "cpu")
    _run("eval", "--descriptors", tmp_path / "d.npz", "--json", tmp_path / "again.json")
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["AP"] == pytest.approx(metrics["AP"])
