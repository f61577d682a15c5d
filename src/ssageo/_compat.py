"""Make ``import torchvision`` (and so ``import timm``) work beside a CPU-only torch.

PyPI's torchvision 0.28.0 wheel is a CUDA build: next to the CPU torch 2.13.0 wheel its native
library fails to load, and its import then dies registering fake kernels for the missing
``torchvision::nms`` / ``torchvision::qnms`` operators. Where that happens we define those two
operators ourselves, with a plain-torch CPU implementation, before torchvision is imported.
Where the native library loads, this module does nothing.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

_LIBRARY: torch.library.Library | None = None  # kept alive: dropping it unregisters the ops


def _native_ops_load() -> bool:
    """True when torchvision's compiled ops are (or can be) registered with torch."""
    if hasattr(torch.ops, "torchvision") and _has_op("nms"):
        return True
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return True  # no torchvision at all: nothing to fix
    for lib in sorted(Path(spec.origin).parent.glob("_C*.so")):
        try:
            torch.ops.load_library(str(lib))
        except (OSError, RuntimeError):
            return False
        return _has_op("nms")
    return False


def _has_op(name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def nms_cpu(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression: indices of kept boxes, highest score first."""
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    x1, y1, x2, y2 = boxes.unbind(1)
    areas = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    order = scores.argsort(descending=True)
    suppressed = torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    keep = []
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        w = (torch.minimum(x2[i], x2) - torch.maximum(x1[i], x1)).clamp(min=0)
        h = (torch.minimum(y2[i], y2) - torch.maximum(y1[i], y1)).clamp(min=0)
        inter = w * h
        iou = inter / (areas[i] + areas - inter).clamp(min=torch.finfo(boxes.dtype).tiny)
        suppressed |= iou > iou_threshold
    return torch.tensor(keep, dtype=torch.long, device=boxes.device)


def _qnms_cpu(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    return nms_cpu(boxes.dequantize(), scores.dequantize(), iou_threshold)


def ensure_torchvision_ops() -> bool:
    """Register CPU fallbacks for torchvision's NMS ops if its native library cannot load.

    Must run before the first ``import torchvision``. Returns True when fallbacks were installed.
    """
    global _LIBRARY
    if _LIBRARY is not None or "torchvision" in sys.modules or _native_ops_load():
        return False
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.impl("nms", nms_cpu, "CPU")
    lib.impl("qnms", _qnms_cpu, "QuantizedCPU")
    _LIBRARY = lib
    return True


ensure_torchvision_ops()
