"""``pairs``: a CSV of the user's own query/tile pairs is a dataset like the others."""

import csv
import json
import warnings

import numpy as np
import pytest
from typer.testing import CliRunner

from ssageo.cli import app
from ssageo.data import detect_dataset, gps_neighbours, load_manifest
from ssageo.data.base import SplitUnavailable
from ssageo.io import DataError


def export_pairs(world, out, prior=False, split_of=None):
    """Write a synth CVUSA world's split files (``splits/*-19zl.csv`` + ``all.csv``) as a pairs
    CSV at ``out``, whose folder holds the world as ``world/`` (a link). ``split_of`` maps a
    CVUSA split to the one written (default: the same)."""
    (out.parent / "world").symlink_to(world, target_is_directory=True)
    gps = np.loadtxt(world / "split_locations/all.csv", delimiter=",", ndmin=2)
    rows = [["query", "reference", "split", "lat", "lon"] + (["prior"] if prior else [])]
    for split in ("train", "val"):
        for line in (world / f"splits/{split}-19zl.csv").read_text().splitlines():
            sat, pano, _ = line.split(",")
            place = int(sat.split("/")[-1].split(".")[0])
            lat, lon = gps[place - 1, 2:4]  # the ground (query) position
            row = [f"world/{pano}", f"world/{sat}", (split_of or {}).get(split, split),
                   repr(float(lat)), repr(float(lon))]
            rows.append(row + ([f"world/sat_BEV_label/19/{place:07d}.png"] if prior else []))
    with open(out, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return out


@pytest.fixture(scope="module")
def pairs_csv(synth_world, tmp_path_factory):
    return export_pairs(synth_world("cvusa"), tmp_path_factory.mktemp("pairs") / "pairs.csv")


def _relative(manifest, root):
    return {name: [None if p is None else p.relative_to(root).as_posix()
                   for p in getattr(manifest, name)]
            for name in ("query_paths", "reference_paths", "prior_paths")}


@pytest.mark.parametrize("prior", [False, True], ids=["prior-by-convention", "prior-column"])
def test_pairs_exported_from_a_cvusa_world_give_the_cvusa_manifest(synth_world, tmp_path, prior):
    world = synth_world("cvusa")
    path = export_pairs(world, tmp_path / "pairs.csv", prior=prior)
    assert detect_dataset(path) == "pairs" and detect_dataset(world) == "cvusa"
    for split in ("train", "val"):
        ours, theirs = load_manifest(path, split=split), load_manifest(world, split=split)
        assert (ours.dataset, ours.layout, ours.root) == ("pairs", "pairs", tmp_path)
        assert _relative(ours, tmp_path / "world") == _relative(theirs, world)
        for name in ("positive", "semi_positive", "query_coords", "reference_coords"):
            np.testing.assert_array_equal(getattr(ours, name), getattr(theirs, name), name)
        assert ours.place_ids == theirs.place_ids and ours.reference_ids == theirs.reference_ids
        assert ours.has_priors and not ours.missing and ours.utm is None
        # the cached copy (beside the CSV) reads back the same
        again = load_manifest(path, split=split)
        assert again.query_paths == ours.query_paths and again.key == ours.key
    assert list((tmp_path / ".ssageo_cache").glob("manifest-pairs-train-*.npz"))
    with pytest.raises(SplitUnavailable, match=r"pairs\.csv: no pairs with split 'test' \(it "
                                               r"lists train, val\)"):
        load_manifest(path, split="test")


def _write(tmp_path, text, images=("q.jpg", "t.jpg")):
    from ssageo.io import write_image

    for name in images:
        write_image(tmp_path / name, np.zeros((8, 8, 3), np.uint8))
    path = tmp_path / "pairs.csv"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, line, message", [
    ("query,reference\nq.jpg,t.jpg\n", 1,
     r"header must be query,reference,split\[,lat,lon\]\[,prior\], got 'query,reference'$"),
    ("query,reference,split,lat\nq.jpg,t.jpg,train,1\n", 1, "header must be"),
    ("query,reference,split\nq.jpg,t.jpg\n", 2, r"expected 3 columns \(query,reference,split\)"),
    ("query,reference,split\nq.jpg,t.jpg,training\n", 2, "split must be one of train, val, test"),
    ("query,reference,split,lat,lon\nq.jpg,t.jpg,train,north,8\n", 2, "lat/lon are not numbers"),
    ("query,reference,split,lat,lon\nq.jpg,t.jpg,train,91,8\n", 2, "lat/lon out of range"),
    ("query,reference,split\n/etc/q.jpg,t.jpg,train\n", 2, "absolute path '/etc/q.jpg'"),
    ("query,reference,split\nq.jpg,../t.jpg,train\n", 2,
     "path '../t.jpg' escapes the dataset root"),
    ("query,reference,split\nq.jpg,,train\n", 2, "empty path entry"),
    ("query,reference,split\nq.jpg,t.jpg,train\n\nq.jpg,t.jpg,val\n", 4,
     "query q.jpg is already listed on line 2"),
    ("query,reference,split,prior\nq.jpg,t.jpg,train,a.png\nr.jpg,t.jpg,train,b.png\n", 3,
     "tile t.jpg has the prior a.png on line 2, here b.png$"),
])
def test_bad_rows_are_one_line_errors_with_file_and_line(tmp_path, text, line, message):
    path = _write(tmp_path, text, images=("q.jpg", "r.jpg", "t.jpg", "a.png", "b.png"))
    with pytest.raises(DataError, match=rf"^{path}:{line}: {message}"):
        load_manifest(path, use_cache=False)


def test_empty_csv_other_files_and_the_wrong_dataset_are_refused(tmp_path, synth_world):
    empty = _write(tmp_path, "")
    with pytest.raises(DataError, match=r"pairs CSV is empty \(expected the header"):
        load_manifest(empty)
    header_only = _write(tmp_path, "query,reference,split\n")
    with pytest.raises(DataError, match="has a header but no pairs"):
        load_manifest(header_only)
    (tmp_path / "pairs.txt").write_text("q.jpg,t.jpg,train\n")
    with pytest.raises(DataError, match="does not look like any supported dataset layout .*"
                                        "; pairs CSV: a .csv file with the header"):
        detect_dataset(tmp_path / "pairs.txt")
    with pytest.raises(DataError, match="expected a pairs CSV layout .* looks like CVUSA"):
        load_manifest(synth_world("cvusa"), dataset="pairs")


def test_queries_sharing_a_tile_share_its_positive_and_never_neighbour(tmp_path):
    rows = ["query,reference,split,lat,lon"]
    images = []
    for i in range(6):  # two panoramas per tile, three tiles, 1 km apart
        tile = f"tiles/t{i // 2}.png"
        rows.append(f"panos/p{i}.jpg,{tile},train,{47 + 0.01 * (i // 2) + 1e-5 * i},8.0")
        images += [f"panos/p{i}.jpg", tile]
    path = _write(tmp_path, "\n".join(rows) + "\n", images=sorted(set(images)))
    m = load_manifest(path)
    assert m.num_queries == 6 and m.num_references == 3
    np.testing.assert_array_equal(m.positive, [0, 0, 1, 1, 2, 2])
    np.testing.assert_allclose(m.reference_coords[:, 0], 47 + np.array([0, 0.01, 0.02])
                               + 1e-5 * np.array([0.5, 2.5, 4.5]))
    assert m.prior_paths == [None] * 3 and not m.has_priors  # no satellite folder: no label
    nb = gps_neighbours(m, k=4)
    assert nb.shape == (6, 4) and (m.positive[nb] != m.positive[:, None]).all()


def test_missing_images_skip_their_pair_and_say_so(tmp_path):
    path = _write(tmp_path, "query,reference,split,lat,lon\nq.jpg,t.jpg,train,47,8\n"
                            "gone.jpg,t.jpg,train,47,8\n")
    with pytest.warns(UserWarning, match=r"1 pair\(s\) skipped .*gone\.jpg: missing"):
        m = load_manifest(path)
    assert m.num_queries == 1 and m.skipped == 1


def test_csv_through_check_train_eval_index_and_locate(pairs_csv, tmp_path):
    """The whole CLI on a pairs CSV: check -> train (1 step) -> eval -> index build -> locate."""
    runner = CliRunner()

    def run(*args):
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        return result.output

    report = json.loads(run("data", "check", pairs_csv, "--json"))
    assert (report["dataset"], report["usable"], report["unavailable_splits"]) == (
        "pairs", True, ["test"])
    assert report["gps"]["available"] and report["query_kind"] == "panorama"
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run("train", "--data", pairs_csv, "--out", out, "train.epochs=1",
            "train.max_steps_per_epoch=1", "train.batch_size=8", "data.workers=0",
            "train.sampling.similarity=false", "model.backbone=convnext_atto",
            "model.bev.depth_bins=4")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["best_val_R@1"] is not None
    checkpoint = out / "checkpoints" / "best"
    run("eval", "--checkpoint", checkpoint, "--data", pairs_csv, "--json", tmp_path / "m.json",
        "--workers", "0", "--device", "cpu")
    val = load_manifest(pairs_csv, split="val")
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["queries"] == val.num_queries and "median_error_m" in json.dumps(metrics)
    run("embed", "--checkpoint", checkpoint, "--data", pairs_csv, "--out", tmp_path / "d.npz",
        "--split", "train", "--workers", "0", "--device", "cpu")
    with np.load(tmp_path / "d.npz") as saved:
        assert len(saved["query"]) == load_manifest(pairs_csv).num_queries
    output = run("index", "build", "--checkpoint", checkpoint, "--data", pairs_csv,
                 "--out", tmp_path / "index.npz", "--device", "cpu")
    total = len({*load_manifest(pairs_csv).reference_paths, *val.reference_paths})
    assert f"pairs train+val: {total} distinct satellite tiles" in output
    hits = json.loads(run("locate", val.query_paths[0], "--index", tmp_path / "index.npz",
                          "--top-k", "3", "--json", "--device", "cpu"))
    assert len(hits[0]["results"]) == 3
    tiles = {str(p) for p in val.reference_paths} | {
        str(p) for p in load_manifest(pairs_csv).reference_paths}
    assert {h["tile"] for h in hits[0]["results"]} <= tiles


def test_priors_refuse_a_pairs_csv_and_say_where_labels_go(pairs_csv):
    result = CliRunner().invoke(app, ["priors", str(pairs_csv), "--backend", "oracle",
                                      "--no-progress"])
    assert isinstance(result.exception, DataError)  # `ssageo` prints it as one error: line
    assert "for a pairs CSV, give each tile's label in its prior column" in str(result.exception)
    assert not (pairs_csv.parent / "sat_BEV_label").exists()
