"""Retrieval metrics when a query has several relevant references: the ``groups`` protocol.

Query ``i`` is relevant to every reference ``j`` with ``groups[j] == groups[positive[i]]``
(University-1652: every gallery image of the query's building). The gallery is sorted by
similarity, highest first; among equal scores relevant references come first (ties favour the
query, as the strict rank of :mod:`ssageo.evaluate.metrics`). With ``p_1 < ... < p_n`` the
0-based positions of the ``n`` relevant references in that order:

- ``R@k``: the first relevant one lies in the top k (``p_1 < k``), in percent;
- ``AP`` (University-1652's evaluation code, the re-identification protocol it comes from):
  ``AP_i = (1/n) * sum_m (P_{m-1} + P_m) / 2`` with ``P_m = m / (p_m + 1)`` (the precision at
  the m-th hit) and ``P_{m-1} = (m-1) / p_m`` (the precision just before it; 1 when
  ``p_m = 0``): the precision-recall curve integrated with trapezoids. ``AP`` is the mean over
  queries, in percent. With one relevant reference at position ``p > 0`` this gives
  ``1 / (2 (p + 1))``, half of the textbook ``1 / (p + 1)``. docs/UNIVERSITY.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ssageo.evaluate.metrics import ArrayLike, _descriptors, _indices, one_percent_k

SORT_ELEMENTS = 1 << 22  # similarities sorted at once (each costs ~30 bytes of buffers)


def group_hits(
    query: ArrayLike,
    reference: ArrayLike,
    positive: ArrayLike,
    groups: ArrayLike,
    block_size: int = 4096,
    device: str | torch.device | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(first (Q,) position of the first relevant reference, ap (Q,) in [0, 1]) per query."""
    device = torch.device(device or "cpu")
    q = _descriptors(query, "query")
    r = _descriptors(reference, "reference")
    if q.shape[1] != r.shape[1]:
        raise ValueError(f"query and reference descriptors differ in size: {q.shape[1]} vs "
                         f"{r.shape[1]}")
    n_q, n_r = q.shape[0], r.shape[0]
    pos = _indices(positive, "positive", (n_q,), 0, n_r)
    grp = _indices(groups, "reference_groups", (n_r,), 0, np.iinfo(np.int64).max).to(device)
    wanted = grp[pos.to(device)]  # (Q,) each query's group
    r = r.to(device, q.dtype)
    step = max(1, min(block_size, SORT_ELEMENTS // n_r))
    where = torch.arange(n_r, device=device, dtype=torch.float64)
    first = np.empty(n_q, dtype=np.int64)
    ap = np.empty(n_q, dtype=np.float64)
    for start in range(0, n_q, step):
        stop = min(start + step, n_q)
        sim = q[start:stop].to(device) @ r.T
        rel = grp[None] == wanted[start:stop, None]  # (b, R)
        # relevant first, then a stable sort by score: ties keep relevant references ahead
        ahead = torch.argsort((~rel).to(torch.int8), dim=1, stable=True)
        order = torch.argsort(sim.gather(1, ahead), dim=1, descending=True, stable=True)
        hits = rel.gather(1, ahead).gather(1, order)
        count = hits.cumsum(1, dtype=torch.float64)  # m at each hit
        precision = count / (where + 1)
        before = torch.where(where == 0, torch.ones_like(count), (count - 1) / where.clamp(min=1))
        total = ((precision + before) / 2 * hits).sum(1)
        ap[start:stop] = (total / count[:, -1]).cpu().numpy()
        first[start:stop] = hits.to(torch.int8).argmax(1).cpu().numpy()
    return first, ap


def group_metrics(
    query: ArrayLike,
    reference: ArrayLike,
    positive: ArrayLike,
    groups: ArrayLike,
    block_size: int = 4096,
    ks: Sequence[int] = (1, 5, 10),
    device: str | torch.device | None = None,
) -> dict[str, float | int]:
    """``R@k`` for each k in ``ks``, ``R@1%``, ``AP`` (percent), ``queries``, ``gallery``,
    ``k_1%`` under the groups protocol (module docstring)."""
    first, ap = group_hits(query, reference, positive, groups, block_size, device)
    n_r = len(np.asarray(groups))
    k1 = one_percent_k(n_r)
    out: dict[str, float | int] = {f"R@{k}": 100.0 * float(np.mean(first < k)) for k in ks}
    out["R@1%"] = 100.0 * float(np.mean(first < k1))
    out["AP"] = 100.0 * float(np.mean(ap))
    out.update({"queries": len(first), "gallery": n_r, "k_1%": k1})
    return out
