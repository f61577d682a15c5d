"""Assembling the report: one self-contained HTML page, figures embedded as base64 PNG, inline
CSS, no scripts and no external resources, so it opens offline in any browser."""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape

from ssageo.report.runlog import EVAL_KEYS, format_value

_LABELS = {"median_error_m": "median error (m)", "mean_error_m": "mean error (m)",
           "hit_rate": "hit rate (%)", "train_time_s": "training time (s)",
           "epoch": "evaluated after epoch"}

GENERATOR_TAG = '<meta name="generator" content="ssageo report">'

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto;
       max-width: 1200px; color: #222; padding: 0 1rem; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; }
h2 { font-size: 1.2rem; border-bottom: 1px solid #ddd; padding-bottom: .2rem; margin-top: 2rem; }
p.note { color: #555; font-size: .9rem; }
table { border-collapse: collapse; margin: .5rem 0; font-size: .92rem; }
th, td { border: 1px solid #ccc; padding: .3rem .7rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f3f3f3; }
figure { margin: .8rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: .85rem; }
dl.meta { display: grid; grid-template-columns: max-content auto; gap: .1rem 1rem; }
dl.meta dt { font-weight: 600; } dl.meta dd { margin: 0; font-family: monospace; }
"""


@dataclass
class Section:
    """One heading of the page with a short explanatory note and its HTML body."""

    title: str
    body: str
    note: str = ""


def image(png: bytes, alt: str, caption: str = "") -> str:
    """A <figure> holding ``png`` as a data URI, with ``alt`` text and an optional caption."""
    data = base64.b64encode(png).decode("ascii")
    cap = f"<figcaption>{escape(caption)}</figcaption>" if caption else ""
    return f'<figure><img alt="{escape(alt)}" src="data:image/png;base64,{data}">{cap}</figure>'


def metrics_table(runs: Mapping[str, Mapping[str, float]]) -> str:
    """Metrics (rows) of each run (columns): recalls in %, errors in metres, ``-`` if absent."""
    keys = [k for k in (*EVAL_KEYS, "epoch", "train_time_s")
            if any(k in m for m in runs.values())]
    if not keys:
        return '<p class="note">No evaluation metrics recorded.</p>'
    head = "".join(f"<th>{escape(label)}</th>" for label in runs)
    rows = []
    for key in keys:
        label = _LABELS.get(key, f"{key} (%)" if key.startswith("R@") else key)
        cells = "".join(
            f"<td>{escape(format_value(key, m.get(key)) if key != 'train_time_s' else _time(m))}"
            "</td>" for m in runs.values())
        rows.append(f"<tr><td>{escape(label)}</td>{cells}</tr>")
    return (f"<table><thead><tr><th>metric</th>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def _time(metrics: Mapping[str, float]) -> str:
    value = metrics.get("train_time_s")
    return "-" if value is None else f"{float(value):.0f}"


def definition_list(items: Sequence[tuple[str, str]]) -> str:
    """A two-column list of (name, value) facts about a run."""
    body = "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in items)
    return f'<dl class="meta">{body}</dl>'


def page(title: str, subtitle: str, sections: Sequence[Section]) -> str:
    """The complete HTML document."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        GENERATOR_TAG,  # how `ssageo report` recognises a page it may replace
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{escape(title)}</h1><p class=\"note\">{escape(subtitle)}</p>",
    ]
    for section in sections:
        parts.append(f"<section><h2>{escape(section.title)}</h2>")
        if section.note:
            parts.append(f'<p class="note">{escape(section.note)}</p>')
        parts.append(section.body + "</section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
