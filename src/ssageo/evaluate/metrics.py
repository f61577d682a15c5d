"""Exact retrieval metrics of the published protocol (docs/METHOD.md section 6), computed blockwise.

For query ``i`` with positive reference ``g(i)``, ``rank_i = #{j : sim(i, j) > sim(i, g(i))}``
(strict ``>``, so ties favour the query) and ``R@k = mean(rank_i < k)``. The similarity is the
inner product of the descriptors as given (they are expected to be L2-normalised, which makes it
the cosine similarity). Queries are processed in blocks, so memory beyond the descriptors is one
``block_size x R`` similarity buffer, whatever the gallery size: CVACT_test's 92.8k x 92.8k never
exists as a matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ssageo.constants import EARTH_RADIUS_M
from ssageo.data.neighbours import haversine

ArrayLike = np.ndarray | torch.Tensor


def haversine_m(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """Great-circle distance in metres between (N, 2) arrays of (lat, lon) in degrees."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return EARTH_RADIUS_M * haversine(a[..., 0], a[..., 1], b[..., 0], b[..., 1])


def one_percent_k(gallery: int) -> int:
    """The k of R@1%: floor(gallery / 100), at least 1.

    Galleries under 100 references would give k = 0 (a recall that is always 0); we use k = 1
    there, so R@1% equals R@1 for such tiny galleries.
    """
    return max(1, gallery // 100)


def _descriptors(x: ArrayLike, name: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.ndim != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name}: expected a non-empty (N, D) array, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name}: expected floating-point descriptors, got {t.dtype}")
    if t.dtype not in (torch.float32, torch.float64):
        t = t.float()  # half precision matmul is slow and inexact on CPU
    # Any NaN/inf makes the sum non-finite; the sum is one cheap pass, the elementwise test
    # (which also allocates an (N, D) mask) only runs to confirm.
    if not torch.isfinite(t.sum()) and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: descriptors contain NaN or infinite values")
    return t


def _indices(x: ArrayLike, name: str, shape: tuple, low: int, high: int) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x))
    if t.is_floating_point() or t.dtype == torch.bool:
        raise ValueError(f"{name}: expected integer indices, got {t.dtype}")
    if t.ndim != len(shape) or any(s not in (None, n) for s, n in zip(shape, t.shape, strict=True)):
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
    if t.numel() and (int(t.min()) < low or int(t.max()) >= high):
        raise ValueError(
            f"{name}: indices must lie in [{low}, {high}), got {int(t.min())}..{int(t.max())}"
        )
    return t.long()


def _coords(x: ArrayLike, name: str, n: int) -> np.ndarray:
    c = np.asarray(x, dtype=np.float64)
    if c.shape != (n, 2):
        raise ValueError(f"{name}: expected shape ({n}, 2) (lat, lon), got {c.shape}")
    if not np.isfinite(c).all():
        raise ValueError(f"{name}: coordinates contain NaN or infinite values")
    return c


def rank_queries(
    query: ArrayLike,
    reference: ArrayLike,
    positive: ArrayLike,
    semi_positive: ArrayLike | None = None,
    block_size: int = 4096,
    with_top1: bool = True,
    device: str | torch.device | None = None,
) -> dict[str, np.ndarray]:
    """Per-query ranking results, computed exactly and blockwise.

    Takes query (Q, D) and reference (R, D) descriptors, ``positive`` (Q,) index of each query's
    positive in ``reference`` and optionally ``semi_positive`` (Q, S) indices (-1 where absent).
    Returns ``{"rank": (Q,) int64, "top1": (Q,) int64, "hit": (Q,) bool}``: the number of
    references scoring strictly above the positive, the best-scoring reference (first on ties;
    only with ``with_top1``), and - only with ``semi_positive`` - whether no reference other
    than the positive and its semi-positives scores above the positive (VIGOR's hit).
    ``device`` (default: where ``query`` is) runs the products there, e.g. on a GPU.
    """
    q = _descriptors(query, "query")
    r = _descriptors(reference, "reference")
    if q.shape[1] != r.shape[1]:
        raise ValueError(
            f"descriptor dimension mismatch: query has {q.shape[1]}, reference {r.shape[1]}"
        )
    dtype = torch.promote_types(q.dtype, r.dtype)
    device = q.device if device is None else torch.device(device)
    q, r = q.to(device, dtype), r.to(device, dtype)
    n_q, n_r = q.shape[0], r.shape[0]
    pos = _indices(positive, "positive", (n_q,), 0, n_r).to(device)
    semi = None
    if semi_positive is not None:
        semi = _indices(semi_positive, "semi_positive", (n_q, None), -1, n_r).to(device)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")

    # Counting in the similarity dtype is exact while counts fit its mantissa and ~30x faster
    # than summing a bool tensor; beyond that, count_nonzero is exact for any size.
    exact_float_count = n_r < 2 / torch.finfo(dtype).eps
    rank = torch.empty(n_q, dtype=torch.long, device=device)
    top1 = torch.empty(n_q, dtype=torch.long, device=device) if with_top1 else None
    hit = torch.empty(n_q, dtype=torch.bool, device=device) if semi is not None else None
    block = min(block_size, n_q)
    buffer = torch.empty(block, n_r, dtype=dtype, device=device)  # the only one growing with R
    ref_t = r.T
    with torch.inference_mode():
        for start in range(0, n_q, block):
            stop = min(start + block, n_q)
            sim = buffer[: stop - start]
            torch.mm(q[start:stop], ref_t, out=sim)  # (b, R)
            pos_b = pos[start:stop, None]
            pos_sim = sim.gather(1, pos_b)  # (b, 1): taken from the same matrix, so ties are exact
            if top1 is not None:
                top1[start:stop] = sim.argmax(1)
            semi_above = None
            if semi is not None:
                semi_b = semi[start:stop]
                semi_sim = sim.gather(1, semi_b.clamp(min=0))
                semi_above = (semi_sim > pos_sim) & _counted(semi_b, pos_b)
            torch.gt(sim, pos_sim, out=sim)  # in place: 1.0 where strictly above the positive
            counts = sim.sum(1) if exact_float_count else torch.count_nonzero(sim, dim=1)
            rank[start:stop] = counts.long()
            if hit is not None:
                hit[start:stop] = rank[start:stop] == semi_above.sum(1)
    out = {"rank": rank.cpu().numpy()}
    if top1 is not None:
        out["top1"] = top1.cpu().numpy()
    if hit is not None:
        out["hit"] = hit.cpu().numpy()
    return out


def _counted(semi: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """(b, S) mask of semi-positive entries to discount: present, not the positive, not repeated."""
    keep = (semi >= 0) & (semi != pos)
    for j in range(1, semi.shape[1]):
        keep[:, j] &= (semi[:, j : j + 1] != semi[:, :j]).all(1)
    return keep


def retrieval_metrics(
    query: ArrayLike,
    reference: ArrayLike,
    positive: ArrayLike,
    semi_positive: ArrayLike | None = None,
    query_coords: ArrayLike | None = None,
    reference_coords: ArrayLike | None = None,
    block_size: int = 4096,
    ks: Sequence[int] = (1, 5, 10),
    planar_coords: bool = False,
    device: str | torch.device | None = None,
) -> dict[str, float | int]:
    """The published metrics for one query set against one gallery.

    Takes the arguments of :func:`rank_queries` plus optional (Q, 2) / (R, 2) (lat, lon)
    coordinates in degrees. Returns a dict with ``R@k`` for every k in ``ks`` and ``R@1%``
    (k = :func:`one_percent_k`), all in percent; ``hit_rate`` (percent) when ``semi_positive``
    is given; ``median_error_m`` / ``mean_error_m`` (haversine distance from each query to its
    top-1 reference) when both coordinate arrays are given; and ``queries``, ``gallery``,
    ``k_1%`` (the k used for R@1%). With ``planar_coords`` the coordinates are planar metres
    (e.g. CVACT's UTM easting/northing) and the error is their Euclidean distance. ``device``
    as in :func:`rank_queries`.
    """
    if (query_coords is None) != (reference_coords is None):
        raise ValueError("give both query_coords and reference_coords, or neither")
    ranked = rank_queries(
        query, reference, positive, semi_positive, block_size, query_coords is not None, device
    )
    rank = ranked["rank"]
    n_q, n_r = len(rank), int(torch.as_tensor(reference).shape[0])
    k1 = one_percent_k(n_r)
    out: dict[str, float | int] = {f"R@{k}": 100.0 * float(np.mean(rank < k)) for k in ks}
    out["R@1%"] = 100.0 * float(np.mean(rank < k1))
    if "hit" in ranked:
        out["hit_rate"] = 100.0 * float(np.mean(ranked["hit"]))
    if query_coords is not None:
        qc = _coords(query_coords, "query_coords", n_q)
        rc = _coords(reference_coords, "reference_coords", n_r)[ranked["top1"]]
        error = np.hypot(*(qc - rc).T) if planar_coords else haversine_m(qc, rc)
        out["median_error_m"] = float(np.median(error))
        out["mean_error_m"] = float(np.mean(error))
    out.update({"queries": n_q, "gallery": n_r, "k_1%": k1})
    return out
