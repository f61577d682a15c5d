"""The langsam backend end to end with tiny random GroundingDINO and SAM (no download)."""

import shutil
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ssageo.cli import app, main
from ssageo.config import ConfigError, load_config
from ssageo.io import DataError, read_image, write_image
from ssageo.priors import fuse, list_tiles, run_priors
from ssageo.priors.langsam import LangSamBackend
from ssageo.priors.run import tiles_from_paths
from ssageo.priors.tiny import save_tiny_langsam

PAPER = load_config("priors-langsam")["priors"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: threads only add contention (10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    return save_tiny_langsam(tmp_path_factory.mktemp("weights"), PAPER["prompts"], image_size=64)


@pytest.fixture()
def tiles(tmp_path):
    """Three CVUSA-style tiles, one of them not square, under tmp_path."""
    rng = np.random.default_rng(0)
    sizes = {"0000001": (64, 64), "0000002": (64, 64), "0000003": (48, 80)}
    paths = []
    for name, (h, w) in sizes.items():
        path = tmp_path / "bingmap" / "19" / f"{name}.jpg"
        write_image(path, rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        paths.append(path)
    return tiles_from_paths(tmp_path, paths)


def _backend(models, **changes):
    section = {**PAPER, "detector": models[0], "segmenter": models[1], "device": "cpu",
               "batch_size": 2, **changes}
    return LangSamBackend.from_config(section)


def test_labels_are_written_at_the_prior_paths_with_the_tiles_size(tiny_models, tiles):
    backend = _backend(tiny_models, box_threshold=0.0, text_threshold=0.0)
    summary = run_priors(tiles, backend, progress=False)
    assert (summary.done, summary.skipped, summary.failed) == (3, 0, [])
    for tile in tiles:
        assert tile.prior_path.relative_to(tile.root).as_posix().startswith("sat_BEV_label/19/")
        label = read_image(tile.prior_path, mode="L")
        assert label.shape == read_image(tile.path).shape[:2]
        assert label.dtype == np.uint8 and set(np.unique(label)) <= {0, 255}
    assert 0.0 <= summary.foreground <= 1.0
    # a rerun skips every tile; --force redoes them
    assert run_priors(tiles, backend, progress=False).skipped == 3
    assert run_priors(tiles, backend, force=True, progress=False).done == 3


def test_every_query_is_a_box_at_threshold_zero_and_labels_follow_the_fusion_rule(
    tiny_models, tiles
):
    backend = _backend(tiny_models, box_threshold=0.0, text_threshold=0.0)
    images = [read_image(t.path) for t in tiles]
    boxes = backend.detect(images)
    assert len(boxes) == len(PAPER["prompts"])
    assert all(b.shape == (10, 4) for per_image in boxes for b in per_image)  # 10 queries
    masks = backend.prompt_masks(images)
    for per_image, image in zip(masks, images, strict=True):
        assert all(m.shape == image.shape[:2] for m in per_image.values())
    labels = backend.predict(tiles)
    for per_image, label in zip(masks, labels, strict=True):
        np.testing.assert_array_equal(label, fuse(per_image, backend.classes))


def test_no_detections_give_an_empty_label(tiny_models, tiles):
    backend = _backend(tiny_models, box_threshold=1.0)  # sigmoid scores never exceed 1
    assert all(len(b) == 0 for per_image in backend.detect([read_image(tiles[0].path)])
               for b in per_image)
    (label,) = backend.predict(tiles[:1])
    assert label.shape == (64, 64) and not label.any()


def test_several_classes_give_an_index_map(tiny_models, tiles):
    classes = {"building": "artificial buildings | edifice", "tree": "trees"}
    backend = _backend(tiny_models, box_threshold=0.0, text_threshold=0.0, classes=classes)
    for label in backend.predict(tiles):
        assert set(np.unique(label)) <= {0, 1, 2}


def test_missing_weights_say_what_to_download_and_which_flag(tiny_models, tmp_path):
    with pytest.raises(ConfigError, match=r"grounding-dino-base.*--detector"):
        _backend(tiny_models, detector=None)
    with pytest.raises(DataError, match=r"nowhere.*not found.*sam-vit-huge.*--segmenter"):
        _backend(tiny_models, segmenter=tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no config.json.*--detector"):
        _backend(tiny_models, detector=tmp_path / "empty")


def test_a_tile_that_fails_is_reported_and_the_run_goes_on(tiny_models, tiles):
    tiles[1].path.write_bytes(b"not an image")
    summary = run_priors(tiles, _backend(tiny_models), progress=False)
    assert summary.done == 2 and not summary.ok
    assert [path for path, _ in summary.failed] == [str(tiles[1].path)]
    assert "cannot decode" in summary.failed[0][1]


def test_cli_end_to_end_on_a_synth_world(tiny_models, synth_world, tmp_path):
    root = tmp_path / "world"
    shutil.copytree(synth_world("cvusa"), root)
    result = CliRunner().invoke(app, [
        "priors", str(root), "--backend", "langsam", "--detector", str(tiny_models[0]),
        "--segmenter", str(tiny_models[1]), "--device", "cpu", "--batch-size", "8", "--force",
        "--set", "priors.box_threshold=0", "--set", "priors.text_threshold=0", "--no-progress",
    ], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "tiles done 40, skipped (already there) 0, failed 0" in result.output
    for tile in list_tiles(root):
        label = read_image(tile.prior_path, mode="L")
        assert label.shape == (64, 64) and set(np.unique(label)) <= {0, 255}


def test_cli_missing_weights_is_a_one_line_error(synth_world, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys, "argv", [
        "ssageo", "priors", str(synth_world("cvusa")), "--backend", "langsam",
        "--detector", str(tmp_path / "gdino"), "--segmenter", str(tmp_path / "sam"),
    ])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "gdino: GroundingDINO weights directory not found" in err
    assert "IDEA-Research/grounding-dino-base" in err and "--detector" in err


@pytest.mark.parametrize("rule", ["paper", "reference-code"])
def test_named_fusion_rules_combine_the_prompt_masks(tiny_models, tiles, rule):
    backend = _backend(tiny_models, box_threshold=0.0, text_threshold=0.0,
                       classes={"object": rule})
    images = [read_image(t.path) for t in tiles]
    for m, label in zip(backend.prompt_masks(images), backend.predict(tiles), strict=True):
        b, s, t = m["artificial buildings"], m["structures"], m["trees"]
        expected = (b & s) | t if rule == "paper" else b & s & ~t
        np.testing.assert_array_equal(label == 255, expected)
