"""The report of a real (tiny) training run, rendered in a real headless Chromium, and the log
table of ``ssageo log``."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from ssageo.cli import app
from ssageo.config import load_config
from ssageo.io import DataError
from ssageo.model import losses
from ssageo.report import build_report, epoch_rows, read_run_log
from ssageo.report.figures import project_2d, training_curves
from ssageo.train.loop import train


@pytest.fixture(scope="module")
def runs(tiny_run, tmp_path_factory):
    """The shared tiny SSA run (tests/conftest.py) and a copy of it to compare against."""
    copy = shutil.copytree(tiny_run["run"], tmp_path_factory.mktemp("report") / "ssa-copy")
    return {"ssa": tiny_run["run"], "copy": copy}


def _browser() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _chromium(tmp_path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run",
             f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=10000"]
    return subprocess.run([_browser(), *flags, *args], capture_output=True, text=True,
                          timeout=120, check=True)


# Counts images that failed to decode and records script errors, after the page has loaded.
_PROBE = """<script>
window.__errors = [];
window.addEventListener("error", e => window.__errors.push(String(e.message || e.type)), true);
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const broken = images.filter(i => !i.complete || i.naturalWidth === 0).length;
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify({images: images.length, broken, errors: window.__errors});
  document.body.appendChild(out);
});
</script>"""


def test_report_renders_in_a_real_browser(runs, tmp_path):
    report = tmp_path / "report.html"
    result = CliRunner().invoke(app, ["report", str(runs["ssa"]), "--compare", str(runs["copy"]),
                                      "--out", str(report)])
    assert result.exit_code == 0, result.output
    assert str(report) in result.output.replace("\n", "")
    page = report.read_text(encoding="utf-8")
    for heading in ("Metrics", "Training curves", "Retrieval examples", "BEV prediction",
                    "Activation maps", "Descriptor map", "Localization error",
                    "Recall vs. field of view"):
        assert f"<h2>{heading}" in page, heading
    assert all(f"<th>{fov}°</th>" in page for fov in (360, 180, 90, 70))
    assert "http://" not in page and "https://" not in page  # nothing to fetch when viewing
    best = [r for r in read_run_log(runs["ssa"]).evals][-1]
    assert f"{best['R@1']:.2f}" in page  # the recorded validation R@1 is in the table

    if _browser() is None:
        pytest.skip("chromium is not installed (apt-get install chromium): browser check skipped")
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("<head>", "<head>" + _PROBE, 1), encoding="utf-8")
    dom = _chromium(tmp_path, "--dump-dom", probed.as_uri()).stdout
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert found, f"the probe did not run; chromium printed: {dom[:500]}"
    result = json.loads(found.group(1).replace("&quot;", '"'))
    assert result["images"] >= 6 and result["broken"] == 0, result
    assert result["errors"] == [], result

    shot = tmp_path / "report.png"
    _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1400,4000", report.as_uri())
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (4000, 1400)
    assert pixels.std() > 10  # figures were painted, not a blank page


def test_log_table_shows_every_epoch_and_the_validation(runs):
    log = read_run_log(runs["ssa"])
    rows = epoch_rows(log)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert sum(r["steps"] for r in rows) == len(log.steps)
    result = CliRunner().invoke(app, ["log", str(runs["ssa"])], terminal_width=160)
    assert result.exit_code == 0, result.output
    for evaluation in log.evals:
        assert f"{evaluation['R@1']:.2f}" in result.output
    epoch1 = [s["loss"] for s in log.steps if s["epoch"] == 1]
    assert f"{np.mean(epoch1):.4f}" in result.output


def test_malformed_log_names_file_and_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"kind": "step", "step": 1, "loss": 1.0}\n{oops\n')
    with pytest.raises(DataError, match=r"metrics\.jsonl:2: not valid JSON"):
        read_run_log(tmp_path)
    from ssageo.cli import main

    monkeypatch.setattr(sys, "argv", ["ssageo", "log", str(tmp_path / "missing")])
    with pytest.raises(SystemExit) as stop:
        main()
    assert stop.value.code == 2
    assert "run directory not found" in capsys.readouterr().err


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(DataError, match="metrics.jsonl"):
        build_report(tmp_path)


def test_descriptor_projection_names_its_method_and_keeps_pairs_apart():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20, 16)) * 5
    points = np.concatenate([centres + 0.1 * rng.normal(size=(20, 16)), centres])
    xy, method = project_2d(points)
    assert xy.shape == (40, 2)
    assert method.split()[0] in ("UMAP", "PCA")
    pair = np.linalg.norm(xy[:20] - xy[20:], axis=1)
    other = np.linalg.norm(xy[:20] - np.roll(xy[20:], 1, axis=0), axis=1)
    assert np.median(pair) < np.median(other)  # matching descriptors land close together


def test_sample_of_places_keeps_each_querys_true_tiles(synth_world):
    from ssageo.data import load_manifest
    from ssageo.report.analysis import subset

    full = load_manifest(synth_world("vigor"), split="test")
    part = subset(full, 7)
    assert part.num_queries == 7 and (part.semi_positive >= 0).any()
    for i, query in enumerate(part.query_paths):
        j = full.query_paths.index(query)
        assert part.reference_paths[part.positive[i]] == full.reference_paths[full.positive[j]]
        semi = {full.reference_paths[k] for k in full.semi_positive[j] if k >= 0}
        assert {part.reference_paths[k] for k in part.semi_positive[i] if k >= 0} == semi


@pytest.mark.slow
def test_report_output_path_rules(runs, tmp_path):
    """The run's own report.html is refreshed; any other existing file is never replaced; a
    report at --out is replaced only with --force."""
    from ssageo.report.html import page

    run = shutil.copytree(runs["ssa"], tmp_path / "run")
    runner = CliRunner()
    (run / "report.html").write_text("<html>my own notes, not a report</html>")
    result = runner.invoke(app, ["report", str(run)])
    assert isinstance(result.exception, DataError)
    assert "report.html: exists and is not an `ssageo report` page" in str(result.exception)
    for target in ("config.yaml", "checkpoints/best/model.safetensors"):
        before = (run / target).read_bytes()
        result = runner.invoke(app, ["report", str(run), "--out", str(run / target), "--force"])
        assert "exists and is not" in str(result.exception) and "\n" not in str(result.exception)
        assert (run / target).read_bytes() == before
    old = page("ssageo report: run", "written earlier", [])
    (run / "report.html").write_text(old)
    (tmp_path / "named.html").write_text(old)
    result = runner.invoke(app, ["report", str(run), "--out", str(tmp_path / "named.html")])
    assert "already exists; pass --force" in str(result.exception)
    result = runner.invoke(app, ["report", str(run)])  # the run's own report: refreshed
    assert result.exit_code == 0, result.output
    assert "<h2>Metrics" in (run / "report.html").read_text()


@pytest.mark.slow
def test_report_on_a_full_disk_is_one_line(runs, tmp_path):
    from faults import namespaces_work, run_faulty, ssageo

    if not namespaces_work():
        pytest.skip("needs `unshare -rm` (user namespaces) to mount a small tmpfs")
    folder = tmp_path / "full"
    result, left = run_faulty("full", folder, ssageo("report", runs["ssa"], "--out",
                                                     folder / "r.html"), fill=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {folder / 'r.html'}: cannot write: no space left on device")
    assert left == {}


# Step records as ssageo wrote them before the loss terms were a table (same keys since).
OLD_LOG = [
    {"kind": "step", "step": 1, "epoch": 1, "loss": 3.0, "infonce": 2.0, "bev": 1.0, "lr": 1e-4,
     "logit_scale": 14.3, "grad_norm": 2.0, "pairs_per_s": 8.0},
    {"kind": "step", "step": 2, "epoch": 1, "loss": 2.0, "infonce": 1.5, "bev": 0.5, "lr": 2e-4,
     "logit_scale": 14.3, "grad_norm": 2.0, "pairs_per_s": 8.0},
    {"kind": "eval", "split": "val", "step": 2, "epoch": 1, "R@1": 25.0},
]


def _panel_rows(png: bytes) -> int:
    """Rows of panels of a training-curves figure (3.25 inches at 100 dpi each)."""
    return round(Image.open(io.BytesIO(png)).size[1] / 325)


def test_an_old_metrics_log_reads_with_a_column_and_a_curve_per_loss_term(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in OLD_LOG))
    rows = epoch_rows(read_run_log(tmp_path))
    assert rows[0]["infonce"] == 1.75 and rows[0]["bev"] == 0.75 and rows[0]["loss"] == 2.5
    result = CliRunner().invoke(app, ["log", str(tmp_path)], terminal_width=160)
    assert result.exit_code == 0, result.output
    assert "InfoNCE" in result.output and "BEV" in result.output and "0.7500" in result.output
    assert _panel_rows(training_curves({"old": read_run_log(tmp_path)})) == 2  # 2 terms, lr, R@1


def test_logged_term_gradients_add_a_norm_and_a_cosine_panel(tmp_path):
    diagnosed = [dict(r, grad_infonce=0.5, grad_bev=2.0, grad_cos_bev=-0.1)
                 if r["kind"] == "step" else r for r in OLD_LOG]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in diagnosed))
    log = read_run_log(tmp_path)
    assert log.series("grad_cos_bev") == ([1.0, 2.0], [-0.1, -0.1])
    assert _panel_rows(training_curves({"run": log})) == 3  # + gradient norms, cosine
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in OLD_LOG))
    assert _panel_rows(training_curves({"a": log, "b": read_run_log(other)})) == 3


def test_a_new_loss_term_is_one_entry_in_the_term_table(synth_world, tmp_path, monkeypatch,
                                                        capsys):
    def scale_penalty(outputs, prior, loss_cfg):
        return 1e-3 * outputs["logit_scale"] ** 2

    extra = losses.LossTerm("scale", "Scale", "logit scale penalty", scale_penalty)
    monkeypatch.setattr(losses, "LOSS_TERMS", (*losses.LOSS_TERMS, extra))
    run = tmp_path / "run"
    train(load_config("synth-cpu", [f"data.root={synth_world('cvusa')}", "data.workers=0",
                                    "model.backbone=convnext_atto", "train.batch_size=4",
                                    "train.epochs=1", "train.max_steps_per_epoch=2"]), run)
    assert "scale=" in capsys.readouterr().err  # the progress bar
    steps = read_run_log(run).steps
    assert [s["scale"] > 0 for s in steps] == [True, True]  # metrics.jsonl
    for s in steps:
        assert s["loss"] == pytest.approx(s["infonce"] + s["bev"] + s["scale"], rel=1e-5)
    result = CliRunner().invoke(app, ["log", str(run)], terminal_width=200)
    assert "Scale" in result.output  # ssageo log
    assert _panel_rows(training_curves({"run": read_run_log(run)})) == 3  # 3 terms, lr, R@1
