"""Nearest-neighbour search: exact blockwise top-k, and faiss IVF-PQ (the ``ivfpq`` kind).

A coarse quantiser of ``lists`` centroids splits the descriptor space into inverted lists; each
descriptor is stored as its list number plus a product-quantised code of its residual
(``pq_bytes`` bytes). The L2 metric is used: on unit vectors it ranks exactly as the cosine
(``cos = 1 - d^2 / 2``), and residual PQ is most accurate under it. With ``pca`` > 0 the lists
and codes are those of the descriptors projected on their ``pca`` principal directions and
randomly rotated (faiss's ``PCAR``: each PQ byte then codes a few dimensions of similar
variance); re-ranking stores keep the full descriptors.

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


def check_params(dim: int, lists: int, pq_bytes: int, pca: int = 0) -> None:
    """ConfigError when ``pq_bytes`` does not divide the dimension it codes (``pca`` when > 0,
    else the descriptors'), or ``lists`` or ``pca`` is out of range."""
    if not 0 <= pca <= dim:
        raise ConfigError(f"--pca {pca} must be between 0 (off) and the descriptor dimension {dim}")
    coded = pca or dim
    if lists < 1 or pq_bytes < 1 or coded % pq_bytes:
        raise ConfigError(
            f"--pq-bytes {pq_bytes} must divide the {'--pca' if pca else 'descriptor'} "
            f"dimension {coded} and --lists {lists} must be >= 1"
        )


def train(sample: np.ndarray, lists: int, pq_bytes: int, seed: int = 0,
          pca: int = 0) -> np.ndarray:
    """Train the coarse quantiser and the PQ (after the ``pca`` projection, when > 0) on
    ``sample`` (n, D) float32; returns the empty, trained index serialised as a uint8 array
    (what shards are encoded against)."""
    faiss = faiss_module()
    n, dim = sample.shape
    check_params(dim, lists, pq_bytes, pca)
    need = max(lists * MIN_TRAIN_PER_LIST, PQ_CENTROIDS)
    if n < need:
        raise DataError(
            f"IVF-PQ training needs >= {need} tiles for {lists} lists, the first shard has {n}; "
            "give fewer --lists or a larger --shard-size"
        )
    coded = pca or dim
    ivf = faiss.IndexIVFPQ(faiss.IndexFlatL2(coded), coded, lists, pq_bytes, 8)
    ivf.cp.seed = seed
    ivf.pq.cp.seed = seed
    index = ivf
    if pca:
        # eigen_power 0 (no whitening); the rotation after the projection is seeded by faiss
        index = faiss.IndexPreTransform(faiss.PCAMatrix(dim, pca, 0, True), ivf)
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    return faiss.serialize_index(index)


def ivf(index: Any) -> Any:
    """The IVF-PQ index inside ``index`` (itself, or behind its PCA transform)."""
    faiss = faiss_module()
    return faiss.downcast_index(faiss.extract_index_ivf(index))


def _transform(index: Any) -> Any:
    """The PCA transform in front of ``index``'s lists, or None."""
    faiss = faiss_module()
    if isinstance(index, faiss.IndexPreTransform):
        return faiss.downcast_VectorTransform(index.chain.at(0))
    return None


def project(index: Any, x: np.ndarray) -> np.ndarray:
    """``x`` (n, D) in the space the lists and codes live in (the PCA transform, if any)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    transform = _transform(index)
    return x if transform is None else transform.apply(x)


def centroids(index: Any) -> np.ndarray:
    """(lists, D) coarse centroids in the descriptors' own space (mapped back through the PCA
    transform, if any: the projection's orthonormal rows, transposed)."""
    inner, transform = ivf(index), _transform(index)
    c = inner.quantizer.reconstruct_n(0, inner.nlist)
    return c if transform is None else transform.reverse_transform(c)


def load(trained: np.ndarray) -> Any:
    """The faiss index from a serialised trained index (:func:`train`)."""
    return faiss_module().deserialize_index(trained)


def encode(index: Any, x: np.ndarray) -> np.ndarray:
    """(n, code_size) uint8 codes (list number + PQ code) of ``x`` under the trained index."""
    return index.sa_encode(np.ascontiguousarray(x, dtype=np.float32))


def list_numbers(index: Any, codes: np.ndarray) -> np.ndarray:
    """(n,) inverted-list numbers of IVF codes (:func:`encode`): their first bytes,
    little-endian."""
    lists = np.zeros(len(codes), dtype=np.int64)
    for byte in range(ivf(index).coarse_code_size()):
        lists |= codes[:, byte].astype(np.int64) << (8 * byte)
    return lists


def add_codes(index: Any, codes: np.ndarray, first_id: int) -> None:
    """Add a shard's codes to ``index`` with ids ``first_id, first_id + 1, ...``."""
    ids = np.arange(first_id, first_id + len(codes), dtype=np.int64)
    ivf(index).add_sa_codes(np.ascontiguousarray(codes), ids)


def search(index: Any, queries: np.ndarray, k: int, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
    """(approximate cosine scores, ids) of the ``k`` best entries per query, best first; ids
    are -1 where fewer than ``k`` entries were found in the ``nprobe`` lists visited."""
    inner = ivf(index)
    inner.nprobe = min(nprobe, inner.nlist)
    dist, ids = inner.search(project(index, queries), k)
    return 1.0 - dist / 2.0, ids


STORES = ("float32", "sq12", "sq8", "none")  # the re-ranking stores of an ``ivfpq`` index
SQ_BITS = {"sq8": 8, "sq12": 12}


def check_store(store: str, dim: int) -> None:
    """ConfigError when ``store`` cannot hold ``dim``-d descriptors (sq12 packs pairs)."""
    if store == "sq12" and dim % 2:
        raise ConfigError(f"--rerank-store sq12 packs dimensions in pairs; the descriptors have "
                          f"{dim} (odd): use sq8 or float32")


def store_kind(value: object) -> str:
    """A manifest's or caller's re-ranking store as one of :data:`STORES` (manifests of the
    first sharded format say ``true`` / ``false`` for float32 / none)."""
    kind = {True: "float32", False: "none"}.get(value, value)  # type: ignore[call-overload]
    if kind not in STORES:
        raise ConfigError(f"--rerank-store must be one of {', '.join(STORES)}, got {value!r}")
    return str(kind)


SQ_MARGIN = 0.1  # of each dimension's residual range in the sample, added on both sides


class ResidualSQ:
    """The compressed re-ranking store's codec: each descriptor as its inverted list (its
    nearest coarse centroid of the IVF-PQ index) and its residual to that centroid, each
    dimension quantised uniformly to ``bits`` (8 or 12) over the range the training sample's
    residuals span, widened by :data:`SQ_MARGIN` for tiles beyond it. Residuals span a fraction
    of the descriptors' range, so these steps are finer than a global scalar quantiser's.

    A row of codes is the list number (4 bytes, little-endian) then the packed residual codes
    (1 byte per dimension for 8 bits, 3 bytes per 2 dimensions for 12). Scores need no
    decoding: ``q . x = (centroids @ q)[list] + q . low + (code + 0.5) . (q * step)``."""

    def __init__(self, centroids: np.ndarray, low: np.ndarray, step: np.ndarray,
                 bits: int) -> None:
        self.centroids, self.low, self.step, self.bits = centroids, low, step, bits

    @classmethod
    def train(cls, index: Any, sample: np.ndarray, bits: int) -> ResidualSQ:
        """Fit the per-dimension ranges to ``sample``'s residuals under ``index``'s lists."""
        means = centroids(index)
        residual = sample - means[cls._assign(index, sample)]
        low, high = residual.min(0), residual.max(0)
        margin = (high - low) * SQ_MARGIN
        step = np.maximum(high - low + 2 * margin, 1e-12) / (2**bits)
        return cls(means, (low - margin).astype(np.float32), step.astype(np.float32), bits)

    @staticmethod
    def _assign(index: Any, x: np.ndarray) -> np.ndarray:
        return ivf(index).quantizer.assign(project(index, x), 1)[:, 0]

    def state(self) -> dict[str, np.ndarray]:
        """Arrays to save (``np.savez``); :meth:`from_state` reads them back."""
        return {"low": self.low, "step": self.step, "bits": np.asarray(self.bits)}

    @classmethod
    def from_state(cls, index: Any, state: Any) -> ResidualSQ:
        return cls(centroids(index), state["low"], state["step"], int(state["bits"]))

    def encode(self, index: Any, x: np.ndarray, codes: np.ndarray | None = None) -> np.ndarray:
        """(n, 4 + packed codes) uint8 rows of ``x`` (n, D); ``codes``, its IVF-PQ codes
        (:func:`encode`), give the lists without a second search of the centroids."""
        lists = self._assign(index, x) if codes is None else list_numbers(index, codes)
        levels = np.floor((x - self.centroids[lists] - self.low) / self.step)
        levels = np.clip(levels, 0, 2**self.bits - 1).astype(np.uint16)
        if self.bits == 12:  # two 12-bit codes in three bytes
            even, odd = levels[:, 0::2], levels[:, 1::2]
            packed = np.stack([even >> 4, ((even & 15) << 4) | (odd >> 8), odd & 255], axis=2)
            levels = packed.reshape(len(x), -1)
        head = lists.astype("<u4").view(np.uint8).reshape(len(x), 4)
        return np.concatenate([head, levels.astype(np.uint8)], axis=1)

    def levels(self, codes: np.ndarray) -> np.ndarray:
        """(n, D) float32 residual levels of code rows."""
        body = codes[:, 4:]
        if self.bits == 8:
            return body.astype(np.float32)
        a, b, c = (body[:, i::3].astype(np.uint16) for i in range(3))
        out = np.empty((len(codes), 2 * a.shape[1]), dtype=np.float32)
        out[:, 0::2], out[:, 1::2] = (a << 4) | (b >> 4), ((b & 15) << 8) | c
        return out

    @staticmethod
    def lists(codes: np.ndarray) -> np.ndarray:
        """(n,) inverted-list numbers of code rows."""
        return np.ascontiguousarray(codes[:, :4]).view("<u4")[:, 0]

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """(n, D) float32 descriptors the code rows stand for."""
        lists = self.lists(codes)
        return self.centroids[lists] + self.low + (self.levels(codes) + 0.5) * self.step

    def scores(self, codes: np.ndarray, query: np.ndarray) -> np.ndarray:
        """(n,) dot products of ``query`` (D,) with the descriptors the rows stand for."""
        q = np.asarray(query, dtype=np.float32)
        unique, where = np.unique(self.lists(codes), return_inverse=True)
        near = self.centroids[unique] @ q  # only the candidates' lists
        weights = q * self.step
        const = np.float32(q @ self.low + 0.5 * weights.sum())
        return self.levels(codes) @ weights + near[where] + const


def memory_bytes(index: Any) -> int:
    """Bytes the searchable index holds in memory: codes, ids, centroids, PQ codebooks and the
    PCA transform's matrix."""
    inner = ivf(index)
    codes = inner.ntotal * (inner.code_size + 8)  # 8-byte ids in the inverted lists
    projection = 0 if _transform(index) is None else index.d * inner.d * 4
    return (codes + inner.nlist * inner.d * 4 + inner.pq.M * PQ_CENTROIDS * inner.pq.dsub * 4
            + projection)
