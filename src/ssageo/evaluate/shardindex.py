"""Searching a sharded index folder (:mod:`ssageo.evaluate.shards` writes it): exact blockwise
search of the float32 shards, or IVF-PQ candidates re-scored from the shards' re-ranking store
(float32 descriptors, exact; or 8-bit scalar-quantised codes, a quarter of the bytes)."""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ssageo.evaluate import ann
from ssageo.evaluate.ann import exact_topk
from ssageo.evaluate.shards import (
    MANIFEST,
    STORE_SUFFIX,
    load_trained,
    manifest_store,
    read_manifest,
    verify_file,
)
from ssageo.io import DataError


class ShardedIndex:
    """A loaded sharded index: ``tiles`` and ``coords`` (read per shard on demand: at 100 M
    tiles they would fill ~14 GB), ``metadata`` and :meth:`search`.

    Loading checks every file's presence and size; a file's SHA-256 is checked when it is
    first read (an ``ivfpq`` index reads every shard's codes at once and holds them in memory,
    ``pq_bytes`` + 8 bytes per tile; re-ranking stores are memory-mapped when a search needs
    them, or, ``in_memory``, read whole at load: re-scoring then never waits for the disk, where
    the OS's page cache would not keep a memory-mapped store).
    """

    def __init__(self, folder: Path, manifest: dict, in_memory: bool = False) -> None:
        self.path, self.manifest = folder, manifest
        self.metadata, self.kind = manifest["metadata"], manifest["kind"]
        self.shards = manifest["shards"]
        self.firsts = np.asarray([s["first"] for s in self.shards], dtype=np.int64)
        self._checked: set[str] = set()
        self._stores: dict[int, np.ndarray] = {}
        self.in_memory = in_memory
        self.store = manifest_store(manifest)  # "float32", "sq12", "sq8" or "none"
        self.sq: ann.ResidualSQ | None = None  # the compressed store's codec
        self._column = functools.lru_cache(maxsize=8)(self._read_column)  # per shard and key
        for shard in self.shards:
            for name, record in shard["files"].items():
                path = folder / name
                if not path.is_file() or path.stat().st_size != record["bytes"]:
                    verify_file(folder, name, record, "index shard")  # names it: missing / corrupt
        self.ann = None
        if manifest["trained"] is not None:
            self.ann, self.sq = load_trained(folder, manifest)
            for shard in self.shards:
                with np.load(self._file(shard, shard["name"]), allow_pickle=False) as npz:
                    ann.add_codes(self.ann, npz["codes"], shard["first"])
        self.tiles = _Column(self, "tiles")
        self.coords = _Column(self, "coords")

    def _file(self, shard: dict, name: str) -> Path:
        """A shard's file, its SHA-256 verified the first time it is read."""
        if name not in self._checked:
            verify_file(self.path, name, shard["files"][name], "index shard")
            self._checked.add(name)
        return self.path / name

    def _read_column(self, s: int, key: str) -> np.ndarray:
        with np.load(self._file(self.shards[s], self.shards[s]["name"]),
                     allow_pickle=False) as npz:
            return npz[key]

    def _store(self, s: int) -> np.ndarray:
        """Shard ``s``'s memory-mapped re-ranking store: float32 descriptors or sq12 / sq8
        code rows (only asked for when the index keeps one)."""
        if s not in self._stores:
            name = self.shards[s]["name"].replace(".npz", STORE_SUFFIX[self.store])
            self._stores[s] = np.load(self._file(self.shards[s], name),
                                      mmap_mode=None if self.in_memory else "r")
        return self._stores[s]

    def stores(self) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, memory-mapped float32 descriptors) of every shard, verified when read
        (an exact index's, or an ivfpq index's float32 re-ranking store)."""
        if self.store != "float32":
            raise DataError(f"{self.path}: holds no float32 descriptors (re-ranking store: "
                            f"{self.store}); exact search needs them")
        return ((int(self.firsts[s]), self._store(s)) for s in range(len(self.shards)))

    @classmethod
    def load(cls, folder: str | Path, in_memory: bool = False) -> ShardedIndex:
        """Open an index folder (DataError naming the first missing or corrupt file)."""
        folder = Path(folder)
        manifest = read_manifest(folder)
        if manifest is None:
            raise DataError(f"{folder}: not an ssageo index ({MANIFEST} not found)")
        if not manifest["complete"]:
            raise DataError(f"{folder}: index build was interrupted after {manifest['count']} "
                            "tiles; rerun the same `ssageo index build` to finish it")
        index = cls(folder, manifest, in_memory)
        if in_memory and index.store != "none":
            for s in range(len(index.shards)):
                index._store(s)  # read now: every search then re-scores from RAM
        return index

    def _rows(self, ids: np.ndarray) -> np.ndarray:
        """The store's rows ``ids`` (1-D): float32 descriptors or code rows, gathered from
        the shards in ascending order (sequential within each memory-mapped file)."""
        which = np.searchsorted(self.firsts, ids, side="right") - 1
        first = self._store(0)
        out = np.empty((len(ids), first.shape[1]), dtype=first.dtype)
        for s in np.unique(which):
            mask = which == s
            out[mask] = self._store(int(s))[ids[mask] - self.firsts[s]]
        return out

    def _rescore(self, ids: np.ndarray, query: np.ndarray) -> np.ndarray:
        """Cosines of ``query`` with the rows ``ids``: exact from float32, approximate from
        code rows (within half a step of each residual component's code)."""
        rows = self._rows(ids)
        if self.sq is not None:
            return self.sq.scores(rows, query)
        return rows @ np.asarray(query, dtype=np.float32)

    def search(self, queries: np.ndarray, k: int, nprobe: int = 32,
               rerank: int = 100) -> tuple[np.ndarray, np.ndarray]:
        """(cosine scores, rows) of the ``k`` best tiles per query, best first (rows -1 when
        fewer were found). ``ivfpq``: the best ``max(k, rerank)`` candidates of ``nprobe``
        lists, re-scored from the re-ranking store when there is one."""
        if self.ann is None:
            return exact_topk(queries, self.stores(), k)
        use_store = self.store != "none" and rerank > 0
        scores, ids = ann.search(self.ann, queries, max(k, rerank) if use_store else k, nprobe)
        if not use_store:
            return scores, ids
        for q in range(len(queries)):
            found = ids[q][ids[q] >= 0]
            exact = self._rescore(found, queries[q])
            order = np.argsort(-exact, kind="stable")
            scores[q], ids[q] = -np.inf, -1
            scores[q, : len(order)], ids[q, : len(order)] = exact[order], found[order]
        return scores[:, :k], ids[:, :k]


class _Column:
    """One per-tile array of a sharded index (``tiles`` or ``coords``), read shard by shard
    when rows are asked for: ``column[i]``, ``column[rows]``, ``len(column)``, ``tolist()``."""

    def __init__(self, index: ShardedIndex, key: str) -> None:
        self.index, self.key = index, key

    def __len__(self) -> int:
        return int(self.index.manifest["count"])

    def __getitem__(self, rows: int | slice | Sequence[int] | np.ndarray) -> Any:
        if isinstance(rows, int | np.integer):
            if not -len(self) <= rows < len(self):
                raise IndexError(f"row {rows} of an index of {len(self)} tiles")
            rows = int(rows) % len(self)
            s = int(np.searchsorted(self.index.firsts, rows, side="right") - 1)
            return self.index._column(s, self.key)[rows - self.index.firsts[s]]
        rows = np.arange(len(self))[rows] if isinstance(rows, slice) else np.asarray(rows)
        return np.asarray([self[int(r)] for r in rows]) if len(rows) else np.asarray([])

    def tolist(self) -> list:
        parts = [self.index._column(s, self.key) for s in range(len(self.index.shards))]
        return np.concatenate(parts).tolist()
