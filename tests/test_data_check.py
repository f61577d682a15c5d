"""`ssageo data check`: table, JSON and exit status on synthetic worlds."""

import json
import shutil
import sys

import pytest
from typer.testing import CliRunner

from ssageo.cli import app, main

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
                                                   "unknown VIGOR mode 'diagonal'")])
def test_unknown_option_values_are_refused(synth_world, option, value, message):
    result = runner.invoke(app, ["data", "check", str(synth_world("vigor")), option, value])
    assert message in str(result.exception)
