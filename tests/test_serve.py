"""``ssageo serve``: the local page, operated in a real headless Chromium against a real server
process holding a (tiny) trained model with a BEV head."""

from __future__ import annotations

import io
import json
import select
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from browser import Browser, chromium
from ssageo.cli import app
from ssageo.data import load_manifest
from ssageo.evaluate.index import Localizer

TOP_K = 5


def _url_line(process: subprocess.Popen, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([process.stdout], [], [], 1)[0]:
            line = process.stdout.readline()
            if "http://" in line or not line:
                return line
    raise TimeoutError("ssageo serve did not say where it listens")


@pytest.fixture(scope="module")
def served(tiny_run, tmp_path_factory):
    """An index of the tiny run's validation tiles served by ``ssageo serve`` (uploads up to
    0.5 MB), and a validation panorama whose true tile the model ranks in the top 5."""
    root = tmp_path_factory.mktemp("serve")
    world, index = tiny_run["world"], root / "val.npz"
    result = CliRunner().invoke(app, [
        "index", "build", "--checkpoint", str(tiny_run["run"] / "checkpoints" / "best"),
        "--data", str(world), "--split", "val", "--out", str(index)])
    assert result.exit_code == 0, result.output
    manifest = load_manifest(world, "cvusa", "val")
    found = Localizer(index).locate_many(manifest.query_paths, TOP_K)
    pick = next(i for i, hits in enumerate(found)
                if str(manifest.reference_paths[manifest.positive[i]]) in [h["tile"] for h in hits])
    process = subprocess.Popen(
        [sys.executable, "-m", "ssageo", "serve", "--index", str(index), "--port", "0",
         "--top-k", str(TOP_K), "--max-upload-mb", "0.5", "--in-memory"],  # a no-op for .npz
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = _url_line(process)
        assert line.startswith(f"serving {index} (8 tiles) on http://127.0.0.1:"), line
        yield {"url": line.split(" on ")[1].split()[0], "root": root,
               "panorama": manifest.query_paths[pick],
               "tile": str(manifest.reference_paths[manifest.positive[pick]])}
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_page_locates_an_uploaded_panorama_in_a_real_browser(served, tmp_path):
    if chromium() is None:
        pytest.skip("chromium is not installed (apt-get install chromium): browser check skipped")
    with Browser(tmp_path / "profile", 1280, 1100) as browser:
        browser.open(served["url"])
        browser.wait_for("document.body.dataset.state === 'ready'")
        browser.choose_file("#file", served["panorama"])
        state = browser.wait_for("['done', 'error'].includes(document.body.dataset.state) && "
                                 "document.body.dataset.state")
        assert state == "done", browser.evaluate("document.getElementById('message').textContent")
        shown = browser.evaluate("""(() => {
          const rows = Array.from(document.querySelectorAll('#results tr'));
          const loaded = id => document.getElementById(id).naturalWidth > 0;
          return {tiles: rows.map(r => r.dataset.tile),
                  cells: rows.map(r => Array.from(r.cells).map(c => c.textContent)),
                  thumbs: rows.filter(r => r.querySelector('img').naturalWidth > 0).length,
                  best: loaded('best'), bev: loaded('bev'), query: loaded('query'),
                  hits: document.querySelectorAll('#plot svg g.hit').length};
        })()""")
        assert served["tile"] in shown["tiles"]  # the true tile is among the results
        assert len(shown["tiles"]) == TOP_K and shown["thumbs"] == TOP_K and shown["hits"] == TOP_K
        assert shown["best"] and shown["bev"] and shown["query"]
        rank, _, score, lat, lon, _ = shown["cells"][0]
        assert rank == "1" and 0 < float(score) <= 1 and abs(float(lat)) <= 90
        shot = browser.screenshot(tmp_path / "serve.png")
        assert browser.errors == []  # no script error, nothing failed to load

        junk = tmp_path / "holiday.jpg"
        junk.write_text("not a picture")
        browser.choose_file("#file", junk)
        browser.wait_for("document.body.dataset.state === 'error'")
        message = browser.evaluate("document.getElementById('message').textContent")
        assert message.startswith("holiday.jpg: cannot decode image")
        huge = tmp_path / "huge.png"
        huge.write_bytes(bytes(600_000))
        browser.choose_file("#file", huge)
        browser.wait_for("document.getElementById('message').textContent.includes('huge.png')")
        message = browser.evaluate("document.getElementById('message').textContent")
        assert "more than this page accepts (0.5 MB)" in message
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape[1] >= 1200 and pixels.std() > 10  # painted, not a blank page


def _post(url: str, data: bytes, **query) -> tuple[int, dict]:
    request = urllib.request.Request(url + "locate?" + urllib.parse.urlencode(query), data=data,
                                     method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_server_refuses_what_it_cannot_answer_in_one_line(served, tmp_path):
    status, answer = _post(served["url"], bytes(600_000), name="big.jpg")
    assert status == 413 and answer["error"].startswith("big.jpg: 0.6 MB is more than")
    status, answer = _post(served["url"], served["panorama"].read_bytes(), name="p.jpg", fov=0)
    assert status == 400 and answer["error"] == "field of view 0 degrees: give 1..360"
    photo = np.asarray(Image.open(served["panorama"]).convert("RGB"))[:, : 64]  # a narrow view
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, format="PNG")
    status, answer = _post(served["url"], buffer.getvalue(), name="photo.png", fov=90)
    assert status == 200 and answer["results"] and answer["bev"] is None  # placed as a photo
    with urllib.request.urlopen(served["url"], timeout=60) as response:
        page = response.read().decode()
    assert "val.npz" in page
    assert "http:" not in page and "https:" not in page  # nothing is fetched from elsewhere
    not_index = tmp_path / "weights.npz"
    np.savez(not_index, x=np.zeros(3))
    result = CliRunner().invoke(app, ["serve", "--index", str(not_index)])
    assert result.exit_code != 0 and "not an ssageo index" in str(result.exception)
