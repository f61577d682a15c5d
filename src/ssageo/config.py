"""Configuration as data: YAML presets shipped with the package, ``key=value`` overrides.

A config is a plain nested ``dict``. A preset may name another one in ``_base_`` and override
part of it. Overrides use dotted keys (``train.lr=1e-4``); values are parsed as YAML, so
``model.bev.enabled=false`` gives a bool and ``data.query_size=[64,256]`` a list. An override
of a key the config does not have is an error, so typos never pass silently; so is a key in a
YAML file that its ``_base_`` does not have. Every value named in ``SCHEMA`` is checked (and
normalised: ``8.0`` -> ``8``, ``"1e-4"`` -> ``0.0001``) once, when the config is built, so a bad
value fails at start with its key named, not after an epoch.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import math
from collections.abc import Callable, Iterable
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


def load_config(source: str | Path = "synth-cpu", overrides: Iterable[str] = ()) -> dict:
    """Load a preset name or YAML path (following ``_base_``), apply overrides, validate."""
    return validate(apply_overrides(_resolve(source, set()), overrides))


def _resolve(source: str | Path, seen: set[str]) -> dict:
    if str(source) in seen:
        raise ConfigError(f"'_base_' chain loops at {source}")
    data, origin = _read_yaml(source)
    base = data.pop("_base_", None)
    if base is None:
        return data
    resolved = _resolve(base, seen | {str(source)})
    _check_known(data, resolved, origin, "")
    return merge(resolved, data)


# Mappings whose keys are the user's own names (class -> fusion rule): replaced as a whole.
FREE_MAPPINGS = ("priors.classes",)


def _check_known(data: dict, base: dict, origin: str, prefix: str) -> None:
    """Every key of ``data`` must exist in its ``_base_`` (a new top-level section may be added:
    ``priors`` is one). A misspelt key in a YAML file would otherwise be ignored."""
    for key, value in data.items():
        if key not in base:
            if not prefix:
                continue
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


# --- Validation: a small schema of dotted key -> check. A check takes the value and returns it
# normalised, or raises ValueError saying what is wrong; ``validate`` adds the key. Keys absent
# from a config are not checked (a YAML file may hold only a ``priors`` section).


def _integer(low: int | None = None, optional: bool = False) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if value is None and optional:
            return None
        number = _number(value)
        if not (isinstance(number, int) or number.is_integer()):
            raise ValueError(f"must be a whole number, got {value!r}")
        if low is not None and number < low:
            raise ValueError(f"must be at least {low}, got {value!r}")
        return int(number)

    return check


def _real(low: float | None = None, high: float | None = None, above: bool = False,
          optional: bool = False) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if value is None and optional:
            return None
        number = float(_number(value))
        if low is not None and (number <= low if above else number < low):
            raise ValueError(f"must be {'above' if above else 'at least'} {low:g}, got {value!r}")
        if high is not None and number > high:
            raise ValueError(f"must be at most {high:g}, got {value!r}")
        return number

    return check


def _number(value: Any) -> int | float:
    """A finite int or float; YAML reads ``1e-4`` (no dot) as a string, so numeric strings
    are taken too. Booleans are not numbers here."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {value!r}")
    return value


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {value!r}")
    return value


def _choice(*names: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in names:
            raise ValueError(f"must be one of {', '.join(names)}, got {value!r}")
        return value

    return check


def _size(optional: bool = False) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if value is None and optional:
            return None
        if not isinstance(value, list | tuple) or len(value) != 2:
            raise ValueError(f"must be two positive whole numbers [H, W], got {value!r}")
        try:
            return [_integer(1)(v) for v in value]
        except ValueError:
            raise ValueError(
                f"must be two positive whole numbers [H, W], got {value!r}") from None

    return check


def _device(value: Any) -> str:
    from ssageo.device import DEVICE_NAMES, check_device_name

    try:
        return check_device_name(value)
    except ConfigError:
        raise ValueError(f"unknown device {value!r}; use {DEVICE_NAMES}") from None


def _threads(value: Any) -> Any:
    return value if value == "auto" else _integer(1)(value)


def _strings(value: Any) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ValueError(f"must be a non-empty list of text, got {value!r}")
    return value


SCHEMA: dict[str, Callable[[Any], Any]] = {
    "data.dataset": _choice("auto", "cvusa", "cvact", "vigor"),
    "data.vigor_mode": _choice("same-area", "cross-area"),
    "data.reference_size": _size(),
    "data.query_size": _size(),
    "data.prior_size": _size(optional=True),
    "data.workers": _integer(0),
    "data.decode": _choice("full", "reduced"),
    "data.fov": _real(0, 360, above=True),
    "data.heading": _choice("north", "random"),
    "data.augment.flip": _real(0, 1),
    "data.augment.rotate": _real(0, 1),
    "data.augment.photometric": _boolean,
    "model.shared_encoder": _boolean,
    "model.bev.enabled": _boolean,
    "model.bev.depth_bins": _integer(1),
    "model.bev.grid_size": _integer(1),
    "model.bev.classes": _integer(2),
    "model.bev.lean": _boolean,
    "loss.ssa_weight": _real(0),
    "loss.label_smoothing": _real(0, 1),
    "loss.logit_scale_init": _real(0, above=True),
    "loss.logit_scale_multiplier": _real(0, above=True),
    "loss.logit_scale_max": _real(0, above=True),
    "train.device": _device,
    "train.threads": _threads,
    "train.seed": _integer(0),
    "train.epochs": _integer(1),
    "train.max_steps_per_epoch": _integer(1, optional=True),
    "train.batch_size": _integer(1),
    "train.lr": _real(0),
    "train.weight_decay": _real(0),
    "train.warmup_epochs": _real(0),
    "train.clip_grad_norm": _real(0, above=True, optional=True),
    "train.clip_grad_value": _real(0, above=True, optional=True),
    "train.channels_last": _boolean,
    "train.grad_checkpointing": _boolean,
    "train.checkpoint_every": _integer(1),
    "train.max_nonfinite_skips": _integer(0),
    "train.sampling.neighbour_select": _integer(0),
    "train.sampling.neighbour_range": _integer(0),
    "train.sampling.gps_k": _integer(1),
    "train.sampling.similarity": _boolean,
    "train.sampling.similarity_start": _integer(0),
    "train.sampling.similarity_every": _integer(1),
    "eval.every": _integer(1),
    "eval.batch_size": _integer(1),
    "priors.prompts": _strings,
    "priors.box_threshold": _real(0, 1),
    "priors.text_threshold": _real(0, 1),
    "priors.device": _device,
    "priors.batch_size": _integer(1),
}


def validate(config: dict) -> dict:
    """Check (and normalise, in place) every ``SCHEMA`` key present in ``config``; returns it.

    Raises ConfigError naming the first bad key and what is wrong with its value.
    """
    for dotted, check in SCHEMA.items():
        *parents, leaf = dotted.split(".")
        node = get(config, ".".join(parents)) if parents else config
        if not isinstance(node, dict) or leaf not in node:
            continue
        try:
            node[leaf] = check(node[leaf])
        except ValueError as exc:
            raise ConfigError(f"{dotted}: {exc}") from None
    return config


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
