"""The datasets ssageo reads, by name, and how a folder (or file) is recognised as one of them.

Each reader module declares a :class:`~ssageo.data.base.DatasetSpec` as ``SPEC`` beside its
``markers``, ``sources`` and ``read`` functions; adding a dataset is writing such a module and
naming it in ``_READERS`` below. Everything else (check, priors, training's validation split,
eval's default split, the report, neighbour lists, the index, the config's ``data.dataset``
choice) asks the spec.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from ssageo.data import cvact, cvusa, pairs, university, vigor
from ssageo.data.base import DatasetSpec
from ssageo.io import DataError

_READERS: dict[str, ModuleType] = {m.SPEC.name: m for m in (cvusa, cvact, vigor, university, pairs)}


def dataset_names() -> tuple[str, ...]:
    """The registered dataset names, in registration order (``data.dataset`` takes these or
    ``auto``)."""
    return tuple(_READERS)


def dataset_choices() -> str:
    """``auto | cvusa | ...`` for option help texts."""
    return " | ".join(("auto", *_READERS))


def reader(name: str) -> ModuleType:
    """The reader module of dataset ``name`` (``markers``, ``sources``, ``read``, ``SPEC``)."""
    if name not in _READERS:
        raise DataError(f"unknown dataset '{name}' (use auto, {', '.join(_READERS)})")
    return _READERS[name]


def get_spec(name: str) -> DatasetSpec:
    """The spec of dataset ``name``; DataError naming the choices for an unknown one."""
    return reader(name).SPEC


def reading_modes() -> tuple[str, ...]:
    """Every reading mode of any dataset (the ``vigor_mode`` values)."""
    return tuple(dict.fromkeys(m for r in _READERS.values() for m in r.SPEC.modes))


def mode_help() -> str:
    """The reading modes per dataset, for option help texts."""
    return "; ".join(f"{r.SPEC.title}: {' | '.join(r.SPEC.modes)}" for r in _READERS.values()
                     if r.SPEC.modes)


DEFAULT_MODE = "same-area"  # what data.vigor_mode and the --vigor-mode options default to


def reading_mode(dataset: str, mode: str) -> str:
    """The mode dataset ``dataset`` reads for ``mode``: itself when it is one of the dataset's
    modes (or the dataset has none), the dataset's first mode for the default
    (:data:`DEFAULT_MODE`), else DataError naming the dataset's modes."""
    spec = get_spec(dataset)
    if not spec.modes or mode in spec.modes:
        return mode
    if mode == DEFAULT_MODE:
        return spec.modes[0]
    raise DataError(f"'{mode}' is not a {spec.title} reading mode (use {', '.join(spec.modes)})")


def _markers(root: Path) -> dict[str, list[str]]:
    """For each dataset, the layout markers found at ``root``."""
    return {name: r.markers(root) for name, r in _READERS.items()}


def detect_dataset(root: str | Path) -> str:
    """Name of the dataset laid out at ``root`` (a folder, or a pairs ``.csv`` file).

    Raises DataError when it is missing, matches no layout, or matches several.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: dataset folder not found")
    found = {d: m for d, m in _markers(root).items() if m}
    if len(found) == 1:
        return next(iter(found))
    if not found:
        expected = "; ".join(f"{r.SPEC.title}: {r.SPEC.expected}" for r in _READERS.values())
        # A common slip is to give the folder that holds the dataset: name what is inside.
        inside = [f"{sub.name}/ ({get_spec(d).title})" for sub in
                  (sorted(root.iterdir()) if root.is_dir() else [])
                  if sub.is_dir() and not sub.name.startswith(".")
                  for d, m in _markers(sub).items() if m]
        hint = f"; datasets found in subfolders: {', '.join(inside)}" if inside else ""
        raise DataError(f"{root}: does not look like any supported dataset layout "
                        f"(expected one of - {expected}){hint}")
    seen = "; ".join(f"{get_spec(d).title} ({', '.join(m[:3])})" for d, m in found.items())
    raise DataError(f"{root}: ambiguous layout, found markers of several datasets: {seen}; "
                    "pass --dataset explicitly")


def check_layout(root: Path, dataset: str) -> None:
    """Refuse a root whose layout is another dataset's, saying which one it looks like."""
    spec = get_spec(dataset)
    if not root.exists():
        raise DataError(f"{root}: dataset folder not found")
    markers = _markers(root)
    if markers[dataset]:
        return
    others = [d for d in _READERS if markers[d]]
    if others:
        other = others[0]
        raise DataError(f"{root}: expected a {spec.title} layout ({spec.expected}) but this looks "
                        f"like {get_spec(other).title} (found {', '.join(markers[other][:3])});"
                        f" use --dataset {other} or --dataset auto")
    raise DataError(f"{root}: not a {spec.title} layout: none of {spec.expected} found")


def resolve_dataset(root: Path, dataset: str, vigor_mode: str = "same-area") -> str:
    """The dataset at ``root``: detected for ``auto``, else checked against the layout."""
    modes = reading_modes()
    if vigor_mode not in modes:
        raise DataError(f"unknown reading mode '{vigor_mode}' (use {', '.join(modes)})")
    if dataset == "auto":
        return detect_dataset(root)
    check_layout(Path(root), dataset)
    return dataset
