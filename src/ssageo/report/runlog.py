"""Reading a training run directory: ``metrics.jsonl``, ``summary.json``, and the per-epoch table.

``metrics.jsonl`` holds one JSON object per line, written by the training loop: per-step records
(``step``, ``epoch``, ``loss``, ``infonce``, ``bev``, ``lr``, ``pairs_per_s``, ...) and
per-evaluation records (``kind: eval``: ``R@1``, ``R@5``, ``R@10``, ``R@1%`` in percent,
``median_error_m``, ...) and skipped non-finite steps (``kind: nonfinite``); see
``ssageo.train.loop``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ssageo.constants import METRICS_FILE, SUMMARY_FILE
from ssageo.io import DataError

if TYPE_CHECKING:
    from rich.table import Table

# Evaluation metrics shown in tables, in this order, where a run has them.
EVAL_KEYS = ("R@1", "R@5", "R@10", "R@1%", "hit_rate", "median_error_m", "mean_error_m")


_KINDS = {"step": "steps", "eval": "evals", "nonfinite": "nonfinite"}


@dataclass
class RunLog:
    """The records of one run in file order, each a plain dict: training ``steps``,
    ``evals`` (validations) and ``nonfinite`` (steps skipped for a non-finite loss)."""

    run_dir: Path
    steps: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    nonfinite: list[dict] = field(default_factory=list)

    def series(self, key: str, source: str = "steps") -> tuple[list[float], list[float]]:
        """(x, y) of ``key`` over the run: x is the global step (or the epoch when absent)."""
        xs, ys = [], []
        for i, rec in enumerate(getattr(self, source)):
            value = rec.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                xs.append(float(rec.get("step", rec.get("epoch", i))))
                ys.append(float(value))
        return xs, ys


def read_records(path: Path) -> list[tuple[int, dict]]:
    """``(line number, record)`` for each record of a ``metrics.jsonl`` file.

    Raises DataError naming ``path:line`` for a line that is not JSON (or not UTF-8), not an
    object, of an unknown ``kind``, or whose ``step``/``epoch`` is not a whole number.
    """
    path = Path(path)
    records = []
    # Decoded line by line, so that an error names the line that is not text.
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{path}:{number}: not UTF-8 text (is this a metrics.jsonl "
                            "file?)") from None
        if line.strip():
            records.append((number, _record(path, number, line)))
    return records


def _record(path: Path, number: int, line: str) -> dict:
    where = f"{path}:{number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {line.strip()[:80]!r}")
    kind = record.get("kind", "step")
    if not isinstance(kind, str) or kind not in _KINDS:
        raise DataError(f"{where}: unknown record kind {kind!r} "
                        f"(expected one of {', '.join(_KINDS)})")
    for key in ("step", "epoch"):
        value = record.get(key, 0)
        if type(value) is not int or value < 0:
            raise DataError(f"{where}: {key} must be a whole number >= 0, got {value!r}")
    return record


def read_run_log(run_dir: Path) -> RunLog:
    """Parse ``RUN_DIR/metrics.jsonl``; a missing file or a malformed line raises DataError."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: run directory not found")
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise DataError(f"{path}: metrics file not found (is {run_dir} a training run?)")
    log = RunLog(run_dir)
    for _, record in read_records(path):
        getattr(log, _KINDS[record.get("kind", "step")]).append(record)
    return log


def read_summary(run_dir: Path) -> dict:
    """``RUN_DIR/summary.json`` as a dict, or ``{}`` while a run has not written it yet."""
    path = Path(run_dir) / SUMMARY_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object at the top level")
    return data


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def epoch_rows(log: RunLog) -> list[dict[str, Any]]:
    """One row per epoch: step count, mean loss/InfoNCE/BEV, last lr, mean pairs/s, skipped
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
        for key in ("loss", "infonce", "bev", "pairs_per_s"):
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
        return f"{value:.4f}" if key in ("loss", "infonce", "bev") else f"{value:.1f}"
    return str(value)


def log_table(log: RunLog) -> Table:
    """A rich Table of ``epoch_rows(log)``: one row per epoch (recalls in %, errors in m)."""
    from rich.table import Table

    rows = epoch_rows(log)
    columns = ["epoch", "steps", "loss", "infonce", "bev", "lr", "pairs_per_s"]
    columns += [k for k in ("skipped", *EVAL_KEYS) if any(k in r for r in rows)]
    headers = {"infonce": "InfoNCE", "bev": "BEV", "pairs_per_s": "pairs/s",
               "median_error_m": "med. m", "mean_error_m": "mean m", "hit_rate": "hit%"}
    table = Table(title=f"{log.run_dir / METRICS_FILE}", caption="recalls in %, errors in m")
    for col in columns:
        table.add_column(headers.get(col, col), justify="right", no_wrap=True)
    for row in rows:
        table.add_row(*(format_value(c, row.get(c)) for c in columns))
    return table
