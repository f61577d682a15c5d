"""The visual report of a training run (``ssageo report``) and its log table (``ssageo log``).

``build_report(run_dir)`` writes one self-contained HTML page: training curves, the metrics
table (beside another run's with ``compare``), retrieval examples, BEV predictions against the
prior labels, Grad-CAM maps, a 2-D map of matching descriptors and the metre-error histogram.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ssageo.config import get
from ssageo.constants import REPORT_FILE
from ssageo.io import atomic_write_text, read_image
from ssageo.report import figures, html
from ssageo.report.analysis import (
    Retrieval,
    Run,
    bev_probabilities,
    grad_cam,
    held_out_manifest,
    load_run,
    recall_by_fov,
    retrieve,
    subset,
)
from ssageo.report.runlog import epoch_rows, final_metrics, log_table
from ssageo.train.rundir import RunLog, read_run_log, read_summary

__all__ = ["RunLog", "build_report", "epoch_rows", "final_metrics", "is_report", "log_table",
           "read_run_log", "read_summary"]

DISPLAY_WIDTH = 512  # pixels: panoramas and tiles are shown at most this wide


def _display(path: Path, mode: str = "RGB") -> np.ndarray:
    """An image for a figure, shrunk so its width is at most DISPLAY_WIDTH."""
    from ssageo.data.transforms import resize, resize_label

    image = read_image(path, mode)
    h, w = image.shape[:2]
    if w <= DISPLAY_WIDTH:
        return image
    size = (max(1, round(h * DISPLAY_WIDTH / w)), DISPLAY_WIDTH)
    return resize(image, size) if mode == "RGB" else resize_label(image, size)


def _labels(dirs: list[Path]) -> list[str]:
    """Short distinct names for the runs: folder names, else parent/folder, else numbered."""
    for name in (lambda d: d.name, lambda d: f"{d.parent.name}/{d.name}"):
        labels = [name(d.resolve()) for d in dirs]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{d.name} ({i + 1})" for i, d in enumerate(dirs)]


def _example_order(rank: np.ndarray, count: int) -> list[int]:
    """Up to ``count`` queries to show: the worst failures (half) and then successes."""
    misses = [int(i) for i in np.argsort(-rank, kind="stable") if rank[i] > 0]
    hits = [int(i) for i in np.flatnonzero(rank == 0)]
    chosen = misses[: count // 2]
    chosen += hits[: count - len(chosen)]
    chosen += [i for i in misses if i not in chosen][: count - len(chosen)]
    return chosen


def _retrieval_section(found: Retrieval, count: int) -> html.Section:
    m = found.manifest
    examples = []
    for i in _example_order(found.rank, count):
        positive = int(m.positive[i])
        examples.append(figures.RetrievalExample(
            query=_display(m.query_paths[i]),
            top=[_display(m.reference_paths[j]) for j in found.top[i]],
            top_correct=[int(j) == positive for j in found.top[i]],
            rank=int(found.rank[i]), truth=_display(m.reference_paths[positive]),
            caption=f"place {m.place_ids[i]}"))
    r1 = 100.0 * float(np.mean(found.rank == 0))
    return html.Section(
        "Retrieval examples",
        html.image(figures.retrieval_examples(examples), "retrieval examples",
                   "Each row: a query panorama and its five most similar satellite tiles, best "
                   "first; the true tile is framed green, others red. Failures come first."),
        f"Ranked within the report's sample of {m.num_queries} held-out places "
        f"({m.num_references} tiles; R@1 {r1:.1f} % on this sample).")


def _bev_section(run: Run, found: Retrieval, count: int) -> html.Section | None:
    m = found.manifest
    rows = [i for i in range(m.num_queries) if m.prior_paths[int(m.positive[i])] is not None]
    rows = rows[:count]  # the first sampled places: a fixed, unbiased choice
    if run.model.bev is None or not rows:
        return None
    from ssageo.data.transforms import label_to_classes

    probs = bev_probabilities(run, [m.query_paths[i] for i in rows])
    return html.Section(
        "BEV prediction vs. the prior label",
        html.image(figures.bev_panels(
            [_display(m.query_paths[i]) for i in rows],
            [_display(m.reference_paths[int(m.positive[i])]) for i in rows],
            [label_to_classes(_display(m.prior_paths[int(m.positive[i])], "L"),
                              get(run.config, "model.bev.classes", 2),
                              str(m.prior_paths[int(m.positive[i])])) for i in rows],
            list(probs), [f"place {m.place_ids[i]}" for i in rows]),
            "BEV predictions", "Left to right: the query panorama, its satellite tile, the "
            "tile's prior label (white = object) and the BEV head's prediction from the "
            "panorama alone (probability of 'object', north up)."),
        "The auxiliary head that SSA trains: it must predict the satellite tile's semantic "
        "layout from the ground view.")


def _cam_section(run: Run, found: Retrieval, count: int) -> html.Section:
    m = found.manifest
    rows = list(range(min(count, m.num_queries)))  # the first sampled places, as for BEV
    queries = [m.query_paths[i] for i in rows]
    references = [m.reference_paths[int(m.positive[i])] for i in rows]
    q_maps, r_maps = grad_cam(run, queries, references)
    return html.Section(
        "Activation maps (Grad-CAM)",
        html.image(figures.activation_maps(
            [_display(p) for p in queries], list(q_maps), [_display(p) for p in references],
            list(r_maps), [f"place {m.place_ids[i]}" for i in rows]),
            "activation maps", "Warm colours: regions whose features raise the similarity of "
            "the matching pair (gradient-weighted stride-16 feature maps)."),
        "Where the encoder looks when it matches a query with its true reference.")


def _meta(run: Run, found: Retrieval, log: RunLog, summary: dict) -> list[tuple[str, str]]:
    from ssageo.data import get_spec

    cfg, m = run.config, found.manifest
    seconds = summary.get("train_seconds_this_session")
    return [
        ("run", str(run.run_dir)),
        ("checkpoint", str(run.checkpoint)),
        ("dataset", f"{get_spec(m.dataset).title} at {m.root} (report sample: {m.split} split)"),
        ("model", f"{get(cfg, 'model.backbone')}, BEV head "
                  f"{'on' if get(cfg, 'model.bev.enabled') else 'off'}"),
        ("input sizes", f"query {get(cfg, 'data.query_size')}, "
                        f"reference {get(cfg, 'data.reference_size')}"),
        ("training", f"{len(log.steps)} steps logged, {len(log.evals)} evaluations"
                     + (f", {float(seconds):.0f} s" if seconds is not None else "")),
    ]


def is_report(path: Path) -> bool:
    """True for an HTML page written by ``ssageo report`` (its generator tag, or the title of
    pages written before the tag existed), read from the first 4 kB only."""
    try:
        with Path(path).open("rb") as f:
            head = f.read(4096).decode("utf-8", errors="replace")
    except OSError:
        return False
    return html.GENERATOR_TAG in head or "<title>ssageo report: " in head


def build_report(run_dir: str | Path, out: str | Path | None = None,
                 compare: str | Path | None = None, data_root: str | Path | None = None,
                 max_examples: int = 6, max_places: int = 100,
                 progress: Callable[[str], None] | None = None,
                 checkpoint: str = "best") -> Path:
    """Write the HTML report of a training run; returns its path.

    ``out`` defaults to ``RUN_DIR/report.html``; ``compare`` adds another run's curves,
    metrics and errors beside this one's; ``data_root`` overrides the runs' ``data.root``.
    At most ``max_places`` held-out places are embedded and ``max_examples`` rows drawn per
    figure. ``progress(message)``, when given, is called before each stage. ``checkpoint``
    "best" shows each run's best validation checkpoint (else its last), "last" its final one.
    """
    say = progress or (lambda message: None)
    started = time.perf_counter()
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / REPORT_FILE
    dirs = [run_dir] + ([Path(compare)] if compare is not None else [])
    labels = _labels(dirs)
    say("reading training logs")
    logs = {label: read_run_log(d) for label, d in zip(labels, dirs, strict=True)}
    summaries = {label: read_summary(d) for label, d in zip(labels, dirs, strict=True)}
    say("loading checkpoints")
    runs = {label: load_run(d, checkpoint) for label, d in zip(labels, dirs, strict=True)}
    say("embedding held-out places")
    found = {}
    for label, run in runs.items():
        manifest = subset(held_out_manifest(run.config, data_root), max_places)
        found[label] = retrieve(run, manifest)
    main_label, main_run, main_found = labels[0], runs[labels[0]], found[labels[0]]

    metrics = {}
    for label in labels:
        values = dict(final_metrics(logs[label], summaries[label], checkpoint))
        seconds = summaries[label].get("train_seconds_this_session")
        if seconds is not None:
            values["train_time_s"] = seconds
        metrics[label] = values
    sections = [
        html.Section("Runs", "".join(
            html.definition_list(_meta(runs[lb], found[lb], logs[lb], summaries[lb]))
            for lb in labels)),
        html.Section("Metrics", html.metrics_table(metrics),
                     "Held-out evaluation recorded by training ("
                     + ("the best validation epoch, else the last evaluation"
                        if checkpoint == "best" else "the last evaluation")
                     + "); recalls in %."),
    ]
    say("cropping queries to smaller fields of view")
    sections.append(html.Section(
        "Recall vs. field of view", html.metrics_table(recall_by_fov(main_run, main_found)),
        f"{main_label} on the report's sample of {main_found.manifest.num_queries} held-out "
        f"places: each query cropped to the field of view (heading "
        f"{get(main_run.config, 'data.heading', 'north')}, seeded per query); recalls in %."))
    say("drawing training curves")
    sections.append(html.Section("Training curves", html.image(
        figures.training_curves(logs), "training curves",
        "Per-step losses (faint) with their running mean; learning rate; R@1 at each "
        "validation.")))
    say("drawing retrieval examples")
    sections.append(_retrieval_section(main_found, max_examples))
    say("predicting BEV layouts")
    bev = _bev_section(main_run, main_found, min(4, max_examples))
    if bev is not None:
        sections.append(bev)
    say("computing activation maps")
    sections.append(_cam_section(main_run, main_found, min(4, max_examples)))
    say("projecting descriptors")
    m = main_found.manifest
    pairs = main_found.query, main_found.reference[m.positive]
    sections.append(html.Section("Descriptor map", html.image(
        figures.descriptor_map(*pairs), "descriptor map",
        "Each query descriptor is linked to its true reference's descriptor; short links mean "
        "the two views land close together."),
        f"{main_label}: {m.num_queries} held-out places."))
    errors = {label: f.error_m for label, f in found.items() if f.error_m is not None}
    if errors:
        sections.append(html.Section("Localization error", html.image(
            figures.error_histogram(errors), "metre error histogram",
            "Distance from each sampled query's true location to the centre of its top-1 "
            "tile."), "How far off the top-1 guess is, on the report's sample of places."))
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    title = f"ssageo report: {main_label}" + (f" vs. {labels[1]}" if len(labels) > 1 else "")
    atomic_write_text(out, html.page(
        title, f"written {stamp} in {time.perf_counter() - started:.1f} s", sections))
    return out
