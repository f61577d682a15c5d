"""Nearest-neighbour search: exact blockwise top-k, and faiss IVF-PQ (the ``ivfpq`` kind).

A coarse quantiser of ``lists`` centroids splits the descriptor space into inverted lists; each
descriptor is stored as its list number plus a product-quantised code of its residual
(``pq_bytes`` bytes). The L2 metric is used: on unit vectors it ranks exactly as the cosine
(``cos = 1 - d^2 / 2``), and residual PQ is most accurate under it.

faiss is an optional dependency (``pip install 'ssageo[index]'``); only this module imports it,
and only when an IVF-PQ index is built or opened.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any  # faiss has no type information

import numpy as np

from ssageo.config import ConfigError
from ssageo.io import DataError

MIN_TRAIN_PER_LIST = 39  # faiss's own k-means warns below 39 training points per centroid
PQ_CENTROIDS = 256  # 8-bit product quantiser codes


def exact_topk(
    queries: np.ndarray, blocks: Iterable[tuple[int, np.ndarray]], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """(cosine scores, row ids) of the ``k`` best rows per query over ``blocks`` of
    (first row id, (n, D) descriptors), best first; one block in memory at a time."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    best_s = np.full((len(q), 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(q), 0), dtype=np.int64)
    for first, block in blocks:  # numpy, not torch: memory-mapped shards are read-only arrays
        scores = q @ np.asarray(block, dtype=np.float32).T
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < len(block) else \
            np.broadcast_to(np.arange(len(block)), scores.shape)
        best_s = np.concatenate([best_s, np.take_along_axis(scores, top, 1)], axis=1)
        best_i = np.concatenate([best_i, top + first], axis=1)
        keep = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_i, keep, 1)
    return best_s, best_i


def faiss_module() -> Any:
    """The faiss module, or a one-line ConfigError saying how to install it."""
    try:
        import faiss
    except ImportError:
        raise ConfigError(
            "index kind 'ivfpq' needs faiss: pip install 'ssageo[index]' (or faiss-cpu)"
        ) from None
    return faiss


def check_params(dim: int, lists: int, pq_bytes: int) -> None:
    """ConfigError when ``pq_bytes`` does not divide the descriptor dimension or is too small."""
    if lists < 1 or pq_bytes < 1 or dim % pq_bytes:
        raise ConfigError(
            f"--pq-bytes {pq_bytes} must divide the descriptor dimension {dim} "
            f"and --lists {lists} must be >= 1"
        )


def train(sample: np.ndarray, lists: int, pq_bytes: int, seed: int = 0) -> np.ndarray:
    """Train the coarse quantiser and the PQ on ``sample`` (n, D) float32; returns the empty,
    trained index serialised as a uint8 array (what shards are encoded against)."""
    faiss = faiss_module()
    n, dim = sample.shape
    check_params(dim, lists, pq_bytes)
    need = max(lists * MIN_TRAIN_PER_LIST, PQ_CENTROIDS)
    if n < need:
        raise DataError(
            f"IVF-PQ training needs >= {need} tiles for {lists} lists, the first shard has {n}; "
            "give fewer --lists or a larger --shard-size"
        )
    index = faiss.IndexIVFPQ(faiss.IndexFlatL2(dim), dim, lists, pq_bytes, 8)
    index.cp.seed = seed
    index.pq.cp.seed = seed
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    return faiss.serialize_index(index)


def load(trained: np.ndarray) -> Any:
    """The faiss index from a serialised trained index (:func:`train`)."""
    return faiss_module().deserialize_index(trained)


def encode(index: Any, x: np.ndarray) -> np.ndarray:
    """(n, code_size) uint8 codes (list number + PQ code) of ``x`` under the trained index."""
    return index.sa_encode(np.ascontiguousarray(x, dtype=np.float32))


def add_codes(index: Any, codes: np.ndarray, first_id: int) -> None:
    """Add a shard's codes to ``index`` with ids ``first_id, first_id + 1, ...``."""
    ids = np.arange(first_id, first_id + len(codes), dtype=np.int64)
    index.add_sa_codes(np.ascontiguousarray(codes), ids)


def search(index: Any, queries: np.ndarray, k: int, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
    """(approximate cosine scores, ids) of the ``k`` best entries per query, best first; ids
    are -1 where fewer than ``k`` entries were found in the ``nprobe`` lists visited."""
    index.nprobe = min(nprobe, index.nlist)
    dist, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return 1.0 - dist / 2.0, ids


def memory_bytes(index: Any) -> int:
    """Bytes the searchable index holds in memory: codes, ids, centroids and PQ codebooks."""
    codes = index.ntotal * (index.code_size + 8)  # 8-byte ids in the inverted lists
    return codes + index.nlist * index.d * 4 + index.pq.M * PQ_CENTROIDS * index.pq.dsub * 4
