"""Bad input: hand-broken copies of synthetic worlds; each error names the file and the fault."""

import shutil

import numpy as np
import pytest
from scipy.io import loadmat, savemat

from ssageo.config import load_config
from ssageo.data import PairDataset, load_manifest
from ssageo.data.check import check_dataset
from ssageo.io import DataError


@pytest.fixture
def copy_of(synth_world, tmp_path):
    def make(layout):
        root = tmp_path / layout
        shutil.copytree(synth_world(layout), root)
        return root
    return make


def _edit_line(path, n, text):
    lines = path.read_text().splitlines()
    lines[n - 1] = text
    path.write_text("\n".join(lines) + "\n")


def test_missing_split_file(copy_of):
    root = copy_of("cvusa")
    (root / "splits/val-19zl.csv").unlink()
    with pytest.raises(DataError, match=r"splits/val-19zl\.csv: CVUSA split file is missing"):
        load_manifest(root, split="val")


def test_malformed_line_names_file_and_line(copy_of):
    root = copy_of("cvusa")
    _edit_line(root / "splits/train-19zl.csv", 3, "bingmap/19/0000001.jpg")
    with pytest.raises(DataError, match=r"train-19zl\.csv:3: malformed line"):
        load_manifest(root)


@pytest.mark.parametrize("entry,reason", [("../outside/0000001.jpg", "escapes the dataset root"),
                                          ("/etc/passwd", "absolute path")])
def test_entries_outside_the_root_are_rejected(copy_of, entry, reason):
    root = copy_of("cvusa")
    _edit_line(root / "splits/train-19zl.csv", 2, f"{entry},streetview/panos/0000001.jpg,x.png")
    with pytest.raises(DataError, match=rf"train-19zl\.csv:2: .*{reason}"):
        load_manifest(root)


def test_missing_and_empty_images_are_reported_not_hidden(copy_of):
    root = copy_of("cvusa")
    full = load_manifest(root, use_cache=False)
    gone, empty = full.query_paths[0], full.reference_paths[1]
    gone.unlink()
    empty.write_bytes(b"")
    with pytest.warns(UserWarning, match=r"2 pair\(s\) skipped .*" + gone.name):
        m = load_manifest(root)
    assert m.num_queries == full.num_queries - 2
    assert m.missing == [f"{gone}: missing", f"{empty}: empty (0 bytes)"]
    report = check_dataset(root)
    assert report["missing_files"] == {"count": 1, "examples": [f"{gone}: missing"]}
    assert report["empty_files"]["count"] == 1 and report["usable"]
    assert not check_dataset(root, strict=True)["usable"]


def test_corrupt_image_fails_the_check_and_raises_at_training_time(copy_of):
    root = copy_of("cvusa")
    m = load_manifest(root)
    bad = m.reference_paths[2]
    bad.write_bytes(b"this is not a jpeg")
    report = check_dataset(root)
    assert not report["usable"] and report["unreadable_images"]["count"] == 1
    assert report["unreadable_images"]["examples"][0].startswith(f"{bad}: cannot decode")
    ds = PairDataset(m, load_config()["data"], train=True)
    with pytest.raises(DataError, match=f"{bad}: cannot decode image"):
        ds[2]


def test_partial_prior_labels_are_refused_for_training(copy_of):
    root = copy_of("cvusa")
    label = root / "sat_BEV_label/19/0000001.png"
    label.unlink()
    m = load_manifest(root)
    assert 0 < m.prior_coverage < 1
    with pytest.raises(DataError, match=r"1 of \d+ satellite tiles have no prior label"):
        PairDataset(m, load_config()["data"], train=True)


def test_folder_of_another_dataset_says_which(synth_world):
    with pytest.raises(DataError, match="expected a CVACT layout .* looks like CVUSA"):
        load_manifest(synth_world("cvusa"), dataset="cvact")


def test_mat_without_expected_keys(copy_of):
    root = copy_of("cvact")
    mat = {k: v for k, v in loadmat(root / "ACT_data.mat").items() if not k.startswith("__")}
    savemat(root / "ACT_data.mat", {k: v for k, v in mat.items() if k != "trainSet"})
    with pytest.raises(DataError, match=r"ACT_data\.mat: missing key\(s\) trainSet"):
        load_manifest(root)
    savemat(root / "ACT_data.mat", {**mat, "trainSet": {"trainInd": np.array([[0], [1]])}})
    with pytest.raises(DataError, match=r"ACT_data\.mat: trainSet\.trainInd must hold 1-based"):
        load_manifest(root)


def test_cvact_ids_without_files_are_counted(copy_of):
    root = copy_of("cvact")
    full = load_manifest(root, split="val", use_cache=False)
    for p in full.reference_paths[:3]:
        p.unlink()
    with pytest.warns(UserWarning, match=r"3 pair\(s\) skipped"):
        m = load_manifest(root, split="val")
    assert m.num_queries == full.num_queries - 3
    assert m.missing[0] == f"{full.reference_paths[0]}: missing"


def test_vigor_wrong_column_count_and_missing_split(copy_of):
    root = copy_of("vigor")
    split = root / "splits/Seattle/same_area_balanced_train.txt"
    first = split.read_text().splitlines()[0]
    _edit_line(split, 1, " ".join(first.split()[:12]))
    with pytest.raises(DataError, match=r"Seattle/same_area_balanced_train\.txt:1: expected 13 "
                                        r".*got 12"):
        load_manifest(root)
    split.unlink()
    with pytest.raises(DataError, match=r"same_area_balanced_train\.txt: VIGOR split file is "
                                        "missing"):
        load_manifest(root)
