"""Peak live tensor memory of real computation on the CPU: what a GPU's
``torch.cuda.max_memory_allocated`` reports, without the caching allocator's rounding.

    with LiveTensors() as live:
        ...                          # the work measured
    live.peak                        # bytes of tensor storages created inside and alive at once
    live.at_peak                     # [(bytes, creating operator)] of those, largest first
    live.where                       # the package's innermost frames at that moment

Every aten operator's outputs are seen (a TorchDispatchMode, on the thread that runs the work:
on the CPU the backward pass runs there too). A storage counts from the operator that created
it until it is freed; views, in-place and ``out=`` results (storage shared with an input) are
not new. Storages made before the block (weights, inputs) are not counted; gradients made
inside are. Kernels' private work buffers (oneDNN scratchpads) are not seen, as cuDNN's
workspaces are not in a GPU's tensor figure either.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary


class LiveTensors(TorchDispatchMode):
    """Tracks the bytes of live tensor storages created while active (see the module doc)."""

    def __init__(self, top: int = 12) -> None:
        super().__init__()
        self.live = WeakIdKeyDictionary()  # storage -> (bytes, operator); gone when freed
        self.peak, self.at_peak, self.top = 0, [], top
        self.where: list[str] = []  # the innermost ssageo frames at the peak

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage.data_ptr() not in inputs and storage not in self.live:
                    self.live[storage] = (storage.nbytes(), str(func.overloadpacket.__name__))
        now = sum(size for size, _ in self.live.values())
        if now > self.peak:
            self.peak = now
            self.at_peak = sorted(self.live.values(), reverse=True)[: self.top]
            self.where = [f"{Path(f.filename).name}:{f.lineno} {f.name}"
                          for f in traceback.extract_stack() if "ssageo" in f.filename][-4:]
        return out
