"""Prior labels with more than two classes reach the loss as classes (issue 15, section 6).

Stored labels are read according to ``model.bev.classes``: class-index maps (0..K-1) as they
are, binary 0/255 labels as 0/1, anything else is refused naming the file. End to end: prior
files written by the real backends -> PairDataset -> BEV loss -> training steps on a real timm
model (convnext_atto at tiny sizes) that lower the BEV loss.
"""

import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from typer.testing import CliRunner

from ssageo.cli import app
from ssageo.config import ConfigError, load_config
from ssageo.data import PairDataset, load_manifest
from ssageo.data.transforms import label_to_classes
from ssageo.io import DataError, read_image
from ssageo.model import build_model
from ssageo.model.losses import ssa_loss
from ssageo.priors.files import FilesBackend
from ssageo.priors.oracle import OracleBackend
from ssageo.priors.run import list_tiles, run_priors
from ssageo.train import train

# synth world classes: ground 0, road 1, building 2, tree 3, water 4 (ssageo.synth.world)
BUILDING, TREE, WATER = 2, 3, 4


def test_class_index_labels_are_kept_and_binary_labels_become_0_1():
    three = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    assert label_to_classes(three, 3).tolist() == three.tolist()  # was all 0 (> 127 threshold)
    eight = np.arange(8, dtype=np.uint8).reshape(2, 4)
    assert label_to_classes(eight, 8).tolist() == eight.tolist()
    binary = np.array([[0, 255], [255, 0]], np.uint8)
    for k in (2, 3, 8):
        assert label_to_classes(binary, k).tolist() == [[0, 1], [1, 0]]
    assert label_to_classes(np.array([[0, 1]], np.uint8), 2).tolist() == [[0, 1]]
    # two classes: JPEG noise around 0/255 still splits at 127
    noisy = np.array([[3, 250], [129, 126]], np.uint8)
    assert label_to_classes(noisy, 2).tolist() == [[0, 1], [1, 0]]
    assert label_to_classes(np.zeros((0, 0), np.uint8), 3).shape == (0, 0)


@pytest.mark.parametrize("label, classes, values", [
    (np.array([[0, 7, 3]], np.uint8), 2, "3, 7"),      # an 8-class map for a 2-class head
    (np.array([[0, 5, 2]], np.uint8), 3, "5"),         # an index beyond K
    (np.array([[0, 255, 4]], np.uint8), 3, "4, 255"),  # neither indices nor exactly 0/255
])
def test_a_label_that_fits_neither_form_is_refused_naming_the_file(label, classes, values):
    with pytest.raises(DataError, match=rf"^x/1\.png: holds value\(s\) {values}, but "
                       rf"model\.bev\.classes is {classes}: .* 0\.\.{classes - 1} or be a "
                       r"binary 0/255 label$"):
        label_to_classes(label, classes, "x/1.png")


def test_pair_dataset_refuses_a_class_count_that_is_not_an_integer_2_to_256(synth_world):
    manifest = load_manifest(synth_world("cvusa"))
    for bad in (1, 257, "8", True):
        with pytest.raises(ConfigError, match="model.bev.classes must be an integer 2..256"):
            PairDataset(manifest, load_config()["data"], train=False, classes=bad)


def _eight_class_map(truth: np.ndarray) -> np.ndarray:
    """A made-up 8-class map from a world truth map: the 5 world classes in the west half,
    building/tree/water as classes 5/6/7 in the east half (so all 8 occur)."""
    label = truth.astype(np.uint8).copy()
    east = np.zeros_like(label, dtype=bool)
    east[:, label.shape[1] // 2:] = True
    for world_class, out in ((BUILDING, 5), (TREE, 6), (WATER, 7)):
        label[east & (truth == world_class)] = out
    return label


@pytest.fixture(scope="module")
def worlds(synth_world, tmp_path_factory):
    """Copies of the session's CVUSA world whose prior labels were rewritten by the real
    backends: 3 classes (oracle: building 1, tree 2) and 8 classes (files backend importing
    .npy class maps unchanged, as VIGOR's map_repro labels are imported)."""
    made = {}
    three = tmp_path_factory.mktemp("three") / "world"
    shutil.copytree(synth_world("cvusa"), three)
    oracle = OracleBackend(three, classes={"building": ["building"], "tree": ["tree"]})
    assert run_priors(list_tiles(three), oracle, force=True, progress=False).ok
    made[3] = three

    eight = tmp_path_factory.mktemp("eight") / "world"
    shutil.copytree(synth_world("cvusa"), eight)
    masks = tmp_path_factory.mktemp("map_repro")
    tiles = list_tiles(eight)
    for tile in tiles:
        np.save(masks / f"{tile.path.stem}.npy",
                _eight_class_map(read_image(tile.truth_path, mode="L")).astype(np.int64))
    source = FilesBackend(masks, tiles, keep_values=True)
    assert run_priors(tiles, source, force=True, progress=False).ok
    made[8] = eight
    return made


def _config(root, classes: int, *extra: str) -> dict:
    return load_config("synth-cpu", [
        f"data.root={root}", "model.backbone=convnext_atto", f"model.bev.classes={classes}",
        "data.workers=0", "train.threads=1", *extra])


@pytest.mark.parametrize("classes", [3, 8])
def test_multi_class_priors_reach_the_loss_and_training_lowers_the_bev_loss(worlds, classes):
    cfg = _config(worlds[classes], classes)
    manifest = load_manifest(worlds[classes])
    dataset = PairDataset(manifest, cfg["data"], train=False, classes=classes)
    # the dataset's class map is the label file's content, not a thresholded copy of it
    first = dataset[0]["prior"].numpy()
    stored = read_image(manifest.prior_paths[int(manifest.positive[0])], mode="L")
    assert np.array_equal(first, stored)
    batch = next(iter(DataLoader(dataset, batch_size=6)))
    values = set(batch["prior"].unique().tolist())
    assert values <= set(range(classes)) and len(values) >= 3  # the old > 127 rule: {0}

    torch.manual_seed(0)
    model = build_model(cfg["model"], cfg["data"]["reference_size"], cfg["data"]["query_size"],
                        cfg["loss"]["logit_scale_init"])
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    bev = []
    for _ in range(6):
        outputs = model(batch["query"], batch["reference"])
        assert outputs["bev_logits"].shape[1] == classes
        losses = ssa_loss(outputs, batch["prior"], cfg["loss"])
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        bev.append(losses["bev"].item())
    # measured (6 steps): 3 classes 0.834 -> 0.733, 8 classes 1.430 -> 1.311, each step lower
    assert all(np.diff(bev) < 0) and bev[-1] < 0.95 * bev[0], bev


def test_training_with_8_class_priors_runs_and_a_2_class_head_refuses_them(worlds, tmp_path):
    short = ["train.epochs=1", "train.max_steps_per_epoch=2", "train.batch_size=4",
             "train.sampling.similarity=false", "eval.every=10"]
    summary = train(_config(worlds[8], 8, *short), tmp_path / "eight")
    assert summary["steps"] == 2
    # the run's report shows its 8-class priors (read with the run's class count)
    result = CliRunner().invoke(app, ["report", str(tmp_path / "eight")])
    assert result.exit_code == 0, result.output
    assert "BEV prediction vs. the prior label" in (tmp_path / "eight" / "report.html").read_text()
    with pytest.raises(DataError, match=r"sat_BEV_label/.*\.png: holds value\(s\) .* but "
                                        r"model\.bev\.classes is 2"):
        train(_config(worlds[8], 2, *short), tmp_path / "two")


@pytest.mark.slow
def test_vigor_8_class_maps_import_from_one_folder_per_city_and_train(synth_world, tmp_path):
    """The documented route for VIGOR's 8-class labels: `.npy` class maps in
    `<City>/map_repro/` imported unchanged (--keep-values, one --masks per city), then training
    with model.bev.classes=8."""
    root = tmp_path / "vigor"
    shutil.copytree(synth_world("vigor"), root)
    tiles = list_tiles(root)
    cities = sorted({t.rel.split("/")[0] for t in tiles})
    for tile in tiles:
        folder = root / tile.rel.split("/")[0] / "map_repro"
        folder.mkdir(exist_ok=True)
        np.save(folder / f"{tile.path.stem}.npy",
                _eight_class_map(read_image(tile.truth_path, mode="L")).astype(np.int64))
    masks = [arg for city in cities for arg in ("--masks", root / city / "map_repro")]
    result = CliRunner().invoke(app, ["priors", str(root), "--backend", "files", "--keep-values",
                                      "--force", "--no-progress", *map(str, masks)])
    assert result.exit_code == 0, result.output
    assert f"tiles done {len(tiles)}, skipped (already there) 0, failed 0" in result.output
    for tile in tiles[:4]:
        expected = _eight_class_map(read_image(tile.truth_path, mode="L"))
        np.testing.assert_array_equal(read_image(tile.prior_path, mode="L"), expected)
    short = ["train.epochs=1", "train.max_steps_per_epoch=1", "train.batch_size=4",
             "train.sampling.similarity=false", "eval.every=10"]
    assert train(_config(root, 8, *short), tmp_path / "run")["steps"] == 1
