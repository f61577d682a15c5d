import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ssageo.cli import app
from ssageo.config import load_config
from ssageo.data.manifest import Manifest, load_manifest
from ssageo.evaluate.embed import embed_manifest, embed_paths, evaluate_model
from ssageo.evaluate.index import GeoIndex, Localizer
from ssageo.evaluate.metrics import rank_queries
from ssageo.evaluate.tiles import read_tiles_csv
from ssageo.io import DataError, read_image, write_image
from ssageo.model import build_model, load_model, save_model

N_TILES = 10


def make_checkpoint(path, seed=0, overrides=()):
    # query and reference inputs of one size: a tile located as a "panorama" must find itself
    config = load_config(
        "synth-cpu", ["model.backbone=convnext_atto", "model.bev.enabled=false",
                      "data.query_size=[64,64]", *overrides]
    )
    torch.manual_seed(seed)
    model = build_model(
        config["model"], config["data"]["reference_size"], config["data"]["query_size"]
    )
    return save_model(path, model, config)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Ten distinct 64x64 tiles with coordinates, a tiles CSV and a checkpoint."""
    root = tmp_path_factory.mktemp("geo")
    rng = np.random.default_rng(0)
    lines = ["path,lat,lon"]
    coords = np.column_stack([47.0 + np.arange(N_TILES) * 1e-3, 8.0 + np.arange(N_TILES) * 2e-3])
    for i in range(N_TILES):
        # a few coloured blocks per tile, so random-model descriptors still differ clearly
        tile = np.kron(rng.integers(0, 256, size=(4, 4, 3)), np.ones((16, 16, 1))).astype(np.uint8)
        write_image(root / "tiles" / f"t{i}.png", tile)
        lines.append(f"tiles/t{i}.png,{coords[i, 0]},{coords[i, 1]}")
    (root / "tiles.csv").write_text("\n".join(lines) + "\n")
    checkpoint = make_checkpoint(root / "ckpt")
    args = ["--checkpoint", str(checkpoint), "--tiles", str(root / "tiles.csv")]
    result = CliRunner().invoke(app, ["index", "build", *args, "--out", str(root / "index.npz")])
    assert result.exit_code == 0, result.output
    index = GeoIndex.load(root / "index.npz")
    return {
        "root": root,
        "coords": coords,
        "checkpoint": checkpoint,
        "index": index,
        "tiles": [root / "tiles" / f"t{i}.png" for i in range(N_TILES)],
    }


def test_index_file_holds_tiles_coords_and_model_identity(world):
    index = GeoIndex.load(world["root"] / "index.npz")
    assert index.descriptors.shape == (N_TILES, 320) and index.descriptors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(index.descriptors, axis=1), 1, rtol=1e-5)
    np.testing.assert_array_equal(index.coords, world["coords"])
    assert index.tiles == [str(p) for p in world["tiles"]]
    meta = index.metadata
    assert meta["format"] == "ssageo-index" and meta["version"] == 1 and meta["count"] == N_TILES
    assert meta["model"]["backbone"] == "convnext_atto" and len(meta["model_hash"]) == 16
    assert meta["checkpoint"] == str(world["checkpoint"].resolve())


def test_locate_finds_each_tile_itself_and_agrees_with_the_metrics(world):
    import ssageo

    localizer = ssageo.Localizer(world["root"] / "index.npz")
    results = localizer.locate_many(world["tiles"], top_k=3)
    assert [r[0]["tile"] for r in results] == [str(p) for p in world["tiles"]]
    for i, hits in enumerate(results):
        assert [h["rank"] for h in hits] == [1, 2, 3]
        scores = [h["score"] for h in hits]
        assert scores == sorted(scores, reverse=True) and scores[0] == pytest.approx(1, abs=1e-4)
        assert (hits[0]["lat"], hits[0]["lon"]) == tuple(world["coords"][i])
    # the ranking is the metrics' ranking of the same descriptors
    query = localizer.embed(world["tiles"])
    top1 = rank_queries(query, world["index"].descriptors, np.arange(N_TILES))["top1"]
    assert [world["index"].tiles[i] for i in top1] == [r[0]["tile"] for r in results]
    # an in-memory RGB array gives the same answer as its file
    as_array = localizer.locate(read_image(world["tiles"][4]), top_k=N_TILES + 5)
    assert len(as_array) == N_TILES and as_array[0]["tile"] == str(world["tiles"][4])


def test_embed_manifest_and_evaluate_model(world):
    coords = world["coords"]
    manifest = Manifest(
        dataset="vigor",
        split="test",
        root=world["root"],
        layout="test",
        query_paths=world["tiles"][:6],
        reference_paths=world["tiles"],
        prior_paths=[None] * N_TILES,
        positive=np.arange(6),
        semi_positive=np.full((6, 3), -1),
        place_ids=[str(i) for i in range(6)],
        reference_ids=[str(i) for i in range(N_TILES)],
        query_coords=coords[:6],
        reference_coords=coords,
    )
    model, config = load_model(world["checkpoint"])
    config["data"]["workers"] = 0  # loader workers are exercised in the unreadable-image test
    model.train()
    query, reference = embed_manifest(model, manifest, config, batch_size=4, progress=False)
    assert query.shape == (6, 320) and reference.shape == (N_TILES, 320)
    assert model.training  # the caller's mode is restored
    metrics = evaluate_model(model, manifest, config)
    assert metrics["R@1"] == 100.0 and metrics["median_error_m"] == pytest.approx(0, abs=1e-6)
    assert (metrics["queries"], metrics["gallery"]) == (6, N_TILES)


def test_cli_locate_json_and_table(world):
    runner = CliRunner()
    out = world["root"] / "index.npz"
    result = runner.invoke(
        app,
        [
            "locate",
            "--index",
            str(out),
            str(world["tiles"][2]),
            str(world["tiles"][7]),
            "--top-k",
            "2",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert [p["results"][0]["tile"] for p in payload] == [str(world["tiles"][i]) for i in (2, 7)]
    assert payload[1]["results"][0]["lat"] == pytest.approx(world["coords"][7, 0])
    assert all(len(p["results"]) == 2 for p in payload)
    result = runner.invoke(app, ["locate", "--index", str(out), str(world["tiles"][0])])
    assert result.exit_code == 0 and "score" in result.output


def test_index_of_another_model_or_other_weights_is_refused(world, tmp_path):
    other = make_checkpoint(tmp_path / "other", overrides=["data.query_size=[64,128]"])
    with pytest.raises(DataError, match="does not match index") as err:
        Localizer(world["root"] / "index.npz", other)
    assert str(other) in str(err.value)
    retrained = make_checkpoint(tmp_path / "retrained", seed=1)
    with pytest.raises(DataError, match="different weights"):
        Localizer(world["root"] / "index.npz", retrained)


def test_bad_inputs_give_one_line_errors_naming_the_path(world, tmp_path):
    localizer = Localizer(world["root"] / "index.npz", world["checkpoint"])
    broken = tmp_path / "photo.jpg"
    broken.write_text("not an image")
    with pytest.raises(DataError, match="photo.jpg: cannot decode image"):
        localizer.locate(broken)
    # an index whose descriptors have another dimension than the model's
    index = GeoIndex.load(world["root"] / "index.npz")
    index.descriptors = np.pad(index.descriptors, ((0, 0), (0, 1)))
    index.metadata = {**index.metadata, "descriptor_dim": 321}
    index.save(tmp_path / "wide.npz")
    with pytest.raises(DataError, match="wide.npz: descriptor dimension mismatch"):
        Localizer(tmp_path / "wide.npz").locate(world["tiles"][0])
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(DataError, match="junk.npz: not an ssageo index"):
        Localizer(tmp_path / "junk.npz")
    csv = tmp_path / "tiles.csv"
    csv.write_text("a.png,47.0,8.0\nb.png,north,8.0\n")
    with pytest.raises(DataError, match="tiles.csv:2: lat/lon are not numbers"):
        read_tiles_csv(csv)
    # a UTF-8 BOM (as spreadsheet programs write) is simply read; binary data is named by line
    csv.write_bytes("\ufeffpath,lat,lon\na.png,47.0,8.0\n".encode())
    paths, coords = read_tiles_csv(csv)
    assert [p.name for p in paths] == ["a.png"] and coords.tolist() == [[47.0, 8.0]]
    csv.write_bytes(b"a.png,47.0,8.0\n\x00\x01\x02,1,2\n")
    with pytest.raises(DataError, match="tiles.csv:2"):
        read_tiles_csv(csv)


def test_embed_paths_refuses_unreadable_images(world, tmp_path):
    model, _ = load_model(world["checkpoint"])
    for workers in (0, 1):  # a loader worker's error is one line too, naming the file
        with pytest.raises(DataError, match="missing.png: image file is missing") as err:
            embed_paths(
                model,
                [tmp_path / "missing.png"],
                (64, 64),
                "reference",
                workers=workers,
                progress=False,
            )
        assert "\n" not in str(err.value) and str(err.value).startswith(str(tmp_path))


def test_cli_embed_eval_and_index_on_a_synth_vigor_world(synth_world, tmp_path):
    root = synth_world("vigor")
    checkpoint = make_checkpoint(tmp_path / "ckpt", overrides=())
    runner = CliRunner()
    common = ["--checkpoint", str(checkpoint), "--data", str(root), "--workers", "0"]
    result = runner.invoke(app, ["embed", *common, "--out", str(tmp_path / "d.npz")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["eval", *common, "--json", str(tmp_path / "direct.json")])
    assert result.exit_code == 0, result.output
    assert "hit_rate" in result.output and "median_error_m" in result.output
    result = runner.invoke(
        app, ["eval", "--descriptors", str(tmp_path / "d.npz"), "--json", str(tmp_path / "f.json")]
    )
    assert result.exit_code == 0, result.output
    direct = json.loads((tmp_path / "direct.json").read_text())
    crop = {"fov": 360.0, "heading": "north", "heading_seed": 0}  # queries as evaluated
    assert {**json.loads((tmp_path / "f.json").read_text()), **crop} == direct
    saved = np.load(tmp_path / "d.npz")
    assert (
        (direct["queries"], direct["gallery"])
        == (20, 196)
        == (len(saved["query"]), len(saved["reference"]))
    )
    assert saved["semi_positive"].shape == (20, 3) and saved["reference_coords"].shape == (196, 2)

    out = tmp_path / "vigor-index.npz"
    result = runner.invoke(
        app, ["index", "build", *common[:4], "--split", "test", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    index = GeoIndex.load(out)
    np.testing.assert_array_equal(index.coords, saved["reference_coords"])
    panorama = load_manifest(root, split="test").query_paths[0]
    hits = Localizer(out).locate(panorama, top_k=5)
    # the best tile scores what the saved descriptors say the best tile scores
    best = float((saved["reference"] @ saved["query"][0]).max())
    assert hits[0]["score"] == pytest.approx(best, abs=1e-4)
    assert hits[0]["tile"] in index.tiles and len(hits) == 5


def _index_arrays(path):
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def _corrupt(arrays, change):
    arrays = dict(arrays)
    meta = json.loads(str(arrays["metadata"]))
    if change == "nan row":
        arrays["descriptors"] = arrays["descriptors"].copy()
        arrays["descriptors"][3, 5] = np.nan
    elif change == "inf row":
        arrays["descriptors"] = arrays["descriptors"].copy()
        arrays["descriptors"][0, 0] = np.inf
    elif change == "unnormalised":
        arrays["descriptors"] = arrays["descriptors"] * 2
    elif change == "latitude":
        arrays["coords"] = arrays["coords"].copy()
        arrays["coords"][2, 0] = 91.0
    elif change == "longitude":
        arrays["coords"] = arrays["coords"].copy()
        arrays["coords"][2, 1] = -180.5
    elif change == "no coords":
        del arrays["coords"]
    elif change == "no weights hash":
        del meta["weights_sha256"]
    elif change == "string descriptors":
        arrays["descriptors"] = arrays["descriptors"].astype(str)
    elif change == "float16 descriptors":
        arrays["descriptors"] = arrays["descriptors"].astype(np.float16)
    arrays["metadata"] = np.asarray(json.dumps(meta))
    return arrays


@pytest.mark.parametrize(("change", "message"), [
    ("nan row", "1 descriptor rows hold NaN or infinite values (first: row 3"),
    ("inf row", "NaN or infinite values (first: row 0"),
    ("unnormalised", "descriptors are not L2-normalised"),
    ("latitude", "1 impossible coordinates (first: row 2, lat 91.0"),
    ("longitude", "impossible coordinates (first: row 2"),
    ("no coords", "index lacks coords"),
    ("no weights hash", "index lacks metadata.weights_sha256"),
    ("string descriptors", "descriptors <U"),
    ("float16 descriptors", "descriptors float16 (must be float32)"),
    ("truncated", "not an ssageo index or truncated"),
])
def test_a_damaged_index_is_refused_on_load_naming_file_and_fault(world, tmp_path, change,
                                                                   message):
    bad = tmp_path / "bad.index.npz"
    good = world["root"] / "index.npz"
    if change == "truncated":
        bad.write_bytes(good.read_bytes()[: good.stat().st_size * 2 // 3])
    else:
        np.savez(bad, **_corrupt(_index_arrays(good), change))
    with pytest.raises(DataError, match=re.escape(message)) as err:
        GeoIndex.load(bad)
    assert str(err.value).startswith(f"{bad}: ") and "\n" not in str(err.value)
    result = CliRunner().invoke(app, ["locate", "--index", str(bad), str(world["tiles"][0])])
    assert isinstance(result.exception, DataError)  # locate refuses it the same way


@pytest.mark.slow
def test_index_hashes_the_weights_it_embedded_with_while_the_checkpoint_is_replaced(tmp_path):
    """A training run replaces ``last`` while an index is built from it: the index must pair
    its descriptors with the hash of the weights that made them, never of the newer file."""
    old = make_checkpoint(tmp_path / "old", seed=0)
    new = make_checkpoint(tmp_path / "new", seed=1)
    live = tmp_path / "last"
    shutil.copytree(old, live)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(96):  # enough tiles that embedding outlasts the replacement below
        tile = np.kron(rng.integers(0, 256, size=(4, 4, 3)), np.ones((16, 16, 1)))
        write_image(tmp_path / "tiles" / f"{i}.png", tile.astype(np.uint8))
        rows.append(f"tiles/{i}.png,47.0,8.{i}")
    (tmp_path / "tiles.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "index.npz"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ssageo", "index", "build", "--checkpoint", str(live), "--tiles",
         str(tmp_path / "tiles.csv"), "--out", str(out), "--batch-size", "4", "--device", "cpu"],
        stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    seen = b""
    while b"embed reference" not in seen:  # the progress bar: weights loaded, embedding begun
        chunk = os.read(proc.stderr.fileno(), 4096)
        assert chunk, f"index build ended early: {seen.decode(errors='replace')}"
        seen += chunk
    # replaced the way a checkpoint is saved: a new file renamed over the old one
    shutil.copy(new / "model.safetensors", live / ".swap")
    os.replace(live / ".swap", live / "model.safetensors")
    proc.stderr.read()
    assert proc.wait(timeout=300) == 0
    index = GeoIndex.load(out)
    assert index.metadata["weights_sha256"] == hashlib.sha256(
        (old / "model.safetensors").read_bytes()).hexdigest()
    model, _ = load_model(old)
    expected = embed_paths(model, [tmp_path / "tiles" / "0.png"], (64, 64), "reference",
                           progress=False)
    np.testing.assert_allclose(index.descriptors[0], expected[0], atol=1e-5)
    # so the live (new) checkpoint is refused for it, and the old one accepted
    with pytest.raises(DataError, match="different weights"):
        Localizer(out, live)
    Localizer(out, old)


def test_index_build_from_a_dataset_takes_every_split_once(synth_world, tmp_path):
    root = synth_world("cvusa")
    checkpoint = make_checkpoint(tmp_path / "ckpt")
    runner = CliRunner()
    common = ["index", "build", "--checkpoint", str(checkpoint), "--data", str(root),
              "--workers", "0", "--device", "cpu"]
    result = runner.invoke(app, [*common, "--out", str(tmp_path / "all.npz")])
    assert result.exit_code == 0, result.output
    assert "cvusa train+val: 40 distinct satellite tiles" in result.output
    index = GeoIndex.load(tmp_path / "all.npz")
    train, val = (load_manifest(root, split=s) for s in ("train", "val"))
    assert sorted(index.tiles) == sorted(map(str, train.reference_paths + val.reference_paths))
    assert "cvusa train+val" in index.metadata["source"]
    result = runner.invoke(app, [*common, "--split", "val", "--out", str(tmp_path / "val.npz")])
    assert result.exit_code == 0, result.output
    assert GeoIndex.load(tmp_path / "val.npz").tiles == list(map(str, val.reference_paths))
