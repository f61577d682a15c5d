"""`ssageo priors` with the oracle and files backends on generated worlds."""

import logging
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from ssageo.cli import app
from ssageo.data import load_manifest
from ssageo.io import DataError, read_image, write_image
from ssageo.priors import list_tiles, run_priors
from ssageo.priors.files import FilesBackend
from ssageo.synth import CLASS_NAMES

BUILDING, TREE, WATER = (CLASS_NAMES.index(c) for c in ("building", "tree", "water"))


@pytest.fixture()
def world(synth_world, tmp_path):
    """A private copy of the CVUSA-layout synth world without its shipped prior labels."""
    root = tmp_path / "world"
    shutil.copytree(synth_world("cvusa"), root)
    shutil.rmtree(root / "sat_BEV_label")
    return root


def _priors(*args):
    result = CliRunner().invoke(app, ["priors", *map(str, args), "--no-progress"],
                                terminal_width=200)
    return result


def test_oracle_without_corruption_writes_the_truth_where_the_readers_look(world):
    result = _priors(world, "--backend", "oracle")
    assert result.exit_code == 0, result.output
    assert "tiles done 40, skipped (already there) 0, failed 0" in result.output
    assert "mIoU of the written labels vs the truth: 1.0000" in result.output
    for split in ("train", "val"):  # every tile of every split, found by the dataset readers
        manifest = load_manifest(world, split=split, use_cache=False)
        assert all(p is not None and p.suffix == ".png" for p in manifest.prior_paths)
    tile = list_tiles(world)[0]
    truth = read_image(tile.truth_path, mode="L")
    label = read_image(tile.prior_path, mode="L")
    np.testing.assert_array_equal(label, np.where(np.isin(truth, [BUILDING, TREE]), 255, 0))
    rerun = _priors(world, "--backend", "oracle")
    assert "tiles done 0, skipped (already there) 40" in rerun.output


def test_oracle_corruption_is_seeded_and_lowers_the_miou(world):
    args = [world, "--backend", "oracle", "--force", "--erode", "1", "--drop", "0.3",
            "--false-positives", "0.2", "--seed", "3"]
    first = _priors(*args)
    assert first.exit_code == 0, first.output
    miou = float(first.output.split("vs the truth: ")[1].split()[0])
    assert 0.2 < miou < 0.95
    tiles = list_tiles(world)
    labels = [read_image(t.prior_path, mode="L") for t in tiles]
    _priors(*args)
    again = [read_image(t.prior_path, mode="L") for t in tiles]
    assert all((a == b).all() for a, b in zip(again, labels, strict=True))


def test_oracle_several_classes_give_an_index_map(world):
    result = _priors(world, "--backend", "oracle", "--truth-classes", "building",
                     "--truth-classes", "tree,water")
    assert result.exit_code == 0, result.output
    tile = list_tiles(world)[0]
    truth = read_image(tile.truth_path, mode="L")
    label = read_image(tile.prior_path, mode="L")
    expected = np.select([truth == BUILDING, np.isin(truth, [TREE, WATER])], [1, 2], 0)
    np.testing.assert_array_equal(label, expected)
    bad = _priors(world, "--backend", "oracle", "--force", "--truth-classes", "house")
    assert bad.exit_code != 0 and "house" in str(bad.exception)


def _masks_from_truth(world, folder, suffix=".png"):
    """A flat folder of masks named like the tiles, as someone else's priors would be."""
    tiles = list_tiles(world)
    for tile in tiles:
        mask = np.isin(read_image(tile.truth_path, mode="L"), [BUILDING, TREE])
        name = folder / f"{tile.path.stem}{suffix}"
        if suffix == ".npy":
            name.parent.mkdir(parents=True, exist_ok=True)
            np.save(name, mask)
        else:
            write_image(name, (mask * 255).astype(np.uint8))
    return tiles


@pytest.mark.parametrize("suffix", [".png", ".npy"])
def test_files_import_puts_masks_where_the_readers_look(world, tmp_path, suffix):
    tiles = _masks_from_truth(world, tmp_path / "masks", suffix)
    result = _priors(world, "--backend", "files", "--masks", tmp_path / "masks")
    assert result.exit_code == 0, result.output
    assert "tiles done 40" in result.output
    for tile in tiles[:5]:
        truth = np.isin(read_image(tile.truth_path, mode="L"), [BUILDING, TREE])
        np.testing.assert_array_equal(read_image(tile.prior_path, mode="L"), truth * 255)


def test_files_import_rejects_unknown_names_and_wrong_sizes_listing_paths(world, tmp_path):
    masks = tmp_path / "masks"
    tiles = _masks_from_truth(world, masks)
    write_image(masks / "not_a_tile.png", np.zeros((64, 64), np.uint8))
    write_image(masks / ".not_a_tile.png", np.zeros((64, 64), np.uint8))  # dot-files ignored
    with pytest.raises(DataError, match=r"1 mask file\(s\) match no satellite tile") as err:
        FilesBackend(masks, tiles)
    assert str(masks / "not_a_tile.png") in str(err.value)
    assert ".not_a_tile" not in str(err.value)
    (masks / "not_a_tile.png").unlink()
    small = masks / f"{tiles[3].path.stem}.png"
    write_image(small, np.zeros((32, 48), np.uint8))
    with pytest.raises(DataError, match=r"differ in size") as err:
        FilesBackend(masks, tiles)
    assert f"{small}: 48x32, tile {tiles[3].path} is 64x64" in str(err.value)
    assert not any(t.prior_path.exists() for t in tiles)  # nothing written on rejection


def test_files_import_reports_tiles_without_a_mask_and_fails(world, tmp_path, caplog, capsys):
    tiles = _masks_from_truth(world, tmp_path / "masks")
    (tmp_path / "masks" / f"{tiles[0].path.stem}.png").unlink()
    with caplog.at_level(logging.ERROR, logger="ssageo"):
        summary = run_priors(tiles, FilesBackend(tmp_path / "masks", tiles), progress=False)
    assert summary.done == len(tiles) - 1
    assert [p for p, _ in summary.failed] == [str(tiles[0].path)]
    # the library logs the failure (it prints nothing itself); the CLI renders it
    assert [(r.name, r.levelno) for r in caplog.records] == [("ssageo.priors.run", logging.ERROR)]
    assert f"failed {tiles[0].path}: " in caplog.records[0].getMessage()
    assert capsys.readouterr().out == ""
    result = _priors(world, "--backend", "files", "--masks", tmp_path / "masks")
    assert result.exit_code == 1 and "failed 1" in result.output
    assert f"failed {tiles[0].path}: " in result.output


def test_vigor_tiles_are_every_tile_of_every_city(synth_world):
    root = synth_world("vigor")
    tiles = list_tiles(root)
    on_disk = sorted(p.relative_to(root).as_posix() for p in root.glob("*/satellite/*.png"))
    assert [t.rel for t in tiles] == on_disk and len({t.rel.split("/")[0] for t in tiles}) == 4


def test_an_absent_split_says_how_to_label_the_others(synth_world, tmp_path):
    root = tmp_path / "cvact"
    shutil.copytree(synth_world("cvact"), root)
    shutil.rmtree(root / "ANU_data_test")
    with pytest.raises(DataError, match="pass --split train --split val"):
        list_tiles(root)
    tiles = list_tiles(root, splits=["train", "val"])
    assert tiles and all(t.rel.startswith("ANU_data_small/satview_polish/") for t in tiles)
