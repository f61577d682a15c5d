"""What ``ssageo serve`` shows: the page (HTML, CSS and script in one file, nothing fetched from
elsewhere), the coordinate plot (SVG) and images as data URIs."""

from __future__ import annotations

import base64
import html
import io

import numpy as np

PLOT_POINTS = 4000  # index tiles drawn on the plot at most (an even subsample beyond)


def png_data_uri(image: np.ndarray) -> str:
    """An (H, W[, 3]) uint8 image as a ``data:image/png;base64,...`` URI."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def thumbnail(image: np.ndarray, side: int = 160) -> np.ndarray:
    """``image`` scaled so that its longer side is at most ``side`` pixels."""
    import cv2

    scale = side / max(image.shape[:2])
    if scale >= 1:
        return image
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def probability_image(probability: np.ndarray, side: int = 160) -> np.ndarray:
    """An (S, S) map in [0, 1] as a viridis-coloured RGB image about ``side`` pixels wide
    (nearest-neighbour: one BEV cell stays one block)."""
    from matplotlib import colormaps

    rgb = (colormaps["viridis"](np.clip(probability, 0, 1))[..., :3] * 255).astype(np.uint8)
    repeat = max(1, side // max(probability.shape))
    return np.repeat(np.repeat(rgb, repeat, axis=0), repeat, axis=1)


def coordinate_plot(coords: np.ndarray, hits: list[dict], width: int = 440,
                    height: int = 330) -> str:
    """An SVG plot (lon right, lat up, equal metres per unit at the mean latitude) of the index
    tiles (grey dots) and the ``hits`` (numbered circles, the best in red)."""
    coords = np.asarray(coords, dtype=np.float64)
    if len(coords) > PLOT_POINTS:
        coords = coords[np.linspace(0, len(coords) - 1, PLOT_POINTS).astype(int)]
    points = np.vstack([coords, [(h["lat"], h["lon"]) for h in hits]]) if hits else coords
    lat0, lat1 = points[:, 0].min(), points[:, 0].max()
    lon0, lon1 = points[:, 1].min(), points[:, 1].max()
    squash = max(np.cos(np.radians((lat0 + lat1) / 2)), 1e-3)  # degrees of lon are shorter
    span = max((lon1 - lon0) * squash, lat1 - lat0, 1e-6) * 1.1
    margin = 46
    scale = min(width - 2 * margin, height - 2 * margin) / span
    cx, cy = (lon0 + lon1) / 2, (lat0 + lat1) / 2

    def xy(lat: float, lon: float) -> tuple[float, float]:
        return (width / 2 + (lon - cx) * squash * scale, height / 2 - (lat - cy) * scale)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="tile positions">',
             f'<rect x="0.5" y="0.5" width="{width - 1}" height="{height - 1}" fill="#fbfbfb" '
             'stroke="#bbb"/>']
    for lat, lon in coords:
        x, y = xy(lat, lon)
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2" fill="#9aa"/>')
    for hit in reversed(hits):  # the best last, so on top
        x, y = xy(hit["lat"], hit["lon"])
        colour = "#d62728" if hit["rank"] == 1 else "#1f77b4"
        radius = 9 if hit["rank"] == 1 else 7
        parts.append(f'<g class="hit"><title>#{hit["rank"]} {html.escape(hit["name"])} '
                     f'({hit["lat"]:.6f}, {hit["lon"]:.6f})</title>'
                     f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{radius}" fill="{colour}" '
                     'fill-opacity="0.85" stroke="#fff"/>'
                     f'<text x="{x:.1f}" y="{y + 4:.1f}" font-size="10" text-anchor="middle" '
                     f'fill="#fff">{hit["rank"]}</text></g>')
    for text, x, y, anchor in ((f"lat {lat0:.5f}", 4, height - 6, "start"),
                               (f"lat {lat1:.5f}", 4, 14, "start"),
                               (f"lon {lon0:.5f}", margin, height - 22, "start"),
                               (f"lon {lon1:.5f}", width - 4, height - 22, "end")):
        parts.append(f'<text x="{x}" y="{y}" font-size="11" fill="#555" '
                     f'text-anchor="{anchor}">{text}</text>')
    parts.append("</svg>")
    return "".join(parts)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>ssageo: where was this taken?</title>
<style>
body { font: 15px/1.4 system-ui, sans-serif; margin: 24px; color: #222; max-width: 1200px; }
h1 { font-size: 22px; margin: 0 0 4px; }
.about { color: #555; margin: 0 0 16px; }
#drop { border: 2px dashed #888; border-radius: 8px; padding: 22px; text-align: center;
        background: #f7f7f7; }
#drop.over { background: #e8f0ff; border-color: #36c; }
#controls { margin: 10px 0; display: flex; gap: 18px; align-items: center; }
#controls input[type=number] { width: 70px; }
#message { margin: 12px 0; padding: 10px 12px; border-radius: 6px; display: none; }
#message.error { display: block; background: #fde8e8; color: #8a1010; }
#message.note { display: block; background: #fff6dd; color: #6a4b00; }
#message.busy, #message.info { display: block; background: #eef; color: #224; }
#out { display: none; }
.row { display: flex; gap: 24px; flex-wrap: wrap; align-items: flex-start; }
table { border-collapse: collapse; }
td, th { padding: 4px 10px; border-bottom: 1px solid #ddd; text-align: left; }
td img { image-rendering: pixelated; width: 96px; height: 96px; object-fit: contain; }
.pair img { width: 200px; height: 200px; image-rendering: pixelated; border: 1px solid #ccc; }
.pair figure { display: inline-block; margin: 0 12px 0 0; }
#query { max-width: 100%; max-height: 180px; border: 1px solid #ccc; }
</style></head>
<body>
<h1>Where was this taken?</h1>
<p class="about">Index <b>__INDEX__</b>: __COUNT__ satellite tiles, model __MODEL__ (query
input __QUERY__). Everything runs on this computer; nothing is sent elsewhere.</p>
<div id="drop">Drop a 360&deg; panorama (north at the centre column) or a photo here, or
<input type="file" id="file" accept="image/*"></div>
<div id="controls">
<label>field of view <input type="number" id="fov" min="1" max="360" value="360"> &deg;</label>
<label>tiles shown <input type="number" id="topk" min="1" max="50" value="__TOPK__"></label>
<span>uploads up to __MAXMB__ MB</span></div>
<div id="message" role="status"></div>
<div id="out">
<p><img id="query" alt="your image"></p>
<div class="row">
<div class="pair"><figure><img id="best" alt="best tile"><figcaption>best tile</figcaption>
</figure><figure id="bevfig"><img id="bev" alt="BEV prediction"><figcaption>BEV prediction
P(object) from your image, north up</figcaption></figure><p id="bevnote"></p></div>
<div id="plot"></div></div>
<table><thead><tr><th>rank</th><th>tile</th><th>score</th><th>lat</th><th>lon</th>
<th>name</th></tr></thead><tbody id="results"></tbody></table>
</div>
<script>
"use strict";
const maxBytes = __MAXBYTES__;
const $ = id => document.getElementById(id);
function say(kind, text) { const m = $("message"); m.className = kind; m.textContent = text; }
function cell(row, content) { const td = row.insertCell(); td.append(content); return td; }
function show(answer, file) {
  $("query").src = URL.createObjectURL(file);
  const body = $("results"); body.replaceChildren();
  for (const hit of answer.results) {
    const row = body.insertRow(); row.dataset.tile = hit.tile;
    cell(row, String(hit.rank));
    const img = new Image(); img.src = hit.thumb; img.alt = hit.name; cell(row, img);
    cell(row, hit.score.toFixed(4)); cell(row, hit.lat.toFixed(6));
    cell(row, hit.lon.toFixed(6)); cell(row, hit.name).title = hit.tile;
  }
  $("best").src = answer.results[0].thumb;
  $("bevfig").style.display = answer.bev ? "inline-block" : "none";
  if (answer.bev) $("bev").src = answer.bev;
  $("bevnote").textContent = answer.bev_note || "";
  $("plot").innerHTML = answer.plot;
  $("out").style.display = "block";
  document.body.dataset.state = "done";
  if (answer.notes.length) say("note", answer.notes.join(" "));
  else say("info", `${file.name}: the ${answer.results.length} best tiles of the index ` +
           `(${answer.time_s.toFixed(2)} s)`);
}
async function locate(file) {
  document.body.dataset.state = "busy";
  if (file.size > maxBytes) {
    document.body.dataset.state = "error";
    return say("error", `${file.name}: ${(file.size / 1e6).toFixed(1)} MB is more than this ` +
               `page accepts (${maxBytes / 1e6} MB)`);
  }
  say("busy", `locating ${file.name} ...`);
  const query = new URLSearchParams({name: file.name, fov: $("fov").value,
                                     top_k: $("topk").value});
  let answer;
  try {
    const response = await fetch("/locate?" + query, {method: "POST", body: file});
    answer = await response.json();
  } catch (err) {
    answer = {error: `no answer from the server (${err})`};
  }
  if (answer.error) { document.body.dataset.state = "error"; return say("error", answer.error); }
  show(answer, file);
}
$("file").addEventListener("change", e => { if (e.target.files[0]) locate(e.target.files[0]); });
const drop = $("drop");
drop.addEventListener("dragover", e => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", e => {
  e.preventDefault(); drop.classList.remove("over");
  if (e.dataTransfer.files[0]) locate(e.dataTransfer.files[0]);
});
document.body.dataset.state = "ready";
</script></body></html>
"""


def render_page(index_name: str, count: int, model: str, query_size: tuple[int, int],
                top_k: int, max_bytes: int) -> str:
    """The page, filled in for one index."""
    values = {"__INDEX__": html.escape(index_name), "__COUNT__": f"{count:,}",
              "__MODEL__": html.escape(model), "__QUERY__": f"{query_size[1]}x{query_size[0]}",
              "__TOPK__": str(top_k), "__MAXMB__": f"{max_bytes / 1e6:g}",
              "__MAXBYTES__": str(max_bytes)}
    page = PAGE
    for key, value in values.items():
        page = page.replace(key, value)
    return page
