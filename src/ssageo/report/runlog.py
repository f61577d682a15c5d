"""The per-epoch view of a training run's log (``ssageo log``, the report's tables).

The run directory's files are read by ``ssageo.train.rundir`` (``read_run_log``,
``read_summary``); this module turns the records into rows and cells. The loss columns are the
objective's terms (``ssageo.model.losses.loss_terms``), so a new term shows up here by itself.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ssageo.train.rundir import METRICS_FILE, RunLog

if TYPE_CHECKING:
    from rich.table import Table

    from ssageo.model.losses import LossTerm

# Evaluation metrics shown in tables, in this order, where a run has them.
EVAL_KEYS = ("R@1", "R@5", "R@10", "R@1%", "hit_rate", "median_error_m", "mean_error_m")


def loss_terms() -> tuple[LossTerm, ...]:
    """The objective's terms (``ssageo.model.losses.LOSS_TERMS``), imported when first needed:
    importing the model package loads timm, which reading a log has no other use for."""
    from ssageo.model.losses import loss_terms as terms

    return terms()


def loss_keys() -> tuple[str, ...]:
    """The step records' loss values: the total, then each term by name."""
    return ("loss", *(term.name for term in loss_terms()))


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def epoch_rows(log: RunLog) -> list[dict[str, Any]]:
    """One row per epoch: step count, mean loss and loss terms, last lr, mean pairs/s, skipped
    non-finite steps, and the metrics of the epoch's last evaluation (an evaluation without
    ``epoch`` belongs to the epoch of the last step record before it)."""
    rows: dict[int, dict[str, Any]] = {}

    def row(epoch: int) -> dict[str, Any]:
        return rows.setdefault(epoch, {"epoch": epoch, "steps": 0})

    collected: dict[int, dict[str, list[float]]] = {}
    for rec in log.steps:
        epoch = int(rec.get("epoch", 0))
        row(epoch)["steps"] += 1
        if isinstance(rec.get("lr"), (int, float)):
            row(epoch)["lr"] = float(rec["lr"])
        bucket = collected.setdefault(epoch, {})
        for key in (*loss_keys(), "pairs_per_s"):
            if isinstance(rec.get(key), (int, float)) and math.isfinite(rec[key]):
                bucket.setdefault(key, []).append(float(rec[key]))
    for epoch, bucket in collected.items():
        rows[epoch].update({key: _mean(values) for key, values in bucket.items()})
    for rec in log.nonfinite:
        target = row(int(rec.get("epoch", 0)))
        target["skipped"] = target.get("skipped", 0) + 1
    for rec in log.evals:
        at = rec.get("epoch")
        if at is None:
            step = rec.get("step", math.inf)
            before = [s for s in log.steps if s.get("step", -1) <= step]
            at = before[-1].get("epoch", 0) if before else 0
        row(int(at)).update({k: rec[k] for k in EVAL_KEYS if k in rec})
    return [rows[e] for e in sorted(rows)]


def final_metrics(log: RunLog, summary: dict, checkpoint: str = "best") -> dict[str, float]:
    """The run's headline metrics: those of the evaluation at ``summary["best_epoch"]`` (the
    epoch of ``checkpoints/best``; with ``checkpoint="last"``, or without one, of the last
    evaluation), with its ``epoch``; ``{}`` without evaluations."""
    best = [r for r in log.evals
            if checkpoint == "best" and r.get("epoch") == summary.get("best_epoch")]
    chosen = best[-1] if best else (log.evals[-1] if log.evals else {})
    keys = (*EVAL_KEYS, "epoch")
    return {k: chosen[k] for k in keys if isinstance(chosen.get(k), (int, float))}


def format_value(key: str, value: Any) -> str:
    """Human text for a table cell: recalls (stored in %) with two decimals, metres with one,
    lr in e-notation, losses with four."""
    if value is None:
        return "-"
    if key.startswith("R@") or key == "hit_rate":  # already in percent
        return f"{float(value):.2f}"
    if key.endswith("_m"):
        return f"{float(value):.1f}"
    if key == "lr":
        return f"{float(value):.2e}"
    if isinstance(value, float):
        return f"{value:.4f}" if key in loss_keys() else f"{value:.1f}"
    return str(value)


def log_table(log: RunLog) -> Table:
    """A rich Table of ``epoch_rows(log)``: one row per epoch (recalls in %, errors in m)."""
    from rich.table import Table

    rows = epoch_rows(log)
    columns = ["epoch", "steps", *loss_keys(), "lr", "pairs_per_s"]
    columns += [k for k in ("skipped", *EVAL_KEYS) if any(k in r for r in rows)]
    headers = {term.name: term.label for term in loss_terms()}
    headers.update({"pairs_per_s": "pairs/s", "median_error_m": "med. m",
                    "mean_error_m": "mean m", "hit_rate": "hit%"})
    table = Table(title=f"{log.run_dir / METRICS_FILE}", caption="recalls in %, errors in m")
    for col in columns:
        table.add_column(headers.get(col, col), justify="right", no_wrap=True)
    for row in rows:
        table.add_row(*(format_value(c, row.get(c)) for c in columns))
    return table
