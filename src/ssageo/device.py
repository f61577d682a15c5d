"""Which torch device a command runs on: one place that reads ``auto``/``cpu``/``cuda[:N]``/``mps``.

``check_device_name`` checks the spelling only (no torch import: config validation uses it);
``resolve_device`` checks that the device exists here and returns its torch name. Both raise
ConfigError naming the setting (``train.device``, ``--device``), so ``cuda:0`` is never
silently read as the CPU and ``tpu`` never reaches torch.
"""

from __future__ import annotations

import re

from ssageo.config import ConfigError

DEVICE_NAMES = "auto, cpu, cuda, cuda:N or mps"
_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def check_device_name(name: object, key: str = "--device") -> str:
    """``name`` when it is one of ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``."""
    if not isinstance(name, str) or not _PATTERN.fullmatch(name):
        raise ConfigError(f"{key}: unknown device {name!r}; use {DEVICE_NAMES}")
    return name


def resolve_device(name: object, key: str = "--device") -> str:
    """The torch device name for ``name``, checked against this machine.

    ``auto`` is ``cuda`` when torch sees a GPU, else ``cpu`` (never ``mps``: ask for it by
    name). ``cuda`` and ``cuda:N`` need a visible GPU (and N below the GPU count), ``mps``
    Apple's Metal backend; otherwise ConfigError naming ``key``.
    """
    import torch

    name = check_device_name(name, key)
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"{key}={name}: torch sees no CUDA GPU on this machine "
                              "(use cpu or auto)")
        count = torch.cuda.device_count()
        if ":" in name and int(name.split(":")[1]) >= count:
            raise ConfigError(f"{key}={name}: this machine has {count} CUDA GPU(s), "
                              f"cuda:0 to cuda:{count - 1}")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{key}=mps: torch's Metal (MPS) backend is not available here")
    return name
