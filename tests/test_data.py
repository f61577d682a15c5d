"""Readers, detection, manifest cache and GPS neighbours on `ssageo synth` output."""

import json
import shutil

import numpy as np
import pytest

import ssageo.data.cvusa
import ssageo.data.manifest
from ssageo.data import (
    EARTH_RADIUS_M,
    cache_dir_for,
    detect_dataset,
    gps_neighbours,
    haversine,
    load_manifest,
)
from ssageo.data.textfile import read_csv_rows
from ssageo.io import DataError


def _counts(root):
    return json.loads((root / "world.json").read_text())["counts"]


def test_cvusa_splits_gps_and_priors(synth_world):
    root = synth_world("cvusa")
    counts = _counts(root)
    for split in ("train", "val"):
        m = load_manifest(root, split=split)
        assert (m.dataset, m.layout, m.num_queries) == ("cvusa", "cvusa", counts[split])
        assert m.num_references == m.num_queries and np.array_equal(m.positive,
                                                                    np.arange(m.num_queries))
        assert all(p.is_file() for p in m.query_paths + m.reference_paths)
        assert [p.stem for p in m.reference_paths] == m.place_ids
        assert m.prior_coverage == 1.0 and m.has_priors and not m.missing
        rows = np.loadtxt(root / "split_locations/all.csv", delimiter=",")
        ids = np.array([int(i) for i in m.place_ids])
        np.testing.assert_allclose(m.reference_coords, rows[ids - 1, :2])
    with pytest.raises(DataError, match="CVUSA has no separate 'test' split"):
        load_manifest(root, split="test")


def test_cvact_train_val_and_test(synth_world):
    root = synth_world("cvact")
    counts = _counts(root)
    seen = set()
    for split in ("train", "val", "test"):
        m = load_manifest(root, split=split)
        assert m.num_queries == counts[split] and m.utm.shape == (m.num_queries, 2)
        folder = "ANU_data_test" if split == "test" else "ANU_data_small"
        assert all(p.relative_to(root).parts[0] == folder for p in m.query_paths)
        assert m.query_paths[0].name == f"{m.place_ids[0]}_grdView.jpg"
        assert m.has_priors and m.query_coords is None
        seen |= set(m.place_ids)
    assert len(seen) == sum(counts.values())  # splits are disjoint


@pytest.mark.parametrize("mode", ["same-area", "cross-area"])
def test_vigor_gallery_positives_semipositives_offsets(synth_world, mode):
    root = synth_world("vigor")
    counts = _counts(root)
    tiles = {c: v["tiles"] for c, v in counts.items()}
    for split in ("train", "test"):
        m = load_manifest(root, split=split, vigor_mode=mode)
        cities = {q.relative_to(root).parts[0] for q in m.query_paths}
        if mode == "cross-area":
            assert cities == ({"NewYork", "Seattle"} if split == "train"
                              else {"Chicago", "SanFrancisco"})
        else:
            assert len(cities) == 4
        assert m.num_references == sum(tiles[c] for c in cities)  # every tile of those cities
        assert m.semi_positive.shape == (m.num_queries, 3)
        assert (m.semi_positive != m.positive[:, None]).all()
        # The panorama lies at tile pixel (H/2 + dy, W/2 - dx): check it against the GPS.
        mpp = json.loads((root / "world.json").read_text())["metres_per_pixel"]
        tile = m.reference_coords[m.positive]
        north_m = (tile[:, 0] - m.query_coords[:, 0]) * np.pi / 180 * EARTH_RADIUS_M
        np.testing.assert_allclose(north_m, m.offsets[:, 0, 0] * mpp, atol=mpp)
        east_m = (haversine(tile[:, 0], tile[:, 1], tile[:, 0], m.query_coords[:, 1])
                  * EARTH_RADIUS_M * np.sign(tile[:, 1] - m.query_coords[:, 1]))
        np.testing.assert_allclose(east_m, m.offsets[:, 0, 1] * mpp, atol=mpp)
    with pytest.raises(DataError, match="VIGOR has no 'val' split"):
        load_manifest(root, split="val")


def test_vigor_sample4geo_layout_reads_the_same(synth_world, tmp_path):
    src = synth_world("vigor")
    root = tmp_path / "vigor-s4g"
    shutil.copytree(src / "splits", root / "splits")
    for city in ("Chicago", "NewYork", "SanFrancisco", "Seattle"):
        for old, new in (("panorama", "ground"), ("satellite", "satellite"),
                         ("sat_BEV_label", "sat_BEV_label")):
            shutil.copytree(src / city / old, root / new / city)
    a = load_manifest(src, split="test")
    b = load_manifest(root, split="test")
    assert (a.layout, b.layout) == ("vigor-official", "vigor-sample4geo")
    assert a.place_ids == b.place_ids and np.array_equal(a.positive, b.positive)
    assert b.has_priors and all(p.is_file() for p in b.query_paths)


def test_detection_and_explicit_override(synth_world, tmp_path):
    for layout in ("cvusa", "cvact", "vigor"):
        assert detect_dataset(synth_world(layout)) == layout
    with pytest.raises(DataError, match="looks like VIGOR"):
        load_manifest(synth_world("vigor"), dataset="cvusa")
    with pytest.raises(DataError, match="does not look like any supported dataset"):
        detect_dataset(tmp_path)
    with pytest.raises(DataError, match=r"found in subfolders: world/ \(CVACT\)"):
        detect_dataset(synth_world("cvact").parent)


def test_manifest_is_cached_and_rebuilt_when_the_split_changes(synth_world, tmp_path,
                                                               monkeypatch):
    root = tmp_path / "cvusa"
    shutil.copytree(synth_world("cvusa"), root)
    calls = []
    real = ssageo.data.cvusa.read
    monkeypatch.setattr(ssageo.data.cvusa, "read", lambda *a: calls.append(1) or real(*a))
    first = load_manifest(root)
    again = load_manifest(root)
    assert len(calls) == 1 and again.query_paths == first.query_paths
    assert list((root / ".ssageo_cache").glob("manifest-cvusa-train-*.npz"))
    csv = root / "splits/train-19zl.csv"
    csv.write_text("".join(csv.read_text().splitlines(keepends=True)[:-3]))
    shorter = load_manifest(root)
    assert len(calls) == 2 and shorter.num_queries == first.num_queries - 3
    load_manifest(root, cache_dir=tmp_path / "elsewhere")
    assert list((tmp_path / "elsewhere").glob("manifest-*.npz"))
    # GPS neighbour lists follow the manifest's key: the edited split gets its own list
    gps_neighbours(first, k=4)
    assert gps_neighbours(shorter, k=4).shape == (shorter.num_queries, 4)
    assert len(list((root / ".ssageo_cache").glob("neighbours-cvusa-train-*-k4.npy"))) == 2


def test_read_only_dataset_caches_in_the_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(ssageo.data.manifest.os, "access", lambda path, mode: False)
    where = cache_dir_for(tmp_path / "data")
    assert where.parent == tmp_path / "xdg" / "ssageo"


def _brute_force(coords, k):
    d = haversine(coords[:, None, 0], coords[:, None, 1], coords[None, :, 0], coords[None, :, 1])
    np.fill_diagonal(d, np.inf)
    return np.sort(d, axis=1)[:, :k], d


def test_gps_neighbours_are_the_nearest_by_haversine_and_cached(synth_world, tmp_path):
    m = load_manifest(synth_world("cvusa"))
    nb = gps_neighbours(m, k=10, cache_dir=tmp_path)
    assert nb.shape == (m.num_queries, 10)
    assert not (nb == np.arange(m.num_queries)[:, None]).any()
    want, dist = _brute_force(m.query_coords, 10)
    got = np.take_along_axis(dist, nb, axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-9)  # same distances, nearest first
    cached = list(tmp_path.glob("neighbours-cvusa-train-*-k10.npy"))
    assert len(cached) == 1
    np.save(cached[0], np.zeros_like(nb))  # a second call must read the cache, not recompute
    assert (gps_neighbours(m, k=10, cache_dir=tmp_path) == 0).all()
    assert gps_neighbours(m, k=500, cache_dir=tmp_path).shape == (m.num_queries,
                                                                  m.num_queries - 1)


def test_gps_neighbours_vigor_skip_same_tile_and_cvact_use_utm(synth_world):
    m = load_manifest(synth_world("vigor"))
    nb = gps_neighbours(m, k=8)
    assert (m.positive[nb] != m.positive[:, None]).all()
    centre = m.reference_coords[m.positive]
    d = haversine(centre[:, None, 0], centre[:, None, 1], centre[nb][..., 0], centre[nb][..., 1])
    assert (np.diff(d, axis=1) >= -1e-12).all()

    c = load_manifest(synth_world("cvact"))
    nb = gps_neighbours(c, k=5)
    dist = np.linalg.norm(c.utm[:, None] - c.utm[None], axis=2)
    np.fill_diagonal(dist, np.inf)
    np.testing.assert_allclose(np.take_along_axis(dist, nb, 1), np.sort(dist, 1)[:, :5])


@pytest.mark.parametrize("prefix", [b"", b"\xef\xbb\xbf"], ids=["plain", "bom"])
def test_csv_rows_read_a_bom_like_pandas_and_refuse_binary(tmp_path, prefix):
    """The shared reader of the text index files (split CSVs, tile CSVs)."""
    path = tmp_path / "tiles.csv"
    path.write_bytes(prefix + b'path,lat,lon\r\n\r\n"a b.png",41.5,-87.6\nc.png,1,2\n')
    rows = read_csv_rows(path, "tiles CSV")
    assert rows == [(1, ["path", "lat", "lon"]), (3, ["a b.png", "41.5", "-87.6"]),
                    (4, ["c.png", "1", "2"])]
    path.write_bytes(prefix + b"c.png,1,2\n" + bytes(range(256)))
    with pytest.raises(DataError, match=rf"^{path}:2: binary data \(NUL byte\), not a tiles CSV$"):
        read_csv_rows(path, "tiles CSV")
