"""Sharded geo indexes for large areas: a folder of shards and one ``manifest.json``.

Layout of an index folder (every file written atomically, the manifest last):

- ``manifest.json``: ``format`` ("ssageo-sharded-index"), ``version``, ``kind`` ("exact" or
  "ivfpq"), ``params`` (shard size, lists, PQ bytes, float store), ``metadata`` (the same
  model identity / weights hash / sizes as a single-file index), ``count``, ``complete``,
  ``build_first`` (row where the running build's input starts), ``trained`` and ``shards``: per
  shard its row range and each file's size and SHA-256.
- ``shard-NNNNN.npz``: the shard's tile paths, (n, 2) lat/lon and, for ``ivfpq``, its (n, C)
  uint8 codes (inverted-list number + PQ code).
- ``shard-NNNNN.f32.npy``: the shard's (n, D) float32 descriptors (always for ``exact``; for
  ``ivfpq`` with the float32 re-ranking store), memory-mapped when searched.
- ``shard-NNNNN.sq12.npy`` / ``.sq8.npy``: for ``ivfpq`` with a compressed re-ranking store,
  the descriptors as uint8 rows: inverted-list number and the residual to its centroid in 12
  or 8 bits per dimension (3/8 or 1/4 of float32: RAM-resident where float32 would not be).
- ``ivfpq.trained``: the trained, empty faiss IVF-PQ index every shard is encoded against;
  ``residual-sq.npz`` the compressed store's quantiser (:class:`ann.ResidualSQ`).

Searching a built folder: :mod:`ssageo.evaluate.shardindex`.

A build writes shard after shard and rewrites the manifest after each, so an interrupted build
rerun with the same input keeps (after verifying) the shards already written; ``extend`` adds
the tiles of a new input after the existing ones, without touching them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ssageo.config import ConfigError
from ssageo.evaluate import ann
from ssageo.io import DataError, OutputError, atomic_write, atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:  # not imported when run: the tile readers load the data stage (torch)
    from ssageo.evaluate.tiles import TileTable

SHARDED_FORMAT = "ssageo-sharded-index"
SQ = "residual-sq.npz"
STORE_SUFFIX = {"float32": ".f32.npy", "sq12": ".sq12.npy", "sq8": ".sq8.npy"}  # shard files
SHARDED_VERSION = 1
MANIFEST = "manifest.json"
TRAINED = "ivfpq.trained"
DEFAULT_SHARD_SIZE = 65536  # tiles per shard: 256 MB of float32 at 1024-d, 2 MB of codes
KINDS = ("exact", "ivfpq")
_IDENTITY = ("model_hash", "weights_sha256", "descriptor_dim")  # must match to resume/extend


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _record(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def verify_file(folder: Path, name: str, record: dict, what: str) -> Path:
    """DataError naming the file when it is missing or differs from its manifest record."""
    path = folder / name
    if not path.is_file():
        raise DataError(f"{path}: {what} is missing (listed in {folder / MANIFEST}); rebuild "
                        "the index or restore the file")
    if path.stat().st_size != record["bytes"] or _sha256(path) != record["sha256"]:
        raise DataError(f"{path}: {what} is corrupt (size or SHA-256 differs from "
                        f"{folder / MANIFEST}); rebuild the index or restore the file")
    return path


def read_manifest(folder: Path) -> dict | None:
    """The manifest of an index folder, None when there is none; DataError when unreadable."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable index manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != SHARDED_FORMAT:
        raise DataError(f"{path}: not an ssageo sharded index manifest")
    if manifest.get("version") != SHARDED_VERSION:
        raise DataError(f"{path}: sharded index version {manifest.get('version')}; this ssageo "
                        f"reads version {SHARDED_VERSION} - rebuild the index")
    params = manifest.get("params", {})
    if "rerank_store" in params:  # true / false in indexes built before compressed stores
        params["rerank_store"] = ann.store_kind(params["rerank_store"])
    return manifest


def _write_manifest(folder: Path, manifest: dict) -> None:
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def _start(folder: Path, metadata: dict, kind: str, params: dict, extend: bool) -> dict:
    """The manifest to build on: a new one, an interrupted build's, or a complete index's to
    extend. Refuses what would mix descriptor spaces or parameters."""
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: exists and is not an ssageo index folder; refusing to "
                          "replace it (choose another --out; a single-file index ends in .npz)")
    manifest = read_manifest(folder)
    if manifest is None:
        if extend:
            raise DataError(f"{folder}: no index to extend ({MANIFEST} not found)")
        if folder.exists() and any(folder.iterdir()):
            raise OutputError(f"{folder}: exists and is not an ssageo index folder; refusing to "
                              "write into it (choose another --out)")
        return {"format": SHARDED_FORMAT, "version": SHARDED_VERSION, "kind": kind,
                "params": params, "metadata": metadata, "count": 0, "complete": False,
                "build_first": 0, "trained": None, "shards": []}
    old = manifest["metadata"]
    changed = [k for k in _IDENTITY if old.get(k) != metadata.get(k)]
    changed += ["kind"] if manifest["kind"] != kind else []
    changed += [k for k in params if manifest["params"].get(k) != params[k]]
    if changed:
        raise DataError(f"{folder}: existing index differs in {', '.join(changed)}; resume or "
                        "extend it with the same checkpoint and options, or choose another --out")
    if manifest["complete"]:
        if not extend:
            raise OutputError(f"{folder}: index already complete; pass --extend to add tiles, "
                              "or choose another --out")
        manifest.update(complete=False, build_first=manifest["count"])
    return manifest


def _resume_point(folder: Path, manifest: dict, table: TileTable) -> int:
    """Rows of ``table`` already written by an interrupted build (its shards verified)."""
    first = manifest["build_first"]
    for shard in manifest["shards"]:
        for name, record in shard["files"].items():
            verify_file(folder, name, record, "index shard")
        if shard["first"] < first:
            continue
        start, stop = shard["first"] - first, shard["first"] - first + shard["count"]
        with np.load(folder / shard["name"], allow_pickle=False) as npz:
            written = npz["tiles"].tolist()
        if written != table.rows(start, stop)[0]:
            raise DataError(f"{folder / shard['name']}: holds other tiles than rows {start + 1}.."
                            f"{stop} of this input; an interrupted build must be rerun with the "
                            "same tiles (or choose another --out)")
    return manifest["count"] - first


def training_rows(count: int, size: int, seed: int = 0) -> np.ndarray:
    """A seeded uniform sample of ``size`` sorted row numbers of ``count`` (all when fewer):
    the quantisers' training set spans the whole input, not its first (one region's) rows."""
    if count <= size:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, size, replace=False))


def build_sharded(
    out: str | Path,
    table: TileTable,
    embed: Callable[[int, int], np.ndarray],
    metadata: dict,
    kind: str = "exact",
    shard_size: int = DEFAULT_SHARD_SIZE,
    lists: int | None = None,
    pq_bytes: int = 32,
    rerank_store: str | bool = "float32",
    extend: bool = False,
    train_size: int = 262144,
    pca: int = 0,
    embed_rows: Callable[[np.ndarray], np.ndarray] | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> dict:
    """Write (or resume, or ``extend``) the sharded index ``out`` of the tiles of ``table``
    (paths and lat/lon, read shard by shard: :mod:`ssageo.evaluate.tiles`); ``embed(start,
    stop)`` gives the (n, D) unit descriptors of rows ``start:stop``, called once per shard
    still to write, so memory holds one shard whatever the tile count. Returns the manifest.

    ``ivfpq`` trains its quantisers on up to ``train_size`` descriptors: a uniform sample of
    the whole input (:func:`training_rows`, embedded by ``embed_rows(rows)``) when the input is
    larger than a shard and ``embed_rows`` is given, else the first shard's. ``lists``
    defaults to about 4 sqrt(N) (a power of two, at most what that sample trains).
    ``rerank_store`` (``ivfpq``): "float32" descriptors, "sq12" / "sq8" residual codes, or
    "none". ``pca`` (``ivfpq``, 0 = off): lists and codes of the descriptors projected on their
    ``pca`` principal directions (:mod:`ssageo.evaluate.ann`).
    """
    out = Path(out)
    if kind not in KINDS:
        raise ConfigError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if shard_size < 1 or not len(table):
        raise DataError(f"{out}: nothing to index ({len(table)} tiles, shard size {shard_size})")
    sampled = embed_rows is not None and len(table) > shard_size
    params: dict = {"shard_size": shard_size}
    existing = read_manifest(out) if extend else None
    if existing is not None:  # an extension keeps the kind and parameters it was built with
        kind, params = existing["kind"], existing["params"]
    elif kind == "ivfpq":
        ann.faiss_module()  # refuse now, before any embedding, when faiss is not installed
        if lists is None:
            sample = min(train_size, len(table) if sampled else shard_size, len(table))
            lists = int(2 ** np.round(np.log2(max(4 * np.sqrt(len(table)), 1))))
            lists = max(1, min(lists, sample // ann.MIN_TRAIN_PER_LIST))
        ann.check_params(metadata["descriptor_dim"], lists, pq_bytes, pca)
        params.update(lists=lists, pq_bytes=pq_bytes, rerank_store=ann.store_kind(rerank_store))
        if pca:  # absent (off) in manifests written before the option
            params["pca"] = pca
        ann.check_store(params["rerank_store"], metadata["descriptor_dim"])
    manifest = _start(out, metadata, kind, params, extend)
    out.mkdir(parents=True, exist_ok=True)
    done = _resume_point(out, manifest, table)
    if done:
        log(f"resuming: {done} tiles already in verified shards")
    trained: tuple[Any, Any] | None = None  # (faiss index, scalar quantiser)
    if manifest["trained"] is not None:
        trained = load_trained(out, manifest)
    elif kind == "ivfpq" and sampled:
        rows = training_rows(len(table), train_size)
        log(f"training the IVF-PQ quantisers on {len(rows)} tiles sampled over all "
            f"{len(table)}")
        trained = _train(out, manifest, np.ascontiguousarray(embed_rows(rows), dtype=np.float32))
    for start in range(done, len(table), manifest["params"]["shard_size"]):
        stop = min(start + manifest["params"]["shard_size"], len(table))
        desc = np.ascontiguousarray(embed(start, stop), dtype=np.float32)
        if kind == "ivfpq" and trained is None:
            trained = _train(out, manifest, desc[:train_size])
        paths, coords = table.rows(start, stop)
        _write_shard(out, manifest, desc, np.asarray(coords, dtype=np.float64), paths, trained)
        log(f"shard {len(manifest['shards'])}: tiles {start + 1}..{stop} of {len(table)}")
    manifest.update(complete=True, build_first=manifest["count"])
    _write_manifest(out, manifest)
    return manifest


def manifest_store(manifest: dict) -> str:
    """The manifest's re-ranking store: "float32" (always for ``exact``), "sq12", "sq8" or
    "none"."""
    if manifest["kind"] == "exact":
        return "float32"
    return ann.store_kind(manifest["params"].get("rerank_store", False))


def _train(folder: Path, manifest: dict, sample: np.ndarray) -> tuple[Any, Any]:
    """Train the IVF-PQ quantisers (and the store's scalar quantiser) on ``sample``, write
    them, and return (the empty faiss index, the scalar quantiser or None)."""
    params = manifest["params"]
    trained = ann.train(sample, params["lists"], params["pq_bytes"], pca=params.get("pca", 0))
    index, store, codec = ann.load(trained), manifest_store(manifest), None
    if store in ann.SQ_BITS:
        codec = ann.ResidualSQ.train(index, sample, ann.SQ_BITS[store])
        atomic_write(folder / SQ, lambda tmp: _save_npz(tmp, codec.state()))
        manifest["sq"] = _record(folder / SQ)
    atomic_write_bytes(folder / TRAINED, trained.tobytes())
    manifest["trained"] = _record(folder / TRAINED)
    return index, codec


def _save_npz(path: Path, arrays: dict) -> None:
    with path.open("wb") as f:  # a file object: np.savez would add ".npz" to a bare name
        np.savez(f, **arrays)


def load_trained(folder: Path, manifest: dict) -> tuple[Any, ann.ResidualSQ | None]:
    """(the trained, empty faiss IVF-PQ index, the compressed store's codec or None),
    verified."""
    index = ann.load(np.fromfile(verify_file(folder, TRAINED, manifest["trained"],
                                         "trained IVF-PQ quantiser"), dtype=np.uint8))
    if manifest_store(manifest) not in ann.SQ_BITS:
        return index, None
    path = verify_file(folder, SQ, manifest["sq"], "re-ranking store quantiser")
    with np.load(path, allow_pickle=False) as state:
        return index, ann.ResidualSQ.from_state(index, state)


def _write_shard(folder: Path, manifest: dict, desc: np.ndarray, coords: np.ndarray,
                 tiles: list[str], trained: tuple[Any, Any] | None) -> None:
    """Write one shard's files, then record them in the manifest (written last)."""
    name = f"shard-{len(manifest['shards']):05d}"
    arrays = {"coords": coords, "tiles": np.asarray(tiles, dtype=str)}
    if trained is not None:
        arrays["codes"] = ann.encode(trained[0], desc)
    files = {f"{name}.npz": lambda f: np.savez(f, **arrays)}
    store = manifest_store(manifest)
    if store != "none":
        codec = None if trained is None else trained[1]
        kept = desc if codec is None else codec.encode(trained[0], desc, arrays["codes"])
        files[name + STORE_SUFFIX[store]] = lambda f: np.save(f, kept)
    for file, save in files.items():
        def write(tmp: Path, save: Callable[[Any], None] = save) -> None:
            with tmp.open("wb") as f:
                save(f)

        atomic_write(folder / file, write)
    manifest["shards"].append({
        "name": f"{name}.npz", "first": manifest["count"], "count": len(tiles),
        "files": {file: _record(folder / file) for file in files},
    })
    manifest["count"] += len(tiles)
    manifest["metadata"]["count"] = manifest["count"]
    _write_manifest(folder, manifest)


AUTO_EXACT_MAX = 250_000  # --kind auto: exact up to here (benchmarks/RESULTS.md, "Sharded index")


def build_tile_index(
    checkpoint: str | Path, table: TileTable, out: str | Path,
    source: str, kind: str = "exact", shard_size: int = DEFAULT_SHARD_SIZE,
    lists: int | None = None, pq_bytes: int = 32, rerank_store: str | bool = "float32",
    extend: bool = False, batch_size: int = 64, workers: int = 0, device: str = "cpu",
    log: Callable[[str], None] = lambda _: None, pca: int = 0,
) -> dict:
    """:func:`build_sharded` of image tiles embedded by ``checkpoint``'s model, shard by shard."""
    from ssageo.evaluate.embed import embed_paths
    from ssageo.evaluate.index import index_metadata, load_checkpoint

    model, config, weights_sha256 = load_checkpoint(checkpoint, device)
    size = config["data"]["reference_size"]

    def embed_list(paths: Sequence[str]) -> np.ndarray:
        return embed_paths(model, paths, size, "reference", batch_size, workers, progress=False)

    dim = int(embed_list(table.rows(0, 1)[0]).shape[1])  # the descriptor size, before any shard
    metadata = index_metadata(checkpoint, config, weights_sha256, dim, 0, source)
    return build_sharded(out, table, lambda a, b: embed_list(table.rows(a, b)[0]), metadata,
                         kind, shard_size, lists, pq_bytes, rerank_store, extend,
                         embed_rows=lambda rows: embed_list(table.paths_at(rows)), log=log,
                         pca=pca)
