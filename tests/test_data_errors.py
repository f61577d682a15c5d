"""Bad input: hand-broken copies of synthetic worlds; each error names the file and the fault."""

import re
import shutil
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image
from scipy.io import loadmat, savemat

from ssageo.config import load_config
from ssageo.data import ImageDataset, PairDataset, load_manifest
from ssageo.data.check import check_dataset
from ssageo.io import DataError, read_image
from ssageo.priors import list_tiles, run_priors
from ssageo.priors.files import FilesBackend


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
    savemat(root / "ACT_data.mat", {**mat, "trainSet": {"trainInd": np.array([[2], [99]])}})
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


# ----------------------------------------------------------- the hostile-input catalogue (#14)


def _pair_of_split(root, split, n):
    """(satellite, panorama) of line n of a CVUSA split csv."""
    sat, pano = (root / p for p in
                 (root / f"splits/{split}-19zl.csv").read_text().splitlines()[n - 1].split(",")[:2])
    return sat, pano


def test_zero_based_cvact_indices_are_caught_in_every_split(copy_of):
    root = copy_of("cvact")
    mat = {k: v for k, v in loadmat(root / "ACT_data.mat").items() if not k.startswith("__")}
    holder = next(s for s, f in (("trainSet", "trainInd"), ("valSet", "valInd"),
                                 ("valSetAll", "valInd")) if 1 in mat[s][f].ravel()[0])
    for name, fld in (("trainSet", "trainInd"), ("valSet", "valInd"), ("valSetAll", "valInd")):
        mat[name] = {fld: mat[name][fld].ravel()[0] - 1}  # as a 0-based export would write
    savemat(root / "ACT_data.mat", mat)
    for split in ("train", "val", "test"):  # the splits without a 0 are wrong too
        with pytest.raises(DataError, match=rf"indices look 0-based \({holder}\."):
            load_manifest(root, split=split, use_cache=False)


def test_matlab_v73_file_says_to_resave_as_v7(copy_of):
    root = copy_of("cvact")
    # A v7.3 MAT-file is HDF5 behind MATLAB's 128-byte header (version 0x0200).
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, HDF5 schema 1.00 .".ljust(124, b" ")
    (root / "ACT_data.mat").write_bytes((header + b"\x00\x02IM").ljust(512, b"\x00")
                                        + b"\x89HDF\r\n\x1a\n" + bytes(64))
    with pytest.raises(DataError, match=r"ACT_data\.mat: MATLAB v7\.3 \(HDF5\) .* re-save it as "
                                        r"v7"):
        load_manifest(root)


@pytest.mark.parametrize("layout,rel", [("cvusa", "splits/train-19zl.csv"),
                                        ("cvusa", "split_locations/all.csv"),
                                        ("vigor", "splits/Chicago/same_area_balanced_train.txt"),
                                        ("vigor", "splits/Chicago/satellite_list.txt")])
def test_a_utf8_bom_is_simply_read(copy_of, layout, rel):
    root = copy_of(layout)
    before = load_manifest(root, use_cache=False)
    (root / rel).write_bytes(b"\xef\xbb\xbf" + (root / rel).read_bytes())
    after = load_manifest(root, use_cache=False)
    assert after.query_paths == before.query_paths and not after.missing
    if layout == "cvusa":
        np.testing.assert_array_equal(after.query_coords, before.query_coords)


@pytest.mark.parametrize("rel", ["splits/train-19zl.csv", "split_locations/all.csv",
                                 "splits/Chicago/same_area_balanced_train.txt"])
@pytest.mark.parametrize("damage,message", [
    (lambda b: b[:40] + b"\x00\x00\x07\x1f" + b[40:], r":1: binary data \(NUL byte\)"),
    (lambda b: b.replace(b"\n", b"\n\x89\xfe\n", 1), r":2: byte 0x89 at column 1 is not UTF-8"),
    (lambda b: b"\xff\xfe" + b.decode().encode("utf-16-le"), r": .* is UTF-16 encoded; save it as "
                                                             "UTF-8"),
], ids=["nul", "not-utf8", "utf16"])
def test_binary_split_files_name_file_and_line(copy_of, rel, damage, message):
    root = copy_of("vigor" if "Chicago" in rel else "cvusa")
    path = root / rel
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DataError, match=re.escape(str(path)) + message):
        load_manifest(root, use_cache=False)


def test_a_header_row_in_cvusa_csvs_is_skipped(copy_of):
    root = copy_of("cvusa")
    before = load_manifest(root, use_cache=False)
    for rel, header in (("splits/train-19zl.csv", "satellite,streetview,annotation"),
                        ("split_locations/all.csv", "sat_lat,sat_lon,ground_lat,ground_lon")):
        (root / rel).write_text(header + "\n" + (root / rel).read_text())
    after = load_manifest(root, use_cache=False)
    assert after.query_paths == before.query_paths and not after.missing
    np.testing.assert_array_equal(after.query_coords, before.query_coords)
    assert check_dataset(root)["missing_files"]["count"] == 0


def test_upper_case_suffix_says_the_case_differs(copy_of):
    root = copy_of("cvusa")
    _, pano = _pair_of_split(root, "train", 1)
    pano.rename(pano.with_suffix(".JPG"))
    with pytest.warns(UserWarning, match="file name case differs"):
        m = load_manifest(root, use_cache=False)
    assert m.missing == [f"{pano}: missing; {pano.stem}.JPG exists - file name case differs"]


def test_skipped_pairs_count_pairs_not_files(copy_of):
    root = copy_of("cvusa")
    for n, both in ((1, True), (2, False)):
        sat, pano = _pair_of_split(root, "train", n)
        pano.unlink()
        if both:
            sat.unlink()
    with pytest.warns(UserWarning, match=r"2 pair\(s\) skipped .*\(3 file problem\(s\)\)"):
        m = load_manifest(root, use_cache=False)
    assert m.skipped == 2 and len(m.missing) == 3
    assert check_dataset(root)["splits"]["train"]["skipped"] == 2
    for _ in ("written to the cache", "read from it"):
        with pytest.warns(UserWarning, match=r"2 pair\(s\) skipped"):
            assert load_manifest(root).skipped == 2


def test_cvusa_without_gps_warns_that_training_has_no_gps_negatives(copy_of):
    root = copy_of("cvusa")
    (root / "split_locations/all.csv").unlink()
    with pytest.warns(UserWarning, match=r"all\.csv is missing: .* no GPS hard negatives"):
        load_manifest(root, split="train")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the val split is not trained on: no warning
        load_manifest(root, split="val")


# ----------------------------------------------------------------------- images and masks


def _png_bomb(path, width, height):
    """A valid 1-bit PNG of width x height black pixels: a few kB that decode to ``w*h`` pixels."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I",
                                                                        zlib.crc32(kind + data))
    z = zlib.compressobj(9)
    row = bytes(1 + (width + 7) // 8)
    data = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height,
                                                                      1, 0, 0, 0, 0))
                     + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("side", [10_000, 14_000], ids=["over-limit", "over-twice-limit"])
def test_decompression_bombs_are_one_line_errors_everywhere(copy_of, tmp_path, side):
    root = copy_of("cvusa")
    m = load_manifest(root)
    bomb = _png_bomb(m.query_paths[0], side, side)  # PIL's limit is ~89 M pixels
    message = f"{bomb}: image too large to decode safely, refused as a possible decompression bomb"
    with pytest.raises(DataError, match=re.escape(message)):
        read_image(bomb)
    with pytest.raises(DataError, match=re.escape(message)):  # what `ssageo locate` reads with
        ImageDataset([bomb], (64, 256), (0.5,) * 3, (0.5,) * 3)[0]
    report = check_dataset(root)
    assert report["unreadable_images"]["examples"] == [message + report["unreadable_images"][
        "examples"][0][len(message):]] and not report["usable"]
    tiles = list_tiles(root)
    masks = tmp_path / "masks"
    masks.mkdir()
    _png_bomb(masks / f"{tiles[0].path.stem}.png", side, side)
    with pytest.raises(DataError, match=re.escape(f"{masks / tiles[0].path.stem}.png: image too "
                                                  "large")):
        FilesBackend(masks, tiles)


def _save(path, array, mode=None):
    Image.fromarray(array, mode).save(path)
    return path


RAMP = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)


@pytest.mark.parametrize("name,array", [
    ("gray16.png", RAMP),                                   # I;16 (little-endian)
    ("gray16be.tif", RAMP.astype(">u2")),                   # I;16B
    ("gray32.tif", RAMP.astype(np.int32)),                  # I, 16-bit values in 32 bits
    ("float.tif", RAMP.astype(np.float32) / 65535),         # F, 0..1
])
def test_wide_grayscale_images_are_scaled_to_eight_bits(tmp_path, name, array):
    path = _save(tmp_path / name, array)
    expected = np.rint(RAMP / 257).astype(np.uint8)  # 0 -> 0, 65535 -> 255
    gray = read_image(path, mode="L")
    assert gray.dtype == np.uint8
    np.testing.assert_allclose(gray, expected, atol=1)
    assert gray.min() == 0 and gray.max() == 255 and abs(gray.mean() - 127.5) < 1
    np.testing.assert_array_equal(read_image(path)[..., 1], gray)


@pytest.mark.parametrize("name,array,message", [
    ("big32.tif", (RAMP.astype(np.int32) * 4), r"32-bit image with values 0\.\.262140"),
    ("neg32.tif", (RAMP.astype(np.int32) - 5), r"32-bit image with values -5\.\."),
    ("nan.tif", np.full((8, 8), np.nan, np.float32), "float image with values outside 0..1"),
    ("wide.tif", np.full((8, 8), 3.0, np.float32), "float image with values outside 0..1"),
])
def test_wide_images_without_a_clear_scale_are_refused(tmp_path, name, array, message):
    path = _save(tmp_path / name, array)
    with pytest.raises(DataError, match=re.escape(str(path)) + ": " + message):
        read_image(path)


@pytest.fixture()
def masks_world(copy_of, tmp_path):
    """A CVUSA world, its tiles, and a mask folder holding a valid .npy mask for each tile."""
    root = copy_of("cvusa")
    shutil.rmtree(root / "sat_BEV_label")  # the world ships labels; import new ones
    tiles = list_tiles(root)
    folder = tmp_path / "masks"
    folder.mkdir()
    for t in tiles:
        np.save(folder / f"{t.path.stem}.npy", np.zeros((64, 64), np.uint8))
    return tiles, folder


def _truncated(path):
    np.save(path, np.zeros((64, 64), np.float32))
    path.write_bytes(path.read_bytes()[:-100])


@pytest.mark.parametrize("write,message", [
    (lambda p: np.save(p, np.zeros(64 * 64, np.uint8)), r"expected a 2-D mask \(H, W\), got shape "
                                                        r"\(4096,\)"),
    (_truncated, r"truncated numpy file \(\d+ bytes, its header needs \d+\)"),
    (lambda p: np.save(p, np.full((64, 64), None, object)), "mask has dtype object"),
    (lambda p: np.save(p, np.zeros((64, 64), complex)), "mask has dtype complex128"),
    (lambda p: p.write_bytes(b"\x93NUMPY garbage"), "cannot read numpy array"),
], ids=["1-d", "truncated", "object", "complex", "garbage"])
def test_bad_npy_masks_are_refused_before_anything_is_written(masks_world, write, message):
    tiles, folder = masks_world
    bad = folder / f"{tiles[5].path.stem}.npy"
    write(bad)
    with pytest.raises(DataError, match=re.escape(str(bad)) + ": " + message):
        FilesBackend(folder, tiles)
    assert not any(t.prior_path.exists() for t in tiles)


def test_a_nan_mask_is_an_error_not_background(masks_world):
    tiles, folder = masks_world
    bad = folder / f"{tiles[2].path.stem}.npy"
    np.save(bad, np.where(np.eye(64) > 0, np.nan, 1.0))
    backend = FilesBackend(folder, tiles)
    with pytest.raises(DataError, match=re.escape(f"{bad}: mask has 64 NaN/inf value(s)")):
        backend.predict([tiles[2]])
    summary = run_priors(tiles, backend, progress=False)
    assert summary.done == len(tiles) - 1 and summary.failed[0][0] == str(tiles[2].path)
    assert not tiles[2].prior_path.exists()


def test_a_sixteen_bit_mask_keeps_its_values(masks_world):
    tiles, folder = masks_world
    truth = (np.arange(64 * 64).reshape(64, 64) % 7 == 0)
    path = folder / f"{tiles[0].path.stem}.png"
    (folder / f"{tiles[0].path.stem}.npy").unlink()
    for values in (truth.astype(np.uint16), truth.astype(np.uint16) * 65535):  # 0/1 and 0/65535
        _save(path, values)
        label = FilesBackend(folder, tiles).predict([tiles[0]])[0]
        np.testing.assert_array_equal(label, truth * 255)
