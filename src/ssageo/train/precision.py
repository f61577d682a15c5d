"""Mixed precision for training (``train.amp``): autocast dtype, GradScaler and the update step.

On CUDA, ``fp16`` is the reference's setting (autocast to float16, the loss scaled by a
GradScaler, gradients unscaled before clipping, steps with overflowed gradients skipped and the
scale lowered); ``bf16`` autocasts to bfloat16, whose range needs no scaler; ``none`` trains in
fp32. On CPU training is always fp32 whatever ``train.amp`` says: the reference has no CPU
mixed precision, and many CPU kernels have no fast (or no) float16 path.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

from ssageo.config import ConfigError

AMP_MODES = ("fp16", "bf16", "none")
# The reference's GradScaler(init_scale=2.**10) (SSA train_cvusa.py / train_cvact.py and
# Sample4Geo); the scale then adapts on its own (halved at an overflow, doubled after 2000
# clean steps).
INIT_SCALE = 2.0**10


def amp_mode(value: object) -> str:
    """``train.amp`` checked: fp16 | bf16 | none (YAML ``null``/``false`` read as none; ``true``,
    its meaning before fp16 existed, as bf16)."""
    if value is None or value is False:
        return "none"
    if value is True:
        return "bf16"
    if value not in AMP_MODES:
        raise ConfigError(f"train.amp must be one of {', '.join(AMP_MODES)}, got {value!r}")
    return str(value)


def autocast_dtype(value: object, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.amp`` on ``device``; None means fp32 (always on CPU)."""
    mode = amp_mode(value)
    if device.type != "cuda" or mode == "none":
        return None
    return torch.float16 if mode == "fp16" else torch.bfloat16


def make_scaler(dtype: torch.dtype | None, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler, enabled only for float16 autocast (a disabled one passes everything
    through, so the training step is the same code in every mode)."""
    return torch.amp.GradScaler(device.type, init_scale=INIT_SCALE,
                                enabled=dtype is torch.float16)


def backward(loss: torch.Tensor, params: Iterable[torch.Tensor],
             optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
             clip: float | None, clip_value: float | None = None) -> torch.Tensor:
    """Backpropagate ``loss`` (scaled), unscale the gradients, clip their global norm to
    ``clip`` and each element to +-``clip_value`` (None: no such clipping; SSA clips the norm,
    Sample4Geo the values). Returns the unscaled total gradient norm before clipping (inf/nan
    when a float16 gradient overflowed)."""
    params = list(params)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)  # clip (and report) the true gradients, not the scaled ones
    norm = torch.nn.utils.clip_grad_norm_(params, clip or float("inf"))
    if clip_value is not None:
        torch.nn.utils.clip_grad_value_(params, clip_value)
    return norm


def term_gradients(terms: Mapping[str, torch.Tensor], params: Sequence[torch.Tensor],
                   scaler: torch.amp.GradScaler) -> dict[str, float]:
    """Each loss term's own gradient on the weights of ``params`` that every term reaches (for
    SSA the query encoder's trunk, which the BEV head reads; the retrieval head after it only
    gets InfoNCE's): its norm as ``grad_<term>`` and, for each term after the first, its cosine
    with the first term's gradient as ``grad_cos_<term>`` (below 0: the terms pull the shared
    weights opposite ways). ``train.grad_terms_every`` logs these.

    Terms are as the objective adds them (already weighted); a term without a graph (0, e.g.
    the BEV term with the head off) is left out. The graph is kept, so call this before the
    step's own backward, which it leaves unchanged: no ``.grad`` is touched."""
    params = [p for p in params if p.requires_grad]
    grads = {name: torch.autograd.grad(scaler.scale(term), params, retain_graph=True,
                                       allow_unused=True)
             for name, term in terms.items() if term.requires_grad}
    shared = [i for i in range(len(params)) if all(g[i] is not None for g in grads.values())]
    scale = scaler.get_scale() if scaler.is_enabled() else 1.0
    flat = {name: torch.cat([g[i].reshape(-1).float() for i in shared]) / scale
            for name, g in grads.items() if shared}
    out = {f"grad_{name}": float(vec.norm()) for name, vec in flat.items()}
    names = list(flat)
    for name in names[1:]:
        out[f"grad_cos_{name}"] = float(torch.nn.functional.cosine_similarity(
            flat[names[0]], flat[name], dim=0))
    return out


def step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, apply: bool) -> None:
    """Apply the update when ``apply`` (the scaler itself skips it after a float16 overflow),
    then let the scaler adapt its scale; it must see every step, applied or not."""
    if apply:
        scaler.step(optimizer)
    if scaler.is_enabled():
        scaler.update()
