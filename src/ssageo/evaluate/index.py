"""The geo index (satellite tile descriptors + coordinates) and :class:`Localizer`.

An index is ONE uncompressed ``.npz`` file (below), or, for large areas, a folder of shards
(exact or faiss IVF-PQ, :mod:`ssageo.evaluate.shards`); :func:`open_index` opens either, and
both answer ``search(queries, k)``, which :class:`Localizer` uses. The file, written atomically:

- ``descriptors``: (N, D) float32 L2-normalised descriptors of the satellite tiles
- ``coords``: (N, 2) float64 tile-centre (lat, lon) in degrees
- ``tiles``: (N,) str, the tile image paths
- ``metadata``: a JSON string: ``format`` ("ssageo-index"), ``version``, ``model_hash`` (the
  model's identity: its config's ``model`` section without ``pretrained``, plus the input
  sizes), ``model``, ``reference_size``, ``query_size``, ``checkpoint`` (absolute path),
  ``weights_sha256``, ``descriptor_dim``, ``count``, ``source``, ``created``, ``ssageo``.

The index refers to its checkpoint rather than embedding a copy (a copy would add the model's
size to every index): ``Localizer(index)`` reopens the recorded checkpoint, and any other
checkpoint given instead must have the same model identity and the same weights, so the query
descriptors always live in the index's descriptor space.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ssageo import __version__
from ssageo.config import config_hash
from ssageo.evaluate.ann import exact_topk
from ssageo.io import DataError, atomic_write, read_image

if TYPE_CHECKING:  # torch is imported where a model runs: an index opens without it (--onnx)
    import torch

if TYPE_CHECKING:  # shardindex imports this module
    from ssageo.evaluate.shardindex import ShardedIndex

INDEX_FORMAT = "ssageo-index"
INDEX_VERSION = 1
NORM_TOLERANCE = 1e-3  # float32 descriptors written by build_index are unit length to ~1e-7
WEIGHTS_FILE = "model.safetensors"  # the weights file inside a checkpoint directory


def model_identity(config: dict) -> str:
    """Hash of what fixes a model's descriptor space shape: ``model`` section and input sizes."""
    model = {k: v for k, v in config["model"].items() if k != "pretrained"}
    data = config["data"]
    sizes = {"reference_size": list(data["reference_size"]), "query_size": list(data["query_size"])}
    return config_hash({"model": model, **sizes})


def weights_file(checkpoint: str | Path) -> Path:
    """The weights file of a checkpoint directory (or the file itself)."""
    checkpoint = Path(checkpoint)
    return checkpoint / WEIGHTS_FILE if checkpoint.is_dir() else checkpoint


def load_checkpoint(
    checkpoint: str | Path, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, dict, str]:
    """(model, config, SHA-256 of its weights) from ONE read of the weights file.

    The hash is of the very bytes the weights were loaded from, so a checkpoint replaced
    meanwhile (a training run updating ``last``) can never pair one file's hash with another
    file's descriptors.
    """
    from ssageo.model import load_model

    path = weights_file(checkpoint)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: weights file not found") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read the weights ({exc.strerror})") from None
    model, config = load_model(checkpoint, map_location=device, data=data)
    return model, config, hashlib.sha256(data).hexdigest()


def is_index_file(path: Path) -> bool:
    """True when ``path`` is an ssageo index (its metadata says so); reads nothing else."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return json.loads(str(npz["metadata"])).get("format") == INDEX_FORMAT
    except Exception:  # noqa: BLE001 - anything unreadable is simply not an index
        return False


@dataclass
class GeoIndex:
    """A loaded index: descriptors (N, D), coords (N, 2), tile paths (N,) and its metadata."""

    descriptors: np.ndarray
    coords: np.ndarray
    tiles: list[str]
    metadata: dict
    path: Path | None = None

    def save(self, path: str | Path) -> Path:
        """Write the index to ``path`` atomically; returns the path."""
        path = Path(path)
        arrays = {
            "descriptors": self.descriptors.astype(np.float32),
            "coords": self.coords.astype(np.float64),
            "tiles": np.asarray(self.tiles, dtype=str),
            "metadata": np.asarray(json.dumps(self.metadata)),
        }

        def write(tmp: Path) -> None:
            with tmp.open("wb") as f:
                np.savez(f, **arrays)

        atomic_write(path, write)
        return path

    def search(self, queries: np.ndarray, k: int, **_: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact (cosine scores, rows) of the ``k`` best tiles per query (B, D), best first."""
        return exact_topk(queries, [(0, self.descriptors)], k)

    @classmethod
    def load(cls, path: str | Path) -> GeoIndex:
        """Read and check an index file; DataError naming it when it is not a usable index."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: index file not found")
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
            metadata = json.loads(str(arrays["metadata"]))
        except KeyError:
            raise DataError(f"{path}: not an ssageo index (no 'metadata' entry)") from None
        except Exception as exc:  # noqa: BLE001 - zip, zlib, numpy and json all raise their own
            raise DataError(
                f"{path}: not an ssageo index or truncated ({type(exc).__name__}: {exc})"
            ) from None
        if not isinstance(metadata, dict) or metadata.get("format") != INDEX_FORMAT:
            raise DataError(f"{path}: not an ssageo index (no '{INDEX_FORMAT}' metadata)")
        if metadata.get("version") != INDEX_VERSION:
            raise DataError(
                f"{path}: index format version {metadata.get('version')}; this "
                f"ssageo reads version {INDEX_VERSION} - rebuild the index"
            )
        _check_index(path, arrays, metadata)
        desc, coords, tiles = arrays["descriptors"], arrays["coords"], arrays["tiles"]
        return cls(desc, coords, [str(t) for t in tiles], metadata, path)


_METADATA_KEYS = ("model_hash", "model", "reference_size", "query_size", "checkpoint",
                  "weights_sha256", "descriptor_dim", "count")


def _check_index(path: Path, arrays: dict[str, np.ndarray], metadata: dict) -> None:
    """DataError naming ``path`` and the first problem: missing entries, wrong dtypes or
    shapes, non-finite or unnormalised descriptors, impossible coordinates."""
    missing = [k for k in ("descriptors", "coords", "tiles") if k not in arrays]
    missing += [f"metadata.{k}" for k in _METADATA_KEYS if k not in metadata]
    if missing:
        raise DataError(f"{path}: index lacks {', '.join(missing)}")
    desc, coords, tiles = arrays["descriptors"], arrays["coords"], arrays["tiles"]
    n, dim = metadata["count"], metadata["descriptor_dim"]
    if desc.dtype != np.float32 or coords.dtype.kind != "f" or tiles.dtype.kind != "U":
        raise DataError(
            f"{path}: index entries have the wrong types: descriptors {desc.dtype} (must be "
            f"float32), coords {coords.dtype} (float), tiles {tiles.dtype} (str)"
        )
    if desc.shape != (n, dim) or coords.shape != (n, 2) or tiles.shape != (n,) or n < 1:
        raise DataError(
            f"{path}: index is inconsistent: descriptors {desc.shape}, coords "
            f"{coords.shape}, tiles {tiles.shape}, metadata says {n} x {dim}"
        )
    bad = np.flatnonzero(~np.isfinite(desc).all(axis=1))
    if bad.size:
        raise DataError(
            f"{path}: {bad.size} descriptor rows hold NaN or infinite values (first: row "
            f"{bad[0]}, tile {tiles[bad[0]]}); rebuild the index"
        )
    norms = np.linalg.norm(desc.astype(np.float64), axis=1)
    if np.abs(norms - 1).max() > NORM_TOLERANCE:
        raise DataError(
            f"{path}: descriptors are not L2-normalised (row norms {norms.min():.4g}.."
            f"{norms.max():.4g}); rebuild the index"
        )
    lat, lon = coords[:, 0], coords[:, 1]
    bad = np.flatnonzero(~(np.isfinite(coords).all(axis=1) & (np.abs(lat) <= 90)
                           & (np.abs(lon) <= 180)))
    if bad.size:
        raise DataError(
            f"{path}: {bad.size} impossible coordinates (first: row {bad[0]}, lat "
            f"{lat[bad[0]]}, lon {lon[bad[0]]}; need |lat| <= 90, |lon| <= 180)"
        )


def index_metadata(
    checkpoint: str | Path, config: dict, weights_sha256: str, dim: int, count: int, source: str
) -> dict:
    """The metadata every index kind records: model identity, weights hash, sizes, source."""
    return {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "model_hash": model_identity(config),
        "model": config["model"],
        "reference_size": list(config["data"]["reference_size"]),
        "query_size": list(config["data"]["query_size"]),
        "checkpoint": str(Path(checkpoint).resolve()),
        "weights_sha256": weights_sha256,
        "descriptor_dim": int(dim),
        "count": int(count),
        "source": source,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "ssageo": __version__,
    }


def open_index(path: str | Path, in_memory: bool = False) -> GeoIndex | ShardedIndex:
    """A :class:`GeoIndex` (one ``.npz`` file) or a sharded index (a folder with a manifest;
    ``in_memory``: its re-ranking store read into RAM now, not memory-mapped)."""
    path = Path(path)
    if path.is_dir():
        from ssageo.evaluate.shardindex import ShardedIndex

        return ShardedIndex.load(path, in_memory)
    return GeoIndex.load(path)


def build_index(
    checkpoint: str | Path,
    tiles: Sequence[str | Path],
    coords: np.ndarray,
    out: str | Path,
    source: str = "",
    batch_size: int = 64,
    workers: int = 0,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> GeoIndex:
    """Embed the satellite ``tiles`` (with (N, 2) lat/lon ``coords``) with the checkpoint's
    model on ``device`` and write the index to ``out``; returns the index."""
    from ssageo.evaluate.embed import embed_paths

    coords = np.asarray(coords, dtype=np.float64)
    if coords.shape != (len(tiles), 2):
        raise ValueError(f"coords must be ({len(tiles)}, 2) lat/lon, got {coords.shape}")
    model, config, weights_sha256 = load_checkpoint(checkpoint, device)
    descriptors = embed_paths(
        model, tiles, config["data"]["reference_size"], "reference", batch_size, workers, progress
    )
    metadata = index_metadata(
        checkpoint, config, weights_sha256, descriptors.shape[1], len(tiles), source
    )
    index = GeoIndex(descriptors, coords, [str(t) for t in tiles], metadata)
    index.path = index.save(out)
    return index


class Localizer:
    """Answers "where is this panorama?" from a geo index.

    ``Localizer(index_path, checkpoint=None)`` opens the index and the model (the checkpoint the
    index was built from, unless another is given). A checkpoint whose model identity or weights
    differ from the index's is refused with DataError. ``in_memory``: a sharded index's
    re-ranking store is read into RAM at once (:func:`open_index`).
    """

    def __init__(
        self,
        index_path: str | Path,
        checkpoint: str | Path | None = None,
        device: str | torch.device = "cpu",
        in_memory: bool = False,
    ) -> None:
        self.index = open_index(index_path, in_memory)
        meta, where = self.index.metadata, self.index.path
        checkpoint = Path(checkpoint or meta["checkpoint"])
        if not weights_file(checkpoint).is_file():
            raise DataError(
                f"{checkpoint}: checkpoint of index {where} not found; pass the "
                "checkpoint it was built from (--checkpoint)"
            )
        self.model, self.config, weights_sha256 = load_checkpoint(checkpoint, device)
        identity = model_identity(self.config)
        if identity != meta["model_hash"]:
            raise DataError(
                f"{checkpoint}: model configuration {identity} (backbone "
                f"{self.config['model'].get('backbone')}) does not match index {where}, built by "
                f"configuration {meta['model_hash']} (backbone {meta['model'].get('backbone')}); "
                "rebuild the index with this checkpoint (ssageo index build)"
            )
        if weights_sha256 != meta["weights_sha256"]:
            raise DataError(
                f"{checkpoint}: same model configuration but different weights "
                f"than those index {where} was built with; rebuild the index"
            )
        self.model.eval()
        self.timings: list[dict] = []  # per query of the last locate_many: embed_s, search_s
        self.query_size = tuple(self.config["data"]["query_size"])

    def query_tensor(self, image: str | Path | np.ndarray,
                     fov: float | None = None) -> torch.Tensor:
        """(3, H, W) model input of a panorama, or (``fov`` given) of a pinhole photo."""
        from ssageo.data.datasets import ImageDataset
        from ssageo.data.transforms import resize, to_tensor

        norm = self.model.data_config()
        if fov is not None:  # a pinhole photo: the panorama band it covers
            from ssageo.evaluate.photos import photo_band

            band = photo_band(read_image(image) if not isinstance(image, np.ndarray) else image,
                              fov, self.query_size)
            return to_tensor(band, norm["mean"], norm["std"])
        if isinstance(image, np.ndarray):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(
                    f"expected an (H, W, 3) uint8 RGB array, got {image.shape} {image.dtype}"
                )
            return to_tensor(resize(image, self.query_size), norm["mean"], norm["std"])
        return ImageDataset([image], self.query_size, norm["mean"], norm["std"])[0]["image"]

    def embed(self, images: Sequence[str | Path | np.ndarray],
              fovs: Sequence[float | None] | None = None) -> np.ndarray:
        """(B, D) query descriptors of panoramas given as paths or (H, W, 3) uint8 arrays;
        an image with a FoV in ``fovs`` is a pinhole photo of that horizontal FoV (degrees).
        A batch holds images of one input size: one FoV, or panoramas only."""
        import torch

        fovs = fovs if fovs is not None else [None] * len(images)
        x = torch.stack([self.query_tensor(im, f) for im, f in zip(images, fovs, strict=True)])
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            desc = self.model.embed(x.to(device), view="query").float().cpu()
        if desc.shape[1] != self.index.metadata["descriptor_dim"]:
            raise DataError(
                f"{self.index.path}: descriptor dimension mismatch: index holds "
                f"{self.index.metadata['descriptor_dim']}, the model gives {desc.shape[1]}"
            )
        return desc.numpy()

    def locate_many(
        self, images: Sequence[str | Path | np.ndarray], top_k: int = 5, batch_size: int = 16,
        nprobe: int = 32, rerank: int = 100, fovs: Sequence[float | None] | None = None,
    ) -> list[list[dict]]:
        """:meth:`locate` for several images, embedded ``batch_size`` at a time (pinhole
        photos, with a horizontal FoV per image in ``fovs``, one at a time: their widths
        differ).

        A compressed index visits ``nprobe`` inverted lists and re-scores its ``rerank`` best
        candidates exactly when it stores float descriptors (both ignored by exact indexes).
        ``self.timings`` then holds each query's share of its batch's embed and search time.
        """
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        results, self.timings = [], []
        batch_size = 1 if fovs is not None else batch_size
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            t0 = time.perf_counter()
            desc = self.embed(batch, None if fovs is None else fovs[start : start + batch_size])
            t1 = time.perf_counter()
            scores, rows = self.index.search(desc, top_k, nprobe=nprobe, rerank=rerank)
            t2 = time.perf_counter()
            for values, indices in zip(scores.tolist(), rows.tolist(), strict=True):
                hits = zip(values, indices, strict=True)
                results.append([self._hit(r, i, v) for r, (v, i) in enumerate(hits) if i >= 0])
                self.timings.append({"embed_s": (t1 - t0) / len(batch),
                                     "search_s": (t2 - t1) / len(batch)})
        return results

    def _hit(self, rank: int, i: int, score: float) -> dict:
        lat, lon = self.index.coords[i]
        return {
            "rank": rank + 1,
            "tile": self.index.tiles[i],
            "lat": float(lat),
            "lon": float(lon),
            "score": float(score),
        }

    def locate(self, image: str | Path | np.ndarray, top_k: int = 5) -> list[dict]:
        """The ``top_k`` best tiles for one panorama (a path or an (H, W, 3) uint8 RGB array):
        ``[{"rank", "tile", "lat", "lon", "score"}, ...]``, best (highest cosine) first."""
        return self.locate_many([image], top_k)[0]
