"""Value checks of config keys, and the error every config problem raises.

A check takes a value and returns it normalised (``8.0`` -> ``8``, ``"1e-4"`` -> ``0.0001``)
or raises ValueError saying what is wrong; the schema adds the key to the message.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

Check = Callable[[Any], Any]


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says which and why."""


def integer(low: int | None = None, optional: bool = False) -> Check:
    """A whole number (``8.0`` taken as 8), at least ``low``; None allowed when ``optional``."""
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


def real(low: float | None = None, high: float | None = None, above: bool = False,
         optional: bool = False) -> Check:
    """A finite number in [low, high] (``above``: strictly above ``low``)."""
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


def boolean(value: Any) -> bool:
    """true or false (YAML's), nothing else."""
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {value!r}")
    return value


def text(optional: bool = False) -> Check:
    """A string (a name, a path); None allowed when ``optional``."""
    def check(value: Any) -> Any:
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value:
            raise ValueError(f"must be {'text or null' if optional else 'text'}, got {value!r}")
        return value

    return check


def choice(*names: str) -> Check:
    """One of ``names``."""
    def check(value: Any) -> str:
        if value not in names:
            raise ValueError(f"must be one of {', '.join(names)}, got {value!r}")
        return value

    return check


def dataset(value: Any) -> str:
    """``auto`` or a dataset registered in :mod:`ssageo.data.registry` (imported when a config
    is checked: the registry imports the readers)."""
    from ssageo.data.registry import dataset_names

    return choice("auto", *dataset_names())(value)


def mode(value: Any) -> str:
    """A reading mode of any registered dataset (:func:`ssageo.data.registry.reading_modes`)."""
    from ssageo.data.registry import reading_modes

    return choice(*reading_modes())(value)


def size(optional: bool = False) -> Check:
    """[H, W]: two positive whole numbers."""
    def check(value: Any) -> Any:
        if value is None and optional:
            return None
        if not isinstance(value, list | tuple) or len(value) != 2:
            raise ValueError(f"must be two positive whole numbers [H, W], got {value!r}")
        try:
            return [integer(1)(v) for v in value]
        except ValueError:
            raise ValueError(
                f"must be two positive whole numbers [H, W], got {value!r}") from None

    return check


def device(value: Any) -> str:
    """auto | cpu | cuda | cuda:N | mps (the spelling only; whether it exists is checked at
    start by ``ssageo.device.resolve_device``)."""
    from ssageo.device import DEVICE_NAMES, check_device_name

    try:
        return check_device_name(value)
    except ConfigError:
        raise ValueError(f"unknown device {value!r}; use {DEVICE_NAMES}") from None


def threads(value: Any) -> Any:
    """``auto`` or a whole number >= 1."""
    return value if value == "auto" else integer(1)(value)


def amp(value: Any) -> str:
    """fp16 | bf16 | none; a run config from before fp16 existed says true (bf16) or false."""
    if value is None or value is False:
        return "none"
    if value is True:
        return "bf16"
    return choice("fp16", "bf16", "none")(value)


def as_is(value: Any) -> Any:
    """Any value, checked where it is used, which names the key (``model.pretrained``: `model
    info` shows a setting training would refuse, and goes on)."""
    return value


def strings(value: Any) -> list[str]:
    """A non-empty list of text."""
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ValueError(f"must be a non-empty list of text, got {value!r}")
    return value


def names_to_text(value: Any) -> dict:
    """A non-empty mapping of the user's own names to text (class name -> fusion rule)."""
    if (not isinstance(value, dict) or not value
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())):
        raise ValueError(f"must be a mapping of names to text (e.g. {{object: paper}}), "
                         f"got {value!r}")
    return value


# What a key's type annotation alone implies (a range or a choice needs its own check).
BY_TYPE: dict[str, Check] = {
    "bool": boolean, "int": integer(), "float": real(), "str": text(),
    "int | None": integer(optional=True), "float | None": real(optional=True),
    "str | None": text(optional=True),
}
