"""Configuration as data: typed defaults, YAML presets shipped with the package, overrides.

Every key, with its type, default and one-line doc, is declared once in ``schema`` (one
dataclass per section; adding a key is one line there, see its docstring). A preset or YAML
file only overrides those defaults; it may name another one in ``_base_`` to start from.
Overrides use dotted keys (``train.lr=1e-4``); values are parsed as YAML, so
``model.bev.enabled=false`` gives a bool and ``data.query_size=[64,256]`` a list. A key the
schema does not have is an error (with a did-you-mean hint), in a file or an override, so typos
never pass silently. Every value is checked (and normalised: ``8.0`` -> ``8``, ``"1e-4"`` ->
``0.0001``), and the rules between keys (the BEV grid against the tile size, the batch against
the torchrun processes), once, when the config is built, so a bad value fails at start with
its key named, not after an epoch. ``load_config`` returns the nested dict the code reads,
every key present.

Two kinds of config: a training config (``data``, ``model``, ``loss``, ``train``, ``eval``)
and a priors config (a ``priors`` section only, for ``ssageo priors``); the kind follows from
the sections a config holds.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ssageo.config import schema
from ssageo.config.checks import ConfigError
from ssageo.config.schema import FREE_MAPPINGS, KINDS

__all__ = ["ConfigError", "apply_overrides", "config_hash", "get", "load_config", "merge",
           "preset_names", "save_config", "validate"]


def preset_names() -> list[str]:
    """Names of the presets shipped in ``ssageo/configs``."""
    folder = resources.files("ssageo") / "configs"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(source: str | Path) -> tuple[dict, str]:
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        text, origin = path.read_text(encoding="utf-8"), str(path)
    else:
        name = str(source)
        if name not in preset_names():
            raise ConfigError(
                f"unknown preset '{name}'; presets: {', '.join(preset_names())} "
                "(or give the path of a .yaml file)"
            )
        text = (resources.files("ssageo") / "configs" / f"{name}.yaml").read_text("utf-8")
        origin = f"preset {name}"
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: expected a mapping at the top level")
    return data, origin


def merge(base: dict, update: dict, prefix: str = "") -> dict:
    """Recursively merge ``update`` into a copy of ``base`` (``FREE_MAPPINGS`` are replaced)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if (isinstance(value, dict) and isinstance(out.get(key), dict)
                and f"{prefix}{key}" not in FREE_MAPPINGS):
            out[key] = merge(out[key], value, f"{prefix}{key}.")
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_config(source: str | Path = "synth-cpu", overrides: Iterable[str] = (),
                kind: str | None = None) -> dict:
    """Load a preset name or YAML path (following ``_base_``) over the defaults, apply
    ``key=value`` overrides, validate; returns the complete nested dict.

    ``kind``: ``train`` or ``priors`` to require that kind of config (None: either, as its
    sections say). Raises ConfigError naming the file or key and what is wrong.
    """
    layers = _resolve(source, set())
    origin = layers[-1][0]
    found = _kind_of(layers, origin)
    if kind is not None and found != kind and any(data for _, data in layers):
        raise ConfigError(f"{origin}: holds {found} settings, but a {kind} config is needed"
                          + (" (a 'priors' section only, like the priors-langsam preset)"
                             if kind == "priors" else ""))
    kind = kind or found
    config = schema.defaults(kind)
    for where, data in layers:
        _retire(data)
        _check_known(data, config, where, "")
        config = merge(config, data)
    return validate(apply_overrides(config, overrides), kind)


def _resolve(source: str | Path, seen: set[str]) -> list[tuple[str, dict]]:
    """The ``_base_`` chain of ``source`` as (origin, its own settings), the base first."""
    if str(source) in seen:
        raise ConfigError(f"'_base_' chain loops at {source}")
    data, origin = _read_yaml(source)
    base = data.pop("_base_", None)
    below = [] if base is None else _resolve(base, seen | {str(source)})
    return [*below, (origin, data)]


def _kind_of(layers: list[tuple[str, dict]], origin: str) -> str:
    """``priors`` for a config of a ``priors`` section only, else ``train``; both is refused."""
    sections = {key for _, data in layers for key in data}
    if "priors" not in sections:
        return "train"
    others = sorted(sections - {"priors"})
    if others:
        raise ConfigError(
            f"{origin}: 'priors' settings belong in their own config (a 'priors' section "
            f"only, like the priors-langsam preset), not beside {', '.join(others)}")
    return "priors"


# Keys that run directories saved before they were renamed or dropped may still hold:
# dotted key -> what to do with its section (the key is removed afterwards).
RETIRED = {
    # train.sampling.first replaced the gps flag: true = GPS lists, false = random batches
    "train.sampling.gps": lambda s: s.setdefault("first", "gps" if s["gps"] else "random"),
    "model.bev.recompute_decoder": lambda s: None,  # folded into model.bev.lean
}


def _retire(data: dict) -> None:
    for dotted, update in RETIRED.items():
        *parents, leaf = dotted.split(".")
        node = get(data, ".".join(parents))
        if isinstance(node, dict) and leaf in node:
            update(node)
            del node[leaf]


def _check_known(data: dict, base: dict, origin: str, prefix: str) -> None:
    """Every key of ``data`` must be a key of the config (``base``: the defaults): a misspelt
    key in a YAML file would otherwise be ignored."""
    for key, value in data.items():
        if key not in base:
            hint = difflib.get_close_matches(key, list(base), n=1)
            raise ConfigError(
                f"{origin}: unknown config key '{prefix}{key}'"
                + (f" (did you mean '{prefix}{hint[0]}'?)" if hint else "")
            )
        if isinstance(base[key], dict) and f"{prefix}{key}" not in FREE_MAPPINGS:
            if not isinstance(value, dict):
                raise ConfigError(f"{origin}: '{prefix}{key}' is a section of settings, "
                                  f"not {value!r}")
            _check_known(value, base[key], origin, f"{prefix}{key}.")


def apply_overrides(config: dict, overrides: Iterable[str]) -> dict:
    """Return a copy of ``config`` with dotted ``key=value`` overrides applied."""
    out = copy.deepcopy(config)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        # safe_load: a tag such as !!python/object is refused, never run
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.constructor.ConstructorError as exc:
            raise ConfigError(f"{key}: YAML tags are not allowed in overrides "
                              f"({exc.problem})") from None
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for depth, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                known = list(node) if isinstance(node, dict) else []
                hint = difflib.get_close_matches(part, known, n=1)
                where = ".".join(parts[:depth]) or "the top level"
                raise ConfigError(
                    f"unknown config key '{key}': '{part}' is not in {where}"
                    + (f" (did you mean '{hint[0]}'?)" if hint else "")
                )
            if depth == len(parts) - 1:
                if isinstance(node[part], dict) and key.strip() not in FREE_MAPPINGS:
                    # a section: its keys are updated, the others kept
                    if not isinstance(value, dict):
                        raise ConfigError(
                            f"{key}: is a section of settings; set one of its keys ("
                            f"{', '.join(f'{key}.{k}' for k in list(node[part])[:3])}, ...)")
                    _check_known(value, node[part], f"override {item!r}", f"{key}.")
                    value = merge(node[part], value, f"{key.strip()}.")
                node[part] = value
            else:
                node = node[part]
    return out


def validate(config: dict, kind: str = "train") -> dict:
    """Check every key of a complete ``config`` of ``kind`` (types, ranges, then the rules
    between keys); returns a new dict, normalised. Raises ConfigError naming the first bad key.
    """
    built = schema.build(KINDS[kind], merge(schema.defaults(kind), config))
    if kind == "train":
        schema.consistency(built)
    return dataclasses.asdict(built)


def get(config: dict, dotted: str, default: Any = None) -> Any:
    """Read ``a.b.c`` from a nested config, ``default`` where any part is missing."""
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def config_hash(section: dict) -> str:
    """Stable short hash of a config section (e.g. ``model``): identifies a model's shape."""
    blob = json.dumps(section, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def save_config(config: dict, path: Path) -> None:
    """Write a resolved config as YAML, atomically."""
    from ssageo.io import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(config, sort_keys=False))
