"""``ssageo data check``: is a dataset folder complete and readable, and what is in it.

:func:`check_dataset` loads every split of the detected dataset and, for every image, reads its
header (PIL's lazy open reads a few hundred bytes, not the pixels) and its last bytes: a JPEG
must end with its end-of-image marker and a PNG with its IEND chunk, which a truncated download
lacks. Only images failing that check (and images of other formats) are decoded in full, so a
truncated file is found at header cost; ``full=True`` decodes every image (slower; it also finds
damage inside a file). The result is a plain dict, printed as tables or JSON by the CLI.
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

from ssageo.data.base import MAX_EXAMPLES, DatasetSpec, Manifest, SplitUnavailable
from ssageo.data.manifest import load_manifest
from ssageo.data.registry import get_spec, reading_mode, resolve_dataset
from ssageo.io import DataError, open_image

# The bytes a complete file of each format ends with (trailing padding stripped first).
_END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}
_PADDING = b"\x00\r\n "


def _ends_complete(path: Path, fmt: str | None) -> bool:
    """True when ``path`` ends with the end marker of its format (False for other formats)."""
    marker = _END_MARKERS.get(fmt or "")
    if marker is None:
        return False
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, 2) - 64))
        return f.read().rstrip(_PADDING).endswith(marker)


def inspect_image(path: Path, full: bool = False) -> tuple[int, int] | str:
    """(width, height) of a readable image, else "path: reason".

    Reads the header and the last bytes; decodes the pixels only when the file does not end
    as its format should (or is not JPEG/PNG), or always with ``full``.
    """
    try:
        with open_image(path) as img:
            if full or not _ends_complete(path, img.format):
                img.load()
            return img.size
    except DataError as exc:
        return str(exc)


def _examples(items: list[str]) -> dict:
    return {"count": len(items), "examples": items[:MAX_EXAMPLES]}


def _scan_views(manifests: list[Manifest], progress: bool, full: bool) -> dict:
    """Header sizes per view, unreadable images, and images whose size differs from the most
    common size of their view."""
    from tqdm import tqdm

    views: dict[str, set[Path]] = {"query": set(), "reference": set(), "prior": set()}
    for m in manifests:
        views["query"].update(m.query_paths)
        views["reference"].update(m.reference_paths)
        views["prior"].update(p for p in m.prior_paths if p is not None)
    total = sum(len(v) for v in views.values())
    unreadable: list[str] = []
    sizes: dict[str, Counter] = {}
    odd: list[str] = []
    desc = "decoding images" if full else "reading image headers and ends"
    with tqdm(total=total, desc=desc, disable=not progress,
              unit="img") as bar:
        for view, paths in views.items():
            found: dict[Path, tuple[int, int]] = {}
            for path in sorted(paths):
                size = inspect_image(path, full)
                if isinstance(size, str):
                    unreadable.append(size)
                else:
                    found[path] = size
                bar.update()
            sizes[view] = Counter(found.values())
            if sizes[view]:
                usual = sizes[view].most_common(1)[0][0]
                odd += [f"{p}: {w}x{h} {view} image, most are {usual[0]}x{usual[1]}"
                        for p, (w, h) in found.items() if (w, h) != usual]
    return {
        "sizes": {v: {f"{w}x{h}": n for (w, h), n in c.most_common()} for v, c in sizes.items()},
        "unreadable": unreadable, "unexpected_sizes": odd,
    }


def check_dataset(root: str | Path, dataset: str = "auto", vigor_mode: str = "same-area",
                  strict: bool = False, progress: bool = False, full: bool = False) -> dict:
    """Check every split of the dataset under ``root``; returns a JSON-ready report.

    Keys: ``root``, ``dataset``, ``layout``, ``vigor_mode``, ``query_kind`` (panorama or
    perspective, from the dataset's spec), ``splits`` (per split: queries, references,
    skipped pairs, prior coverage; or ``error``, what stops a present split loading; or
    ``unavailable``, why an absent split, e.g. a separate download, is left out),
    ``missing_files`` and ``empty_files`` (count + first examples), ``unreadable_images``,
    ``unexpected_sizes``, ``image_sizes``, ``priors``, ``unavailable_splits``, ``gps``,
    ``problems`` (why it is not usable) and ``usable``.
    Missing or empty files make the dataset unusable only with ``strict`` (readers skip those
    pairs and say so); unavailable splits do not either, while at least one split loads.
    ``full`` decodes every image (see the module docstring). Raises DataError when ``root``
    matches no (or the wrong) layout.
    """
    root = Path(root)
    dataset = resolve_dataset(root, dataset, vigor_mode)
    spec = get_spec(dataset)
    splits: dict[str, dict] = {}
    manifests: list[Manifest] = []
    missing: list[str] = []  # in order of discovery, each once (splits share VIGOR tiles)
    seen: set[str] = set()
    for split in spec.splits:
        try:
            with warnings.catch_warnings():  # the skipped pairs are in this report instead
                warnings.simplefilter("ignore")
                m = load_manifest(root, dataset, split, vigor_mode, use_cache=False)
        except SplitUnavailable as exc:
            splits[split] = {"unavailable": str(exc)}
            continue
        except DataError as exc:
            splits[split] = {"error": str(exc)}
            continue
        manifests.append(m)
        missing += [p for p in m.missing if p not in seen]
        seen.update(m.missing)
        splits[split] = {"queries": m.num_queries, "references": m.num_references,
                         "skipped": m.skipped, "prior_coverage": round(m.prior_coverage, 4)}
    scan = _scan_views(manifests, progress, full)
    refs = {p: q for m in manifests for p, q in zip(m.reference_paths, m.prior_paths,
                                                    strict=True)}
    with_prior = sum(q is not None for q in refs.values())
    empty = [p for p in missing if p.endswith("empty (0 bytes)")]
    absent = [p for p in missing if p not in empty]
    problems = [f"{s}: {info['error']}" for s, info in splits.items() if "error" in info]
    if not manifests:
        problems += [f"{s}: {info['unavailable']}" for s, info in splits.items()
                     if "unavailable" in info]
    if scan["unreadable"]:
        problems.append(f"{len(scan['unreadable'])} unreadable image(s)")
    if strict and missing:
        problems.append(f"{len(missing)} missing or empty file(s) (--strict)")
    return {
        "root": str(root), "dataset": dataset,
        "layout": manifests[0].layout if manifests else dataset,
        "vigor_mode": reading_mode(dataset, vigor_mode) if spec.modes else None,
        "query_kind": spec.query,
        "splits": splits,
        "missing_files": _examples(absent),
        "empty_files": _examples(empty),
        "unreadable_images": _examples(scan["unreadable"]),
        "unexpected_sizes": _examples(scan["unexpected_sizes"]),
        "image_sizes": scan["sizes"],
        "official_sizes": {v: f"{w}x{h}" for v, (w, h) in (spec.sizes or {}).items()},
        "priors": {"tiles": len(refs), "with_label": with_prior,
                   "coverage": round(with_prior / len(refs), 4) if refs else 0.0},
        "unavailable_splits": [s for s, info in splits.items() if "unavailable" in info],
        "gps": _gps(spec, root, manifests),
        "problems": problems,
        "usable": not problems,
    }


def _gps(spec: DatasetSpec, root: Path, manifests: list[Manifest]) -> dict:
    """Which coordinates exist, for the GPS neighbour lists and metre errors."""
    ok = bool(manifests) and all(m.query_coords is not None or m.utm is not None
                                 for m in manifests)
    source = spec.coords_source.format(root=root)
    if spec.coords == "gps" and not ok:
        there = spec.coords_file and (root / spec.coords_file).is_file()
        source += (" (present, but no split loaded)" if there
                   else " (missing: GPS neighbour lists cannot be built)")
    return {"available": ok, "source": source}
