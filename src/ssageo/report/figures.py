"""The report's figures, drawn with matplotlib's object API on the Agg canvas (no pyplot, so no
global backend state and no display), each returned as PNG bytes.

Images are HxWx3 uint8 RGB arrays; activation maps and BEV probabilities are HxW floats.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ssageo.report.runlog import loss_terms
from ssageo.train.rundir import RunLog

if TYPE_CHECKING:  # matplotlib is imported when a figure is drawn
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

CORRECT = (0.13, 0.70, 0.25)  # green: the true reference tile
WRONG = (0.85, 0.20, 0.20)


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig: Figure) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _show(ax: Axes, image: np.ndarray, title: str | None = None,
          border: str | tuple[float, float, float] | None = None, **imshow: Any) -> None:
    ax.imshow(image, **{"interpolation": "bilinear", **imshow})
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(border is not None)
        if border is not None:
            spine.set_edgecolor(border)
            spine.set_linewidth(4)
    if title:
        ax.set_title(title, fontsize=8, color=border if border is not None else "black")


def _running_mean(values: Sequence[float]) -> np.ndarray:
    """Trailing mean over ~5 % of the run (at least 1 value), same length as ``values``."""
    window = max(1, len(values) // 20)
    sums = np.cumsum(np.concatenate([[0.0], values]))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(0, ends - window)
    return (sums[ends] - sums[starts]) / (ends - starts)


def training_curves(runs: Mapping[str, RunLog]) -> bytes:
    """Panels over the global step, two per row: each loss term of the objective (InfoNCE,
    BEV, ...), the learning rate, validation R@1 (%); where a run logged them
    (``train.grad_terms_every``), each term's gradient norm on the shared trunk and the cosine
    of each term's gradient with the first's.

    ``runs`` maps a label to a run's log; several runs are overlaid for comparison.
    """
    terms = loss_terms()
    panels = [(term.name, "steps", term.title) for term in terms]
    panels += [("lr", "steps", "learning rate"), ("R@1", "evals", "validation R@1 (%)")]
    if any(log.series(f"grad_{terms[0].name}")[0] for log in runs.values()):
        # train.grad_terms_every: each term's gradient on the shared trunk, and their cosine
        panels += [("grad", "steps", "gradient norm of each term on the shared trunk")]
        panels += [(f"grad_cos_{term.name}", "steps",
                    f"cosine of the {term.label} and {terms[0].label} gradients")
                   for term in terms[1:]]
    rows = math.ceil(len(panels) / 2)
    fig = _figure(11, 3.25 * rows)
    axes = fig.subplots(rows, 2, squeeze=False).ravel()
    losses = {term.name for term in terms}
    for ax, (key, source, title) in zip(axes, panels, strict=False):
        drawn = False
        # a run keeps its colour in every panel
        lines = [(label, log.series(key, source), {"color": f"C{i}"})
                 for i, (label, log) in enumerate(runs.items())]
        if key == "grad":  # one line per run and term: the run's colour, the term's dashes
            lines = [(f"{label} {term.label}" if len(runs) > 1 else term.label,
                      log.series(f"grad_{term.name}"),
                      {"color": f"C{i}", "linestyle": ("-", "--", ":", "-.")[j % 4]})
                     for i, (label, log) in enumerate(runs.items())
                     for j, term in enumerate(terms)]
        for label, (xs, ys), style in lines:
            if not xs or (key in losses and not any(ys)):  # a term that is off is all 0
                continue
            if source == "evals":
                ax.plot(xs, ys, marker="o", label=label, **style)
            elif key == "lr":
                ax.plot(xs, ys, label=label, **style)
            else:  # per-step losses are noisy: faint raw values under a running mean
                ax.plot(xs, ys, alpha=0.3, linewidth=0.8, **style)
                ax.plot(xs, _running_mean(ys), label=label, **style)
            drawn = True
        ax.set_title(title, fontsize=10)
        if key == "grad" and drawn:
            ax.set_yscale("log")  # the terms' gradients can differ by orders of magnitude
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if not drawn:
            ax.text(0.5, 0.5, "not recorded in this run", ha="center", va="center",
                    transform=ax.transAxes, color="grey")
        elif len(lines) > 1:
            ax.legend(fontsize=8)
    for ax in axes[len(panels):]:  # an odd number of panels leaves one cell empty
        ax.set_axis_off()
    return _png(fig)


def error_histogram(errors_m: Mapping[str, np.ndarray]) -> bytes:
    """Histogram of the top-1 metre error per query (log-spaced bins), one series per run."""
    fig = _figure(8, 3.6)
    ax = fig.subplots()
    finite = [np.asarray(e, dtype=float) for e in errors_m.values()]
    top = max(float(e.max()) for e in finite if e.size) if any(e.size for e in finite) else 1.0
    bins = np.concatenate([[0.0], np.geomspace(1.0, max(top, 2.0) * 1.05, 30)])
    for label, errors in errors_m.items():
        errors = np.asarray(errors, dtype=float)
        ax.hist(np.clip(errors, 0, None), bins=bins.tolist(), alpha=0.6,
                label=f"{label}: median {np.median(errors):.1f} m")
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel("distance from the query to its top-1 tile's centre (m)")
    ax.set_ylabel("queries")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


def project_2d(points: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """(N, 2) coordinates of (N, D) descriptors and the method's name: UMAP where ``umap`` is
    installed (extra ``ssageo[viz]``), else PCA (an SVD: instant, where t-SNE takes seconds)."""
    points = np.asarray(points, dtype=np.float32)
    try:
        import umap
    except ImportError:
        centred = points - points.mean(axis=0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        return centred @ vt[:2].T, "PCA (install ssageo[viz] for UMAP)"
    reducer = umap.UMAP(n_components=2, n_neighbors=min(15, len(points) - 1), random_state=seed)
    return reducer.fit_transform(points), "UMAP"


def descriptor_map(query: np.ndarray, reference: np.ndarray, seed: int = 0) -> bytes:
    """2-D map of matching descriptors: row i of ``query`` (Q, D) pairs with row i of
    ``reference`` (Q, D); each pair is linked by a line, so short lines mean aligned views."""
    xy, method = project_2d(np.concatenate([query, reference]), seed)
    q, r = xy[: len(query)], xy[len(query):]
    fig = _figure(7.5, 6.5)
    ax = fig.subplots()
    for (x0, y0), (x1, y1) in zip(q, r, strict=True):
        ax.plot([x0, x1], [y0, y1], color="grey", linewidth=0.6, alpha=0.6)
    ax.scatter(q[:, 0], q[:, 1], s=14, label="query (ground panorama)", color="tab:blue")
    ax.scatter(r[:, 0], r[:, 1], s=14, marker="s", label="reference (satellite)",
               color="tab:orange")
    ax.set_title(f"{len(query)} matching pairs, {method}", fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=8)
    return _png(fig)


@dataclass
class RetrievalExample:
    """One query: its panorama, its top-k tiles (best first) and where the true tile ranked."""

    query: np.ndarray
    top: Sequence[np.ndarray]
    top_correct: Sequence[bool]
    rank: int  # 0-based rank of the true tile in the gallery
    truth: np.ndarray  # the true tile, drawn separately when it is not in the top k
    caption: str = ""


def retrieval_examples(examples: Sequence[RetrievalExample]) -> bytes:
    """One row per query: the panorama, its top-k tiles (the true one framed green, the others
    red) and, for a failure, the true tile at the end of the row with its rank."""
    k = max(len(e.top) for e in examples)
    fig = _figure(3.2 + 1.45 * (k + 1), 1.55 * len(examples))
    axes = fig.subplots(len(examples), k + 2, squeeze=False,
                        gridspec_kw={"width_ratios": [4] + [1] * (k + 1)})
    for row, ex in zip(axes, examples, strict=True):
        status = "hit" if ex.rank == 0 else f"miss: true tile at rank {ex.rank + 1}"
        _show(row[0], ex.query, f"{ex.caption} ({status})".strip())
        for j, ax in enumerate(row[1:-1]):
            if j < len(ex.top):
                ok = ex.top_correct[j]
                _show(ax, ex.top[j], f"#{j + 1}", CORRECT if ok else WRONG)
            else:
                ax.set_axis_off()
        if ex.rank >= len(ex.top):
            _show(row[-1], ex.truth, f"true (#{ex.rank + 1})", CORRECT)
        else:
            row[-1].set_axis_off()
    return _png(fig)


def bev_panels(panoramas: Sequence[np.ndarray], tiles: Sequence[np.ndarray],
               priors: Sequence[np.ndarray], predictions: Sequence[np.ndarray],
               captions: Sequence[str]) -> bytes:
    """One row per place: panorama, satellite tile, prior label, predicted P(object) from the
    panorama's BEV head (HxW in [0, 1], north up like the tile)."""
    fig = _figure(11, 1.9 * len(tiles))
    axes = fig.subplots(len(tiles), 4, squeeze=False,
                        gridspec_kw={"width_ratios": [4, 1.2, 1.2, 1.2]})
    for row, pano, tile, prior, pred, caption in zip(axes, panoramas, tiles, priors,
                                                     predictions, captions, strict=True):
        _show(row[0], pano, f"query {caption}")
        _show(row[1], tile, "satellite tile")
        _show(row[2], prior, "prior label", cmap="gray", vmin=0, vmax=1,
              interpolation="nearest")
        _show(row[3], pred, "BEV prediction P(object)", cmap="viridis", vmin=0, vmax=1,
              interpolation="nearest")
    return _png(fig)


def _overlay(ax: Axes, image: np.ndarray, heat: np.ndarray, title: str) -> None:
    _show(ax, image, title)
    height, width = image.shape[:2]
    ax.imshow(heat, cmap="jet", alpha=0.45, extent=(0, width, height, 0), vmin=0, vmax=1,
              interpolation="bilinear")


def activation_maps(panoramas: Sequence[np.ndarray], panorama_maps: Sequence[np.ndarray],
                    tiles: Sequence[np.ndarray], tile_maps: Sequence[np.ndarray],
                    captions: Sequence[str]) -> bytes:
    """One row per pair: query and reference with their Grad-CAM maps (HxW in [0, 1]) overlaid."""
    fig = _figure(10, 1.9 * len(tiles))
    axes = fig.subplots(len(tiles), 2, squeeze=False, gridspec_kw={"width_ratios": [4, 1.1]})
    for row, pano, pmap, tile, tmap, caption in zip(axes, panoramas, panorama_maps, tiles,
                                                    tile_maps, captions, strict=True):
        _overlay(row[0], pano, pmap, f"query {caption}")
        _overlay(row[1], tile, tmap, "reference")
    return _png(fig)
