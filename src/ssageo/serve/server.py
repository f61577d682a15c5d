"""``ssageo serve``: a local page where a person drops an image and sees where it was taken.

Python's own ``http.server`` serves it, so the page needs no extra dependency and works
offline: one HTML page (``GET /``) whose script posts the image's bytes to ``POST /locate``
and draws the JSON answer (top-k tiles with scores and lat/lon, the BEV prediction beside the
best tile, an SVG plot of where they lie). Requests are answered one image at a time (a lock
around the model); the server listens on 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import errno
import json
import re
import sys
import tempfile
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np

from ssageo.io import DataError, read_image
from ssageo.serve.page import (
    coordinate_plot,
    png_data_uri,
    probability_image,
    render_page,
    thumbnail,
)

DEFAULT_MAX_BYTES = 25_000_000
DRAIN_LIMIT = 256_000_000  # refused uploads up to this size are read and dropped
ASPECT_TOLERANCE = 0.25  # relative aspect difference from the model's panoramas that is noted


def _safe_name(name: str) -> str:
    """An upload's file name reduced to a harmless single path component."""
    name = re.sub(r"[^\w.\- ]", "_", Path(name or "upload").name)[:120].strip()
    return name if name not in ("", ".", "..") else "upload"


class LocateService:
    """Locates uploaded images with a :class:`Localizer` and prepares what the page shows."""

    def __init__(self, index: str | Path, checkpoint: str | Path | None = None,
                 device: str = "cpu", top_k: int = 5,
                 max_bytes: int = DEFAULT_MAX_BYTES, in_memory: bool = False) -> None:
        from ssageo.evaluate.index import Localizer

        self.localizer = Localizer(index, checkpoint, device, in_memory)
        self.index_path = Path(index)
        self.top_k, self.max_bytes = top_k, max_bytes
        self.lock = threading.Lock()
        self.count = len(self.localizer.index.coords)  # a sharded manifest's metadata has 0

    def page(self) -> str:
        """The page's HTML for this index."""
        meta = self.localizer.index.metadata
        return render_page(self.index_path.name, self.count,
                           str(meta["model"].get("backbone")), self.localizer.query_size,
                           self.top_k, self.max_bytes)

    def locate(self, data: bytes, name: str, fov: float | None = None,
               top_k: int | None = None) -> dict:
        """The page's answer for an uploaded image (its bytes and file name).

        DataError (shown on the page) for an image that cannot be decoded or is too large, or
        a field of view outside 1..360 degrees; a FoV under 360 makes the image a photo.
        """
        name = _safe_name(name)
        if len(data) > self.max_bytes:
            raise DataError(f"{name}: {len(data) / 1e6:.1f} MB is more than this page accepts "
                            f"({self.max_bytes / 1e6:g} MB; ssageo serve --max-upload-mb)")
        top_k = min(max(int(top_k or self.top_k), 1), 50)
        with tempfile.TemporaryDirectory(prefix="ssageo-serve-") as folder:
            path = Path(folder) / name
            path.write_bytes(data)
            try:
                image = read_image(path)
            except DataError as exc:  # name the upload, not the temporary folder
                raise DataError(str(exc).replace(str(path), name)) from None
        notes = self._notes(image, fov)
        # a photo (FoV < 360) is mapped onto the panorama band it covers (locate --fov)
        kwargs = {"fovs": [fov]} if fov is not None and fov < 360 else {}
        with self.lock:
            start = time.perf_counter()
            hits = self.localizer.locate_many([image], top_k, **kwargs)[0]
            seconds = time.perf_counter() - start
            bev = self._bev(image) if not kwargs else None
        results = [{**hit, "name": Path(hit["tile"]).name, "thumb": self._thumb(hit["tile"])}
                   for hit in hits]
        answer = {"image": name, "size": [image.shape[1], image.shape[0]], "results": results,
                  "time_s": seconds, "notes": notes,
                  "plot": coordinate_plot(self.localizer.index.coords, results)}
        answer["bev"] = None if bev is None else png_data_uri(probability_image(bev))
        answer["bev_note"] = "" if bev is not None else (
            "This model has no BEV head." if getattr(self.localizer.model, "bev", None) is None
            else "")
        return answer

    def _notes(self, image: np.ndarray, fov: float | None) -> list[str]:
        """Why the answer may mislead (said on the page beside it); raises for what cannot be
        answered at all."""
        if fov is not None and not 0 < fov <= 360:
            raise DataError(f"field of view {fov:g} degrees: give 1..360")
        h, w = self.localizer.query_size
        aspect = image.shape[1] / image.shape[0]
        if (fov is None or fov >= 360) and abs(aspect / (w / h) - 1) > ASPECT_TOLERANCE:
            return [f"This image is {image.shape[1]}x{image.shape[0]} (aspect {aspect:.2f}); the "
                    f"model takes 360-degree panoramas of aspect {w / h:.2f}, so a photo is "
                    "stretched to fit and the places below are unreliable; give its field of "
                    "view."]
        return []

    def _thumb(self, tile: str) -> str | None:
        try:
            return png_data_uri(thumbnail(read_image(Path(tile))))
        except DataError:  # the index still answers when its tile images moved away
            return None

    def _bev(self, image: np.ndarray) -> np.ndarray | None:
        """(S, S) P(object) predicted from the image by the model's BEV head (north up)."""
        import torch

        model = self.localizer.model
        if getattr(model, "bev", None) is None:
            return None
        x = self.localizer.query_tensor(image)[None].to(next(model.parameters()).device)
        with torch.inference_mode():
            logits = model(x, None, with_bev=True)["bev_logits"]
        return logits.softmax(dim=1)[0, 1].float().cpu().numpy()


class _Handler(BaseHTTPRequestHandler):
    service: LocateService  # set on the subclass made by make_server
    server_version = "ssageo"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base's signature
        pass  # one line per request would bury the URL line; failures are printed below

    def _send(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, payload: dict) -> None:
        self._send(status, json.dumps(payload).encode("utf-8"), "application/json")

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if urlsplit(self.path).path == "/":
            self._send(200, self.service.page().encode("utf-8"), "text/html; charset=utf-8")
        elif self.path == "/favicon.ico":
            self._send(204, b"", "image/x-icon")
        else:
            self._json(404, {"error": f"{self.path}: no such page"})

    def _discard(self, length: int) -> None:
        """Read and drop a refused upload, so the client gets to read the answer (a client
        still sending when the connection closes sees only a broken pipe); past
        DRAIN_LIMIT the connection is closed instead."""
        if length > DRAIN_LIMIT:
            self.close_connection = True
            return
        while length > 0:
            chunk = self.rfile.read(min(length, 1 << 20))
            if not chunk:
                break
            length -= len(chunk)

    def do_POST(self) -> None:  # noqa: N802
        url = urlsplit(self.path)
        if url.path != "/locate":
            return self._json(404, {"error": f"{url.path}: no such endpoint"})
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        name = _safe_name(query.get("name", "upload"))
        length = int(self.headers.get("Content-Length") or -1)
        if length < 0:
            return self._json(411, {"error": f"{name}: the upload has no length"})
        if length > self.service.max_bytes:
            self._discard(length)
            return self._json(413, {"error": f"{name}: {length / 1e6:.1f} MB is more than this "
                                    f"page accepts ({self.service.max_bytes / 1e6:g} MB)"})
        data = self.rfile.read(length)
        try:
            fov = float(query["fov"]) if query.get("fov") else None
            top_k = int(query["top_k"]) if query.get("top_k") else None
            self._json(200, self.service.locate(data, name, fov, top_k))
        except (DataError, ValueError) as exc:
            self._json(400, {"error": str(exc).strip().splitlines()[0]})
        except Exception as exc:  # noqa: BLE001 - the page says so; the terminal keeps the trace
            traceback.print_exc(file=sys.stderr)
            self._json(500, {"error": f"internal error ({type(exc).__name__}: {exc}); see the "
                                      "terminal running ssageo serve"})


def make_server(service: LocateService, host: str = "127.0.0.1",
                port: int = 7860) -> ThreadingHTTPServer:
    """A bound (not yet serving) HTTP server for ``service``; port 0 picks a free one."""
    handler = type("Handler", (_Handler,), {"service": service})
    try:
        return ThreadingHTTPServer((host, port), handler)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise DataError(f"{host}:{port}: port already in use; choose another --port") from None
        raise DataError(f"{host}:{port}: cannot listen ({exc.strerror or exc})") from None
