"""Every config key, typed: one dataclass per section with each key's type, default and doc.

The defaults here ARE the default preset (``synth-cpu``); every preset only overrides them.

Adding a key is ONE line in its section's dataclass, e.g. in ``Data``::

    fov: float = setting(360.0, "horizontal field of view of the query (degrees)",
                         checks.real(0, 360, above=True))

``setting(default, doc, check)``: the check is inferred from the annotation for plain types
(bool, int, float, str and their ``| None`` forms); a range, a choice, a size or a list needs
its own (see ``checks``). A new section is a dataclass plus one ``section(...)`` line in its
parent. Checks that relate several keys are in ``consistency`` below. A renamed or dropped key
that saved run directories may still hold goes in ``ssageo.config.RETIRED``.

Porting a key added the old way (a ``SCHEMA`` entry plus a line in ``synth-cpu.yaml``): the
YAML line's value is the default, its comment the doc, and the SCHEMA check keeps its name
without the underscore (``_integer(1)`` -> ``checks.integer(1)``, ``_real(0, 1)`` ->
``checks.real(0, 1)``, ``_choice(...)`` -> ``checks.choice(...)``, ``_size()``,
``_boolean``, ``_device``, ``_threads``, ``_strings`` likewise); the YAML line is dropped.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from ssageo.config import checks
from ssageo.config.checks import ConfigError


def setting(default: Any, doc: str, check: checks.Check | None = None) -> Any:
    """A config key: its default, one-line doc and check (see the module docstring)."""
    meta = {"doc": doc, "check": check}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


def section(cls: type, doc: str) -> Any:
    """A nested section of settings (its own dataclass)."""
    return field(default_factory=cls, metadata={"doc": doc, "section": cls})


@dataclass
class Augment:
    flip: float = setting(0.5, "probability of a synchronised horizontal flip of both views",
                          checks.real(0, 1))
    rotate: float = setting(0.75, "probability of a satellite k*90 deg rotation + panorama roll "
                            "by -k*W/4", checks.real(0, 1))
    photometric: bool = setting(False, "colour jitter, blur/sharpen, compression, dropout per "
                                "view (off for synth worlds: benchmarks/RESULTS.md)")
    hole_size_from: str = setting("reference", "CoarseDropout holes sized from the satellite "
                                  "tile (reference, SSA) or each view's own height (view, "
                                  "Sample4Geo)", checks.choice("reference", "view"))


@dataclass
class Data:
    root: str | None = setting(None, "dataset folder (an argument: `--data FOLDER`)")
    dataset: str = setting("auto", "auto, or a registered dataset: cvusa | cvact | vigor | "
                           "university | pairs (ssageo.data.registry)", checks.dataset)
    vigor_mode: str = setting("same-area", "reading mode: VIGOR same-area | cross-area; "
                              "University-1652 drone-satellite | satellite-drone (same-area: "
                              "its default, drone-satellite)", checks.mode)
    reference_size: list[int] = setting([64, 64], "satellite tile (H, W) fed to the model",
                                        checks.size())
    query_size: list[int] = setting([64, 256], "ground panorama (H, W) fed to the model",
                                    checks.size())
    prior_size: list[int] | None = setting(None, "prior label size, the BEV logits' (8 x "
                                           "model.bev.grid_size, square, over the whole tile); "
                                           "null = the satellite tile's size",
                                           checks.size(optional=True))
    workers: int = setting(2, "data loader worker processes", checks.integer(0))
    decode: str = setting("full", "full: decode every pixel, then resize; reduced: JPEGs decode "
                          "at 1/2-1/8 scale while >= the working size (faster)",
                          checks.choice("full", "reduced"))
    fov: float = setting(360.0, "query field of view (degrees): a fov-wide crop of each "
                         "panorama at its pixels per degree; 360 = the whole panorama",
                         checks.real(0, 360, above=True))
    fov_min: float | None = setting(None, "random-FoV training: each training batch's queries "
                                    "are cropped to one FoV drawn uniformly in [fov_min, fov] "
                                    "(seeded by the batch); null = every batch at fov. "
                                    "Evaluation uses fov", checks.real(0, 360, above=True,
                                                                       optional=True))
    heading: str = setting("north", "north: the crop is centred on north | random: on a random "
                           "heading (per sample at training, seeded per query at evaluation); "
                           "the BEV head then learns the camera's frame",
                           checks.choice("north", "random"))
    augment: Augment = section(Augment, "training augmentation (both views in step)")


@dataclass
class Bev:
    enabled: bool = setting(True, "the SSA auxiliary BEV head (ground branch, training only)")
    depth_bins: int = setting(16, "D: polar radius bins (96 in the paper)", checks.integer(1))
    grid_size: int = setting(8, "N: BEV grid; its logits are 8N x 8N on the satellite tile "
                             "(paper: 48 -> 384)", checks.integer(1))
    classes: int = setting(2, "K: prior classes (2: object vs background)", checks.integer(2))
    lean: bool = setting(True, "memory-lean BEV head, same maths (benchmarks/RESULTS.md)")


@dataclass
class Model:
    backbone: str = setting("resnet18", "timm model name (from random weights a ResNet learns "
                            "in minutes where ConvNeXt barely moves)")
    pretrained: str | None = setting(None, "timm (timm's hub weights), a local weights file, "
                                     "or null/none: random weights", checks.as_is)
    shared_encoder: bool = setting(True, "one encoder for both views")
    view_norm_stats: bool = setting(True, "a shared encoder keeps BatchNorm running statistics "
                                    "per view (ssageo.model.viewnorm; LayerNorm backbones: no "
                                    "effect)")
    bev: Bev = section(Bev, "the BEV head supervised by satellite priors")


@dataclass
class Loss:
    ssa_weight: float = setting(1.0, "lambda: weight of the BEV term", checks.real(0))
    label_smoothing: float = setting(0.1, "InfoNCE label smoothing", checks.real(0, 1))
    logit_scale_init: float = setting(1 / 0.07, "initial logit scale (1/temperature)",
                                      checks.real(0, above=True))
    logit_scale_multiplier: float = setting(1.5, "fixed multiplier on the learned scale "
                                            "(1.5 in the paper)", checks.real(0, above=True))
    logit_scale_max: float = setting(100.0, "clamp of the learned scale",
                                     checks.real(0, above=True))


@dataclass
class Sampling:
    neighbour_select: int = setting(8, "neighbours co-batched with each place: half nearest, "
                                    "half random", checks.integer(0))
    neighbour_range: int = setting(32, "how much of each neighbour list is used",
                                   checks.integer(0))
    first: str = setting("gps", "before similarity_start: random | gps (GPS neighbour lists) | "
                         "similarity (of the starting model)",
                         checks.choice("random", "gps", "similarity"))
    gps_k: int = setting(128, "GPS list length (>= neighbour_range)", checks.integer(1))
    similarity: bool = setting(True, "then descriptor-similarity neighbours of the current "
                               "model")
    similarity_start: int = setting(1, "first epoch (0-based) that recomputes similarity "
                                    "neighbours", checks.integer(0))
    similarity_every: int = setting(1, "recompute them every K epochs", checks.integer(1))


@dataclass
class Train:
    out: str | None = setting(None, "run directory (an argument: `--out RUN_DIR`)")
    device: str = setting("auto", "auto | cpu | cuda | cuda:N | mps (checked at start)",
                          checks.device)
    threads: int | str = setting("auto", "CPU torch threads: auto = cores per process - "
                                 "data.workers, >= 1", checks.threads)
    seed: int = setting(0, "seed of weights, batches and augmentation", checks.integer(0))
    epochs: int = setting(4, "training epochs", checks.integer(1))
    max_steps_per_epoch: int | None = setting(None, "cut epochs short (smoke tests, "
                                              "benchmarks); null = whole epochs",
                                              checks.integer(1, optional=True))
    batch_size: int = setting(16, "the GLOBAL batch (pairs), split evenly over torchrun "
                              "processes", checks.integer(1))
    lr: float = setting(1e-3, "peak learning rate (AdamW)", checks.real(0))
    weight_decay: float = setting(0.01, "AdamW weight decay", checks.real(0))
    warmup_epochs: float = setting(1, "linear warm-up, then cosine decay; per iteration",
                                   checks.real(0))
    clip_grad_norm: float | None = setting(100.0, "gradient-norm clipping (null = off)",
                                           checks.real(0, above=True, optional=True))
    clip_grad_value: float | None = setting(None, "clipping of each gradient element to "
                                            "+-value (null = off)",
                                            checks.real(0, above=True, optional=True))
    amp: str = setting("bf16", "CUDA autocast: fp16 (with a GradScaler) | bf16 | none; CPU "
                       "trains in fp32", checks.amp)
    channels_last: bool = setting(True, "channels-last memory format")
    grad_checkpointing: bool = setting(False, "encoder activation checkpointing (less memory)")
    checkpoint_every: int = setting(50, "steps between `checkpoints/last` saves (and every "
                                    "epoch end)", checks.integer(1))
    max_nonfinite_skips: int = setting(0, "non-finite loss/gradient steps that may be skipped",
                                       checks.integer(0))
    grad_terms_every: int = setting(0, "every K steps log each loss term's gradient norm on "
                                    "the shared trunk and their cosine (0 = off)",
                                    checks.integer(0))
    sampling: Sampling = section(Sampling, "hard-negative batches (METHOD.md section 5)")


@dataclass
class Eval:
    every: int = setting(1, "validate every K epochs (on the val split, never on test)",
                         checks.integer(1))
    batch_size: int = setting(64, "images per embedding batch", checks.integer(1))


@dataclass
class Config:
    """A training config: what `train`, `model info`, `eval` and the run directory use."""

    data: Data = section(Data, "the dataset and its inputs")
    model: Model = section(Model, "the SSA model")
    loss: Loss = section(Loss, "InfoNCE + ssa_weight * BEV loss")
    train: Train = section(Train, "the training run")
    eval: Eval = section(Eval, "validation and embedding")


@dataclass
class Priors:
    detector: str | None = setting(None, "local copy of IDEA-Research/grounding-dino-base (or "
                                   "--detector PATH)")
    segmenter: str | None = setting(None, "local copy of facebook/sam-vit-huge (or "
                                    "--segmenter PATH)")
    prompts: list[str] = setting(["artificial buildings", "structures", "trees",
                                  "construction", "edifice"], "GroundingDINO text prompts",
                                 checks.strings)
    box_threshold: float = setting(0.24, "GroundingDINO box threshold", checks.real(0, 1))
    text_threshold: float = setting(0.6, "GroundingDINO text threshold", checks.real(0, 1))
    classes: dict = setting({"object": "paper"}, "class name -> fusion rule over the prompts "
                            "or a named rule (paper, reference-code)", checks.names_to_text)
    device: str = setting("auto", "auto | cpu | cuda | cuda:N", checks.device)
    batch_size: int = setting(4, "tiles per detector / SAM image-encoder call",
                              checks.integer(1))


@dataclass
class PriorsConfig:
    """A priors config (`ssageo priors --backend langsam`): a `priors` section only."""

    priors: Priors = section(Priors, "LangSAM satellite priors (METHOD.md section 3)")


KINDS: dict[str, type] = {"train": Config, "priors": PriorsConfig}
# Mappings whose keys are the user's own names (class -> fusion rule): replaced as a whole.
FREE_MAPPINGS = ("priors.classes",)


def defaults(kind: str = "train") -> dict:
    """Every key of a config kind with its default, as the nested dict the code reads."""
    return dataclasses.asdict(KINDS[kind]())


def keys(cls: type, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Dotted key -> its dataclass field, for every key and section of ``cls``."""
    out: dict[str, dataclasses.Field] = {}
    for f in dataclasses.fields(cls):
        out[prefix + f.name] = f
        if "section" in f.metadata:
            out.update(keys(f.metadata["section"], f"{prefix}{f.name}."))
    return out


def build(cls: type, values: dict, prefix: str = "") -> Any:
    """The dataclass ``cls`` from a complete nested dict, every value checked (and normalised);
    ConfigError names the first bad key."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        dotted, value = prefix + f.name, values[f.name]
        if "section" in f.metadata:
            if not isinstance(value, dict):
                raise ConfigError(f"{dotted}: is a section of settings, not {value!r}")
            kwargs[f.name] = build(f.metadata["section"], value, dotted + ".")
            continue
        check = f.metadata["check"] or checks.BY_TYPE[str(f.type)]
        try:
            kwargs[f.name] = check(value)
        except ValueError as exc:
            raise ConfigError(f"{dotted}: {exc}") from None
    return cls(**kwargs)


def consistency(config: Config) -> None:
    """Rules between keys, checked once the keys themselves are valid."""
    bev, tile = config.model.bev, config.data.reference_size
    labels = config.data.prior_size or tile
    if bev.enabled and (tile[0] != tile[1] or labels != [8 * bev.grid_size] * 2):
        # bev.py: the decoder's (B,K,8N,8N) logits lie on the satellite tile's square, at the
        # prior labels' resolution (the tile's own unless data.prior_size says otherwise)
        square = tile[0] == tile[1] and labels[0] == labels[1] and labels[0] % 8 == 0
        fits = (f"model.bev.grid_size={labels[0] // 8}" if square
                else "a square tile (and square prior labels) whose side is a multiple of 8")
        where = (f"the prior labels (data.prior_size {labels})" if config.data.prior_size
                 else f"the satellite tile pixel for pixel (data.reference_size {tile})")
        raise ConfigError(
            f"model.bev.grid_size: {bev.grid_size} gives {8 * bev.grid_size}x"
            f"{8 * bev.grid_size} BEV logits, which must cover {where}; use {fits} or "
            f"model.bev.enabled=false")
    d = config.data
    if d.fov_min is not None and d.fov_min > d.fov:
        raise ConfigError(f"data.fov_min: must be at most data.fov ({d.fov:g}), got "
                          f"{d.fov_min:g}")
    s = config.train.sampling
    if s.neighbour_select > s.neighbour_range:
        raise ConfigError(f"train.sampling.neighbour_select: must be at most "
                          f"train.sampling.neighbour_range ({s.neighbour_range}), got "
                          f"{s.neighbour_select}")
    if s.first == "gps" and s.gps_k < s.neighbour_range:
        raise ConfigError(f"train.sampling.gps_k: must be at least train.sampling."
                          f"neighbour_range ({s.neighbour_range}) with first=gps, got {s.gps_k}")
    world = os.environ.get("WORLD_SIZE", "")  # known under torchrun
    if world.isdigit() and int(world) > 1 and config.train.batch_size % int(world):
        from ssageo.train.distributed import fail_once

        fail_once(ConfigError(  # one message, from rank 0
            f"train.batch_size={config.train.batch_size} (the global batch) must be divisible "
            f"by the number of processes ({world})"))


def render(config: dict, kind: str = "train") -> str:
    """A complete ``config`` of ``kind`` as YAML (loadable as it is), each key and section
    followed by its doc as a comment."""
    lines: list[str] = []

    def walk(cls: type, values: dict, pad: str) -> None:
        for f in dataclasses.fields(cls):
            if "section" in f.metadata:
                lines.append(f"{pad}{f.name}:  # {f.metadata['doc']}")
                walk(f.metadata["section"], values[f.name], pad + "  ")
                continue
            # the value alone in flow style (lists and mappings on one line, quoted as needed)
            value = yaml.safe_dump([values[f.name]], default_flow_style=True,
                                   width=10**6).strip()[1:-1]
            lines.append(f"{pad}{f.name}: {value}  # {f.metadata['doc']}")

    walk(KINDS[kind], config, "")
    return "\n".join(lines) + "\n"
