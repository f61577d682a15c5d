"""``ssageo data check``: is a dataset folder complete and readable, and what is in it.

:func:`check_dataset` loads every split of the detected dataset and opens the header of every
image (PIL's lazy open reads a few hundred bytes, not the pixels) to find unreadable files and
odd sizes. The result is a plain dict, printed as tables or JSON by the CLI.
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

from ssageo.data.manifest import MAX_EXAMPLES, Manifest, load_manifest, resolve_dataset
from ssageo.io import DataError

SPLITS_OF = {"cvusa": ("train", "val"), "cvact": ("train", "val", "test"),
             "vigor": ("train", "test")}
# (width, height) of the images as distributed, for information (synthetic worlds are smaller).
OFFICIAL_SIZES = {
    "cvusa": {"reference": (750, 750), "query": (1232, 224)},
    "cvact": {"reference": (1200, 1200), "query": (1664, 832)},
    "vigor": {"reference": (640, 640), "query": (2048, 1024)},
}


def image_size(path: Path) -> tuple[int, int] | str:
    """(width, height) from the image header, or the reason it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.size
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        return f"cannot decode ({exc})"


def _examples(items: list[str]) -> dict:
    return {"count": len(items), "examples": items[:MAX_EXAMPLES]}


def _scan_views(manifests: list[Manifest], progress: bool) -> dict:
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
    with tqdm(total=total, desc="reading image headers", disable=not progress,
              unit="img") as bar:
        for view, paths in views.items():
            found: dict[Path, tuple[int, int]] = {}
            for path in sorted(paths):
                size = image_size(path)
                if isinstance(size, str):
                    unreadable.append(f"{path}: {size}")
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
                  strict: bool = False, progress: bool = False) -> dict:
    """Check every split of the dataset under ``root``; returns a JSON-ready report.

    Keys: ``root``, ``dataset``, ``layout``, ``splits`` (per split: queries, references,
    prior coverage, or the error that stops it loading), ``missing_files`` and
    ``empty_files`` (count + first examples), ``unreadable_images``, ``unexpected_sizes``,
    ``image_sizes``, ``priors``, ``gps``, ``problems`` (why it is not usable) and ``usable``.
    Missing or empty files make the dataset unusable only with ``strict`` (readers skip those
    pairs and say so). Raises DataError when ``root`` matches no (or the wrong) layout.
    """
    root = Path(root)
    dataset = resolve_dataset(root, dataset, vigor_mode)
    splits: dict[str, dict] = {}
    manifests: list[Manifest] = []
    missing: list[str] = []  # in order of discovery, each once (splits share VIGOR tiles)
    seen: set[str] = set()
    for split in SPLITS_OF[dataset]:
        try:
            with warnings.catch_warnings():  # the skipped pairs are in this report instead
                warnings.simplefilter("ignore")
                m = load_manifest(root, dataset, split, vigor_mode, use_cache=False)
        except DataError as exc:
            splits[split] = {"error": str(exc)}
            continue
        manifests.append(m)
        missing += [p for p in m.missing if p not in seen]
        seen.update(m.missing)
        splits[split] = {"queries": m.num_queries, "references": m.num_references,
                         "skipped": len(m.missing), "prior_coverage": round(m.prior_coverage, 4)}
    scan = _scan_views(manifests, progress)
    refs = {p: q for m in manifests for p, q in zip(m.reference_paths, m.prior_paths,
                                                    strict=True)}
    with_prior = sum(q is not None for q in refs.values())
    empty = [p for p in missing if p.endswith("empty (0 bytes)")]
    absent = [p for p in missing if p not in empty]
    problems = [f"{s}: {info['error']}" for s, info in splits.items() if "error" in info]
    if scan["unreadable"]:
        problems.append(f"{len(scan['unreadable'])} unreadable image(s)")
    if strict and missing:
        problems.append(f"{len(missing)} missing or empty file(s) (--strict)")
    return {
        "root": str(root), "dataset": dataset,
        "layout": manifests[0].layout if manifests else dataset,
        "vigor_mode": vigor_mode if dataset == "vigor" else None,
        "splits": splits,
        "missing_files": _examples(absent),
        "empty_files": _examples(empty),
        "unreadable_images": _examples(scan["unreadable"]),
        "unexpected_sizes": _examples(scan["unexpected_sizes"]),
        "image_sizes": scan["sizes"],
        "official_sizes": {v: f"{w}x{h}" for v, (w, h) in OFFICIAL_SIZES[dataset].items()},
        "priors": {"tiles": len(refs), "with_label": with_prior,
                   "coverage": round(with_prior / len(refs), 4) if refs else 0.0},
        "gps": _gps(dataset, root, manifests),
        "problems": problems,
        "usable": not problems and bool(manifests),
    }


def _gps(dataset: str, root: Path, manifests: list[Manifest]) -> dict:
    """Which coordinates exist, for the GPS neighbour lists and metre errors."""
    if dataset == "cvact":
        ok = bool(manifests) and all(m.utm is not None for m in manifests)
        return {"available": ok, "source": "ACT_data.mat utm (easting, northing)"}
    if dataset == "cvusa":
        ok = bool(manifests) and all(m.query_coords is not None for m in manifests)
        return {"available": ok, "source": str(root / "split_locations" / "all.csv")
                + ("" if ok else " (missing: GPS neighbour lists cannot be built)")}
    return {"available": bool(manifests), "source": "panorama and tile file names"}
