"""Deployment without torch: an exported ONNX encoder (``ssageo export``) run by onnxruntime.

:class:`OnnxEncoder` embeds images; :class:`OnnxLocalizer` is :class:`Localizer` with that
encoder (``ssageo locate --onnx``); :func:`build_onnx_index` writes an index
(``ssageo index build --onnx``). Nothing here imports torch: at query time a deployment loads
numpy, OpenCV and onnxruntime only (tests/test_export.py checks it in a fresh interpreter).

An exported file records the checkpoint's model identity and weights hash, so an index built
by PyTorch answers ONNX queries (and the other way round) only when both come from the same
weights; descriptors of the two runtimes agree to 1e-4 (checked at export).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ssageo.config import ConfigError
from ssageo.evaluate.index import GeoIndex, Localizer, index_metadata, open_index
from ssageo.io import DataError, read_image

if TYPE_CHECKING:  # not imported when run: the tile readers load the data stage (torch)
    from ssageo.evaluate.tiles import TileTable

EXPORT_FORMAT = "ssageo-encoder"
METADATA_KEY = "ssageo"  # ONNX metadata_props key holding the JSON record
TORCHSCRIPT_EXTRA = "ssageo.json"  # its TorchScript counterpart, an extra file in the archive
INPUT_NAME, OUTPUT_NAME = "pixels", "descriptors"
INSTALL_HINT = "pip install 'ssageo[onnx]'"


def onnx_session(path: str | Path | None) -> Any:  # onnxruntime.InferenceSession | None
    """An onnxruntime CPU session of ``path`` (None: only check that onnxruntime is there).

    ConfigError when onnxruntime is missing; DataError naming the file when it is missing or
    not an ONNX model.
    """
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError(f"ONNX needs onnxruntime, which is not installed ({INSTALL_HINT})"
                          ) from None
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: ONNX file not found")
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: no per-node placement notes on stderr
    try:
        return onnxruntime.InferenceSession(str(path), options,
                                            providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own, unexported classes
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: not a usable ONNX model ({first})") from None


def export_record(path: Path, session: Any) -> dict:  # an onnxruntime.InferenceSession
    """The ``ssageo export`` record of an ONNX session; DataError when it has none."""
    text = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    try:
        record = json.loads(text) if text else None
    except json.JSONDecodeError:
        record = None
    if not isinstance(record, dict) or record.get("format") != EXPORT_FORMAT:
        raise DataError(f"{path}: an ONNX model, but not one written by `ssageo export` (no "
                        f"'{METADATA_KEY}' metadata): its input size and model are unknown")
    return record


def is_onnx_export(path: str | Path) -> bool:
    """True for an ONNX file written by ``ssageo export`` (reads its metadata only)."""
    try:
        import onnx

        with open(path, "rb") as f:
            proto = onnx.load_model(f, load_external_data=False)
        props = {p.key: p.value for p in proto.metadata_props}
        return json.loads(props[METADATA_KEY]).get("format") == EXPORT_FORMAT
    except Exception:  # noqa: BLE001 - anything unreadable is simply not an export
        return False


def resize_exact(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """``ssageo.data.transforms.resize`` (that module imports torch): INTER_LINEAR_EXACT to
    (H, W); tests/test_export.py checks that both give the same descriptors."""
    import cv2

    h, w = int(size[0]), int(size[1])
    if image.shape[:2] == (h, w):
        return image
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR_EXACT)


class OnnxEncoder:
    """One exported encoder: ``embed(images)`` -> (B, D) float32 L2-normalised descriptors.

    ``record`` is the export's metadata (view, input size, model identity, checkpoint).
    """

    def __init__(self, path: str | Path, view: str | None = None, option: str = "--onnx") -> None:
        self.path = Path(path)
        self.session = onnx_session(self.path)
        self.record = export_record(self.path, self.session)
        if view is not None and self.record["view"] != view:
            raise DataError(
                f"{self.path}: holds the {self.record['view']} encoder; {option} here needs "
                f"the {view} encoder (ssageo export --view {view})")
        self.view = self.record["view"]
        self.size = tuple(int(v) for v in self.record["input_size"])

    def pixels(self, image: str | Path | np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 input of an image path or an (h, w, 3) uint8 RGB array."""
        if isinstance(image, np.ndarray):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(
                    f"expected an (H, W, 3) uint8 RGB array, got {image.shape} {image.dtype}")
            return resize_exact(image, self.size)
        return resize_exact(read_image(Path(image)), self.size)

    def embed(self, images: Sequence[str | Path | np.ndarray], batch_size: int = 16,
              progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Descriptors of ``images``, ``batch_size`` at a time (``progress(n)`` after each)."""
        chunks = []
        for start in range(0, len(images), batch_size):
            batch = np.stack([self.pixels(im) for im in images[start:start + batch_size]])
            chunks.append(self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0])
            if progress is not None:
                progress(len(batch))
        if not chunks:
            raise ValueError("no images to embed")
        return np.concatenate(chunks).astype(np.float32, copy=False)


def check_same_model(encoder: OnnxEncoder, metadata: dict, where: Path | None) -> None:
    """DataError unless ``encoder`` comes from the weights the index ``metadata`` records."""
    record = encoder.record
    if record["model_hash"] != metadata["model_hash"]:
        raise DataError(
            f"{encoder.path}: exported from model configuration {record['model_hash']} "
            f"(backbone {record['model'].get('backbone')}), but index {where} was built by "
            f"{metadata['model_hash']} (backbone {metadata['model'].get('backbone')}); export "
            "the index's checkpoint or rebuild the index")
    if record["weights_sha256"] != metadata["weights_sha256"]:
        raise DataError(f"{encoder.path}: same model configuration but other weights than "
                        f"index {where} was built with; export the index's checkpoint")


class OnnxLocalizer(Localizer):
    """:class:`Localizer` whose query encoder is an exported ONNX file (no torch)."""

    def __init__(self, index_path: str | Path, onnx_path: str | Path,
                 in_memory: bool = False) -> None:
        self.index = open_index(index_path, in_memory)
        self.encoder = OnnxEncoder(onnx_path, view="query")
        check_same_model(self.encoder, self.index.metadata, self.index.path)
        self.timings: list[dict] = []
        self.query_size = self.encoder.size

    def embed(self, images: Sequence[str | Path | np.ndarray],
              fovs: Sequence[float | None] | None = None) -> np.ndarray:
        """(B, D) query descriptors of panoramas given as paths or (H, W, 3) uint8 arrays
        (an exported encoder takes panoramas only: photos need the PyTorch model)."""
        if fovs is not None and any(f is not None for f in fovs):
            raise ConfigError("photos (a field of view) need the PyTorch model, not --onnx")
        return self.encoder.embed(images, batch_size=max(len(images), 1))


def build_onnx_index(
    onnx_path: str | Path, table: TileTable, out: str | Path,
    source: str, kind: str = "exact", shard_size: int = 65536, lists: int | None = None,
    pq_bytes: int = 32, rerank_store: str | bool = "float32", extend: bool = False,
    batch_size: int = 64,
    log: Callable[[str], None] = lambda _: None, pca: int = 0,
) -> dict:
    """Embed the tiles of ``table`` (:mod:`ssageo.evaluate.tiles`) with an exported reference
    encoder into an index at ``out``: one ``.npz`` file or a sharded folder (the arguments of
    ``build_tile_index``). The index records the checkpoint the encoder was exported from.
    Returns the index's metadata."""
    encoder = OnnxEncoder(onnx_path, view="reference")
    record = encoder.record
    config = {"model": record["model"], "data": {k: record[k] for k in
                                                 ("reference_size", "query_size")}}

    def embed_list(paths: Sequence[str | Path]) -> np.ndarray:
        return encoder.embed(paths, batch_size)

    if Path(out).suffix == ".npz":
        tiles, coords = table.rows(0, len(table))
        descriptors = embed_list(tiles)
        metadata = index_metadata(record["checkpoint"], config, record["weights_sha256"],
                                  descriptors.shape[1], len(tiles), source)
        GeoIndex(descriptors, coords, [str(t) for t in tiles], metadata).save(out)
        return metadata
    from ssageo.evaluate.shards import build_sharded

    metadata = index_metadata(record["checkpoint"], config, record["weights_sha256"],
                              int(record["descriptor_dim"]), 0, source)
    manifest = build_sharded(out, table, lambda a, b: embed_list(table.rows(a, b)[0]), metadata,
                             kind, shard_size, lists, pq_bytes, rerank_store, extend,
                             embed_rows=lambda rows: embed_list(table.paths_at(rows)), log=log,
                             pca=pca)
    return {**manifest["metadata"], "count": manifest["count"]}
