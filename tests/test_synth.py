"""The synthetic world: orientation conventions, layouts, determinism, resume and bad input."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ssageo.config import ConfigError
from ssageo.data.paths import prior_label_path, truth_label_path
from ssageo.io import read_image
from ssageo.synth import blank_world, finish, generate, render_panorama, render_satellite
from ssageo.synth.world import BUILDING, paint_building

SMALL = {"sat_size": 64, "pano_size": (256, 64)}


def _haversine_m(lat1, lon1, lat2, lon2):
    p1, p2 = np.radians(lat1), np.radians(lat2)
    dlon = np.radians(lon2 - lon1)
    a = np.sin((p2 - p1) / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dlon / 2) ** 2
    return 2 * 6371008.8 * np.arcsin(np.sqrt(a))


@pytest.mark.parametrize("direction", ["north", "east"])
def test_tall_building_lands_where_the_conventions_say(direction):
    world = blank_world((400, 400))
    r0 = c0 = 200  # camera and tile centre (a cell corner)
    roof, wall = np.full(3, 200), np.full(3, 150)
    if direction == "north":  # 15..30 m north, 10 m wide, centred on the camera's column
        paint_building(world, r0 - 60, r0 - 30, c0 - 10, c0 + 10, 30.0, roof, wall)
    else:  # 15..30 m east
        paint_building(world, r0 - 10, r0 + 10, c0 + 30, c0 + 60, 30.0, roof, wall)
    finish(world)
    width, height = 256, 64
    _, pano = render_panorama(world, r0, c0, (width, height), np.random.default_rng(0))
    cols = np.flatnonzero((pano == BUILDING).any(axis=0))
    expected = width // 2 if direction == "north" else 3 * width // 4
    assert len(cols) > 0
    # Column u faces azimuth 360*u/W - 180 clockwise from north.
    assert abs(cols.mean() - expected) < 2
    assert cols.min() > expected - width / 8 and cols.max() < expected + width / 8
    # The building rises above the horizon (row H/2) in those columns.
    assert (pano[: height // 2 - 4, expected] == BUILDING).any()

    _, tile = render_satellite(world, r0, c0, 64, np.random.default_rng(0))
    rows, cols = np.nonzero(tile == BUILDING)
    if direction == "north":  # top part, horizontally centred
        assert rows.max() < 32 and abs(cols.mean() - 31.5) < 1
    else:  # right part, vertically centred
        assert cols.min() >= 32 and abs(rows.mean() - 31.5) < 1


def test_vigor_offsets_and_semi_positives_locate_the_panorama(tmp_path):
    out = tmp_path / "vigor"
    summary = generate(out, layout="vigor", places=8, seed=3, **SMALL)
    size = SMALL["sat_size"]
    mpp = summary["metres_per_pixel"]
    cities = ("Chicago", "NewYork", "SanFrancisco", "Seattle")
    for city in cities:
        tiles = (out / "splits" / city / "satellite_list.txt").read_text().split()
        lines = (out / "splits" / city / "pano_label_balanced.txt").read_text().splitlines()
        train = (out / "splits" / city / "same_area_balanced_train.txt").read_text().splitlines()
        test = (out / "splits" / city / "same_area_balanced_test.txt").read_text().splitlines()
        assert sorted(train + test) == sorted(lines) and train and test
        assert len(lines) == 2
        for line in lines:
            cols = line.split()
            assert len(cols) == 13
            pano, sats = cols[0], cols[1::3]
            assert (out / city / "panorama" / pano).is_file()
            assert len(set(sats)) == 4 and set(sats) <= set(tiles)
            _, lat, lon, tail = pano.split(",")
            assert tail == ".jpg"
            for k, (sat, dy, dx) in enumerate(zip(sats, cols[2::3], cols[3::3], strict=True)):
                assert (out / city / "satellite" / sat).is_file()
                assert (out / prior_label_path(f"{city}/satellite/{sat}")).is_file()
                tlat, tlon = map(float, sat[len("satellite_"):-len(".png")].split("_"))
                north = math.radians(float(lat) - tlat) * 6371008.8
                east = math.radians(float(lon) - tlon) * 6371008.8 * math.cos(math.radians(tlat))
                row, col = size / 2 - north / mpp, size / 2 + east / mpp
                # VIGOR's convention: the panorama is at (H/2 + dy, W/2 - dx).
                assert abs(row - (size / 2 + float(dy))) < 1
                assert abs(col - (size / 2 - float(dx))) < 1
                assert 0 <= row < size and 0 <= col < size  # every listed tile holds the place
                if k == 0:  # the positive: its central quarter holds the place
                    assert abs(float(dy)) <= size / 4 and abs(float(dx)) <= size / 4


def _tree(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def test_same_seed_is_byte_identical_with_or_without_a_pool(tmp_path):
    a = _tree(Path(generate(tmp_path / "a", places=10, seed=0, workers=1, **SMALL)["out"]))
    b = _tree(Path(generate(tmp_path / "b", places=10, seed=0, workers=2, **SMALL)["out"]))
    c = _tree(Path(generate(tmp_path / "c", places=10, seed=1, workers=1, **SMALL)["out"]))
    assert a == b
    assert a.keys() == c.keys()
    assert a["bingmap/19/0000001.jpg"] != c["bingmap/19/0000001.jpg"]
    assert not [name for name in a if Path(name).name.startswith(".")]


def test_cvusa_layout_labels_and_coordinates(tmp_path):
    out = tmp_path / "cvusa"
    summary = generate(out, places=12, seed=2, split="cross-area", **SMALL)
    train = list(csv.reader((out / "splits/train-19zl.csv").open()))
    val = list(csv.reader((out / "splits/val-19zl.csv").open()))
    assert len(train) + len(val) == 12 and train and val
    locs = np.loadtxt(out / "split_locations/all.csv", delimiter=",")
    assert locs.shape == (12, 4)
    for sat, pano, ann in train + val:
        assert read_image(out / pano).shape == (64, 256, 3)
        assert read_image(out / sat).shape == (64, 64, 3)
        assert read_image(out / ann, "L").max() <= 5
        prior = read_image(out / prior_label_path(sat), "L")
        truth = read_image(out / truth_label_path(sat), "L")
        assert prior.shape == truth.shape == (64, 64)
        assert set(np.unique(prior)) <= {0, 255} and truth.max() <= 4
        assert np.array_equal(prior == 255, (truth == 2) | (truth == 3))
    # Coordinates are metric: the closest pair is at least the minimum spacing apart (25 m),
    # and lat/lon distances agree with the tile scale (128 m per tile).
    d = _haversine_m(locs[:, None, 0], locs[:, None, 1], locs[None, :, 0], locs[None, :, 1])
    assert np.min(d[~np.eye(12, dtype=bool)]) >= 25 - 0.5
    assert summary["metres_per_pixel"] == pytest.approx(128 / 64)
    assert summary["class_names"] == ["ground", "road", "building", "tree", "water"]


def test_cvact_mat_file_is_readable_and_consistent(tmp_path):
    from scipy.io import loadmat

    out = tmp_path / "cvact"
    generate(out, layout="cvact", places=10, seed=4, **SMALL)
    mat = loadmat(out / "ACT_data.mat")
    ids = [str(s) for s in mat["panoIds"]]
    assert len(ids) == 10 and all(len(s) == 22 for s in ids)
    assert mat["utm"].shape == (10, 2)
    parts = [mat[s][k][0][0].ravel() for s, k in
             (("trainSet", "trainInd"), ("valSet", "valInd"), ("valSetAll", "valInd"))]
    assert sorted(np.concatenate(parts).tolist()) == list(range(1, 11))  # 1-based, disjoint
    for folder, idx in (("ANU_data_small", parts[0]), ("ANU_data_small", parts[1]),
                        ("ANU_data_test", parts[2])):
        for i in idx:
            pid = ids[i - 1]
            assert (out / folder / "streetview" / f"{pid}_grdView.jpg").is_file()
            assert (out / folder / "satview_polish" / f"{pid}_satView_polish.jpg").is_file()
            assert (out / folder / "sat_BEV_label" / f"{pid}_satView_polish.png").is_file()


# The split structs of ACT_data.mat, fields in file order. Second fields: the names that
# name-based readers (OriCNN, ours) use, at the position Sample4Geo's loaders read. First
# fields: not verified against the real file, whose copies here are stored without content.
REAL_ACT_SPLIT_FIELDS = {"trainSet": ("trainNum", "trainInd"), "valSet": ("valNum", "valInd"),
                         "valSetAll": ("valNum", "valInd")}


def test_cvact_mat_reads_the_way_sample4geo_reads_the_real_file(synth_world):
    from scipy.io import loadmat

    from ssageo.data.cvact import read_mat

    root = synth_world("cvact")
    anu = loadmat(root / "ACT_data.mat")
    ids = anu["panoIds"]
    for struct, fields in REAL_ACT_SPLIT_FIELDS.items():
        assert anu[struct].dtype.names == fields
        # Sample4Geo: `ids[anuData['trainSet'][0][0][1] - 1]` (a (n, 1) index column)
        positional = anu[struct][0][0][1]
        assert positional.shape[1] == 1 and positional.dtype == np.int32
        assert int(anu[struct][0][0][0].item()) == len(positional)
        picked = [str(s) for s in ids[positional - 1].ravel()]
        split = {"trainSet": "train", "valSet": "val", "valSetAll": "test"}[struct]
        by_name, _, index = read_mat(root, split)  # ours: by field name
        assert picked == [by_name[i] for i in index]
    total = sum(len(anu[s][0][0][1]) for s in REAL_ACT_SPLIT_FIELDS)
    assert total == len(ids) == 40


def test_existing_folder_is_refused_resumed_or_overwritten(tmp_path):
    out = tmp_path / "w"
    generate(out, places=8, seed=0, **SMALL)
    reference = _tree(out)
    # Same parameters: resumed; nothing needs rendering.
    assert generate(out, places=8, seed=0, **SMALL)["images_rendered"] == 0
    # Lost images are re-rendered to exactly the same bytes.
    for rel in ("streetview/panos/0000003.jpg", "bingmap/19/0000005.jpg"):
        (out / rel).unlink()
    assert generate(out, places=8, seed=0, **SMALL)["images_rendered"] == 2
    assert _tree(out) == reference
    with pytest.raises(FileExistsError, match="--overwrite"):
        generate(out, places=8, seed=1, **SMALL)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        generate(tmp_path / "other", places=8, **SMALL)
    with pytest.raises(FileExistsError, match="notes.txt: --overwrite refused"):
        generate(tmp_path / "other", places=8, overwrite=True, **SMALL)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    # --overwrite leaves exactly what a fresh run writes: nothing of the old run remains
    generate(out, places=9, seed=1, preview=True, overwrite=True, **SMALL)
    assert _tree(out) != reference
    generate(tmp_path / "fresh", places=9, seed=1, preview=True, **SMALL)
    assert _tree(out) == _tree(tmp_path / "fresh")
    generate(out, places=8, seed=0, overwrite=True, **SMALL)  # preview.png (recorded) goes too
    assert _tree(out) == reference


def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "ssageo", *map(str, args)], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.slow
def test_overwrite_never_deletes_what_synth_did_not_write(tmp_path):
    """The catalogue's data loss: --overwrite on a user's dataset folder without world.json."""
    user = tmp_path / "dataset"
    files = ("bingmap/19/0000001.jpg", "streetview/panos/0000001.jpg", "splits/train-19zl.csv",
             "Chicago/panorama/a.jpg", "world.json")
    for rel in files:
        (user / rel).parent.mkdir(parents=True, exist_ok=True)
        (user / rel).write_text(f"the user's {rel}")
    before = _tree(user)
    small = ["--places", "8", "--sat-size", "64", "--pano-size", "256x64"]
    result = _run_cli("synth", user, "--overwrite", *small)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "--overwrite refused" in result.stderr
    assert f"{user / 'world.json'} and 4 other files" in result.stderr  # names what it keeps
    assert _tree(user) == before
    # A synth folder the user added a file to, or linked a folder of theirs into: refused too.
    world = tmp_path / "world"
    generate(world, places=8, seed=0, **SMALL)
    made = _tree(world)
    (world / "bingmap" / "19" / "mine.jpg").write_text("mine")
    result = _run_cli("synth", world, "--overwrite", "--seed", "1", *small)
    assert result.returncode == 2
    assert "bingmap/19/mine.jpg: --overwrite refused, not written" in result.stderr
    (world / "bingmap" / "19" / "mine.jpg").unlink()
    (world / "linked").symlink_to(user, target_is_directory=True)
    result = _run_cli("synth", world, "--overwrite", "--seed", "1", *small)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "linked: is a symbolic link" in result.stderr and "Traceback" not in result.stderr
    assert _tree(user) == before and _tree(world) == made
    # What an interrupted write leaves (a temporary dot-file of a recorded file) is synth's own.
    (world / "linked").unlink()
    (world / "bingmap" / "19" / ".0000001.jpg.k2j4_x9a.jpg").write_bytes(b"partial")
    result = _run_cli("synth", world, "--overwrite", "--seed", "1", *small)
    assert result.returncode == 0, result.stderr
    assert not list(world.rglob(".*.jpg")) and _tree(world) != made


@pytest.mark.parametrize("kwargs, message", [
    ({"places": 3}, "--places 3 is impossible"),
    ({"sat_size": 4}, "--sat-size 4 is impossible"),
    ({"pano_size": (250, 64)}, "multiple of 4"),
    ({"pano_size": (256, 200)}, "height"),
    ({"layout": "kitti"}, "unknown layout"),
])
def test_impossible_parameters_are_refused(tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        generate(tmp_path / "x", **{"places": 8, **kwargs})
    assert not (tmp_path / "x").exists()


def test_cli_interrupted_run_leaves_only_whole_images_and_rerun_completes(tmp_path):
    out = tmp_path / "cut"
    args = ["synth", str(out), "--places", "60", "--sat-size", "64", "--pano-size", "256x64",
            "--workers", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "ssageo", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and len(list(out.glob("bingmap/19/*.jpg"))) < 5:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    for image in list(out.rglob("*.jpg")) + list(out.rglob("*.png")):
        if not image.name.startswith("."):
            read_image(image)  # every image under its real name decodes completely
    summary = generate(out, places=60, sat_size=64, pano_size=(256, 64))  # the same run: resumed
    assert 0 < summary["images_rendered"] < 120
    assert len(list(out.glob("bingmap/19/*.jpg"))) == 60
    assert len((out / "splits/train-19zl.csv").read_text().splitlines()) == 48


def test_cli_bad_input_is_one_line_and_exit_status_2(tmp_path, monkeypatch, capsys):
    from ssageo.cli import main

    for argv, message in ((["--places", "3"], "--places 3 is impossible"),
                          (["--pano-size", "512by128"], "not of the form WIDTHxHEIGHT")):
        monkeypatch.setattr(sys, "argv", ["ssageo", "synth", str(tmp_path / "x"), *argv])
        with pytest.raises(SystemExit) as exit_info:
            main()
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.strip().count("\n") == 0 and message in err


def test_preview_sheet_shows_query_reference_and_label(tmp_path):
    summary = generate(tmp_path / "p", places=10, preview=True, **SMALL)
    sheet = read_image(Path(summary["preview"]))
    assert sheet.shape[0] >= 160 and sheet.shape[1] > 160 * 4
    assert (sheet[:160, 0:640] != 255).any()
