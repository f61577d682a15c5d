"""`ssageo data check`: table, JSON and exit status on synthetic worlds."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ssageo.cli import app, main
from ssageo.data.check import check_dataset

runner = CliRunner()


@pytest.mark.parametrize("layout", ["cvusa", "cvact", "vigor"])
def test_check_reports_a_good_world_as_usable(synth_world, layout):
    root = synth_world(layout)
    result = runner.invoke(app, ["data", "check", str(root)])
    assert result.exit_code == 0, result.output
    shown = layout if layout != "vigor" else "vigor-official"
    assert f"{layout.upper()} ({shown})" in result.output and "prior labels" in result.output
    assert "usable" in result.output and "not usable" not in result.output

    result = runner.invoke(app, ["data", "check", str(root), "--json"])
    report = json.loads(result.stdout)
    assert report["dataset"] == layout and report["usable"] and report["gps"]["available"]
    assert report["priors"]["coverage"] == 1.0
    assert report["unexpected_sizes"]["count"] == 0
    assert all(s["queries"] > 0 for s in report["splits"].values())


def test_check_fails_on_a_broken_world(synth_world, tmp_path):
    root = tmp_path / "cvusa"
    shutil.copytree(synth_world("cvusa"), root)
    (root / "split_locations/all.csv").unlink()
    big = root / "bingmap/19/0000002.jpg"
    shutil.copy(root / "streetview/panos/0000002.jpg", big)  # a panorama where a tile belongs
    (root / "bingmap/19/0000003.jpg").write_bytes(b"\x00" * 10)
    (root / "splits/val-19zl.csv").write_text("a.jpg\n")
    result = runner.invoke(app, ["data", "check", str(root), "--json"])
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert "val-19zl.csv:1: malformed line" in report["splits"]["val"]["error"]
    assert report["unreadable_images"]["examples"][0].startswith(str(root / "bingmap/19/0000003"))
    assert report["unexpected_sizes"]["examples"][0].startswith(f"{big}: 256x64")
    assert not report["gps"]["available"]
    table = runner.invoke(app, ["data", "check", str(root)])
    assert table.exit_code == 1 and "not usable" in table.output


def test_wrong_layout_is_a_one_line_error_with_status_2(synth_world, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["ssageo", "data", "check", str(synth_world("vigor")),
                                      "--dataset", "cvact"])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    assert "looks like VIGOR" in capsys.readouterr().err


@pytest.mark.parametrize("option,value,message", [("--dataset", "kitti", "unknown dataset 'kitti'"),
                                                  ("--vigor-mode", "diagonal",
                                                   "unknown reading mode 'diagonal'")])
def test_unknown_option_values_are_refused(synth_world, option, value, message):
    result = runner.invoke(app, ["data", "check", str(synth_world("vigor")), option, value])
    assert message in str(result.exception)


@pytest.fixture
def copy_of(synth_world, tmp_path):
    """``copy_of(layout)``: a private, editable copy of a synthetic world."""
    return lambda layout: Path(shutil.copytree(synth_world(layout), tmp_path / layout))


def test_cvact_without_its_separate_test_download_is_usable_for_what_loads(copy_of):
    root = copy_of("cvact")
    shutil.rmtree(root / "ANU_data_test")
    result = runner.invoke(app, ["data", "check", str(root), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["usable"] and report["unavailable_splits"] == ["test"]
    assert report["splits"]["train"]["queries"] > 0 and report["splits"]["val"]["queries"] > 0
    assert "ANU_data_test: folder missing" in report["splits"]["test"]["unavailable"]
    assert "separate download" in report["splits"]["test"]["unavailable"]
    table = runner.invoke(app, ["data", "check", str(root)])
    assert table.exit_code == 0 and "split(s) not available: test" in table.output
    shutil.rmtree(root / "ANU_data_small")  # nothing loads: not usable, and it says why
    result = runner.invoke(app, ["data", "check", str(root), "--json"])
    report = json.loads(result.stdout)
    assert result.exit_code == 1 and any("ANU_data_small: folder missing" in p
                                         for p in report["problems"])


def _reference(root, n=0):
    return root / (root / "splits/train-19zl.csv").read_text().splitlines()[n].split(",")[0]


def test_truncated_images_are_found_and_trailing_bytes_tolerated(copy_of):
    root = copy_of("cvusa")
    cut, padded = _reference(root, 0), _reference(root, 1)
    cut.write_bytes(cut.read_bytes()[:-200])  # the header is intact, the end is not
    padded.write_bytes(padded.read_bytes() + b"camera trailer " * 100)  # complete, then extra
    label = root / "sat_BEV_label/19" / f"{_reference(root, 2).stem}.png"
    label.write_bytes(label.read_bytes()[:200])  # a PNG cut inside its pixel data
    report = check_dataset(root)
    assert not report["usable"] and report["unreadable_images"]["count"] == 2
    found = report["unreadable_images"]["examples"]
    assert any(e.startswith(f"{cut}: cannot decode image (image file is truncated") for e in found)
    assert any(e.startswith(f"{label}: cannot decode image") for e in found)


def test_full_decodes_every_image(copy_of):
    root = copy_of("cvusa")
    label = root / "sat_BEV_label/19" / f"{_reference(root).stem}.png"
    data = bytearray(label.read_bytes())
    data[data.index(b"IDAT") + 20] ^= 0xFF  # damage inside; header and end intact
    label.write_bytes(bytes(data))
    assert check_dataset(root)["usable"]  # the default check reads headers and ends only
    result = runner.invoke(app, ["data", "check", str(root), "--full", "--json"])
    report = json.loads(result.stdout)
    assert result.exit_code == 1
    assert report["unreadable_images"]["examples"][0].startswith(f"{label}: cannot decode")


def test_gps_line_when_all_csv_exists_but_no_split_loaded(copy_of):
    root = copy_of("cvusa")
    for split in ("train", "val"):
        (root / f"splits/{split}-19zl.csv").write_text("a.jpg\n")
    gps = check_dataset(root)["gps"]
    assert not gps["available"]
    assert gps["source"] == f"{root / 'split_locations/all.csv'} (present, but no split loaded)"


def test_piped_output_keeps_each_path_on_one_line(copy_of):
    root = copy_of("cvusa")
    gone = [_reference(root, n) for n in range(3)]
    for path in gone:
        path.unlink()
    assert len(str(gone[0])) > 60  # would wrap in an 80-column table
    for path in gone:  # what `ssageo data check DIR | grep NAME` does
        piped = subprocess.run(f"{sys.executable} -m ssageo data check {root} | grep {path.name}",
                               shell=True, capture_output=True, text=True, check=False)
        assert f"{path}: missing" in piped.stdout, piped.stdout + piped.stderr


def test_vigor_cross_area_without_the_test_cities_is_usable_for_training(copy_of):
    root = copy_of("vigor")
    for city in ("Chicago", "SanFrancisco"):  # each city is a download of its own
        shutil.rmtree(root / "splits" / city)
        shutil.rmtree(root / city)
    result = runner.invoke(app, ["data", "check", str(root), "--vigor-mode", "cross-area",
                                 "--json"])
    report = json.loads(result.stdout)
    assert result.exit_code == 0 and report["unavailable_splits"] == ["test"]
    assert "none of the cross-area test cities (Chicago, SanFrancisco)" in \
        report["splits"]["test"]["unavailable"]
