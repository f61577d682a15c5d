"""Configuration as data: YAML presets shipped with the package, ``key=value`` overrides.

A config is a plain nested ``dict``. A preset may name another one in ``_base_`` and override
part of it. Overrides use dotted keys (``train.lr=1e-4``); values are parsed as YAML, so
``model.bev.enabled=false`` gives a bool and ``data.query_size=[64,256]`` a list. An override
of a key the config does not have is an error, so typos never pass silently.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says which and why."""


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


def merge(base: dict, update: dict) -> dict:
    """Recursively merge ``update`` into a copy of ``base``."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_config(source: str | Path = "synth-cpu", overrides: Iterable[str] = ()) -> dict:
    """Load a preset name or YAML path (following ``_base_``), then apply overrides."""
    return apply_overrides(_resolve(source, set()), overrides)


def _resolve(source: str | Path, seen: set[str]) -> dict:
    if str(source) in seen:
        raise ConfigError(f"'_base_' chain loops at {source}")
    data, _ = _read_yaml(source)
    base = data.pop("_base_", None)
    return data if base is None else merge(_resolve(base, seen | {str(source)}), data)


def apply_overrides(config: dict, overrides: Iterable[str]) -> dict:
    """Return a copy of ``config`` with dotted ``key=value`` overrides applied."""
    out = copy.deepcopy(config)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
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
                node[part] = value
            else:
                node = node[part]
    return out


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
