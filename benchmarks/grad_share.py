"""Where on the shared trunk does the BEV loss push, and how hard, next to InfoNCE?

For each trained run (a run directory with ``checkpoints/last``), on a few training batches:
each loss term's own gradient on the query encoder's weights, per part of the encoder (timm's
top-level modules: stem, stages), as

- ``|g_bev| / |g_infonce|``: the ratio of the two terms' gradient norms (terms as weighted in
  the objective), and their cosine;
- ``Adam-scaled``: the same ratio after dividing each element by AdamW's step size for it
  (``sqrt(v_hat) + eps`` from the checkpoint's second moment), i.e. the share each term has
  in the update AdamW makes: an element InfoNCE barely moves gives BEV's gradient there a large
  step even when its raw norm is small.

Parts only InfoNCE reaches (the stages after the trunk, which feed the retrieval head) show
``-``. The run is read from a copy (resuming a run rewrites its log), nothing in it changes.

    python benchmarks/grad_share.py /tmp/abl-4xc/runs/e36/cross-area/vfm/seed0 --batches 8
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import default_collate

import ssageo  # noqa: F401  (before timm)
from ssageo.data.transforms import to_device_normalised
from ssageo.model.losses import ssa_loss


def part_of(name: str) -> str:
    """The encoder part a parameter belongs to: timm's top-level module (``layer2``,
    ``stages``'s index ``stages.1``), else ``other``."""
    parts = name.split(".")
    if "backbone" not in parts:
        return "other"
    rest = parts[parts.index("backbone") + 1:]
    if rest[0] in ("stages", "blocks", "features") and len(rest) > 1 and rest[1].isdigit():
        return ".".join(rest[:2])
    return rest[0]


def shares(run: Path, batches: int, seed: int) -> tuple[dict, int]:
    """Per encoder part: squared norms, dot product and Adam-scaled squared norms of the two
    terms' gradients, summed over ``batches`` batches; and the checkpoint's step."""
    from ssageo.train.rundir import open_run_dir, read_config
    from ssageo.train.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "run"
        shutil.copytree(run, copy, ignore=shutil.ignore_patterns("debug-*", ".lock"))
        config = read_config(copy)  # old runs' configs get the keys added since
        with open_run_dir(copy, resume=True):
            trainer = Trainer(config, copy, resume=True)
            trainer.setup()
            trainer.restore()
    model, t = trainer.model, trainer.settings
    model.train()
    encoder = dict(model.encoder("query").named_parameters())
    beta2, eps = trainer.optimizer.defaults["betas"][1], trainer.optimizer.defaults["eps"]
    scale = {}
    for name, p in encoder.items():
        state = trainer.optimizer.state.get(p, {})
        if "exp_avg_sq" in state:
            v_hat = state["exp_avg_sq"] / (1 - beta2 ** float(state["step"]))
            scale[name] = v_hat.sqrt() + eps
    rng = np.random.default_rng(seed)
    sums: dict = defaultdict(lambda: defaultdict(float))
    fmt = torch.channels_last if t["channels_last"] else torch.contiguous_format
    for _ in range(batches):
        picks = rng.choice(len(trainer.dataset), t["batch_size"], replace=False)
        batch = default_collate([trainer.dataset[int(i)] for i in picks])
        batch = to_device_normalised(batch, trainer.dist.device, trainer.norm["mean"],
                                     trainer.norm["std"], fmt)
        outputs = model(batch["query"], batch["reference"])
        losses = ssa_loss(outputs, batch.get("prior"), config["loss"])
        if not losses["bev"].requires_grad:
            raise SystemExit(f"{run}: this run has no BEV term (model.bev.enabled false)")
        names = list(encoder)
        grads = {term: torch.autograd.grad(losses[term], [encoder[n] for n in names],
                                           retain_graph=True, allow_unused=True)
                 for term in ("infonce", "bev")}
        for i, name in enumerate(names):
            a, b = grads["infonce"][i], grads["bev"][i]
            s = sums[part_of(name)]
            if a is not None:
                s["ii"] += float((a * a).sum())
            if a is None or b is None:
                continue
            s["bb"] += float((b * b).sum())
            s["ib"] += float((a * b).sum())
            if name in scale:
                sa, sb = a / scale[name], b / scale[name]
                s["aii"] += float((sa * sa).sum())
                s["abb"] += float((sb * sb).sum())
    return sums, trainer.state.step


def table(sums: dict) -> list[str]:
    """Markdown rows: one per encoder part, then the whole trunk (parts both terms reach)."""
    rows = ["| encoder part | abs(g_infonce) | abs(g_bev) / abs(g_infonce) | cosine | "
            "Adam-scaled ratio |", "|---|---|---|---|---|"]
    trunk: dict = defaultdict(float)
    for part, s in list(sums.items()) + [("**trunk (both reach)**", None)]:
        if s is None:
            s = trunk
        elif s["bb"] > 0:
            for key in ("ii", "bb", "ib", "aii", "abb"):
                trunk[key] += s[key]
        if s["bb"] == 0:
            rows.append(f"| {part} | {s['ii'] ** 0.5:.3g} | - | - | - |")
            continue
        ratio = (s["bb"] / s["ii"]) ** 0.5
        cosine = s["ib"] / (s["ii"] * s["bb"]) ** 0.5
        adam = (s["abb"] / s["aii"]) ** 0.5 if s["aii"] else float("nan")
        rows.append(f"| {part} | {s['ii'] ** 0.5:.3g} | {ratio:.3f} | {cosine:+.3f} | "
                    f"{adam:.3f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", help="run directories")
    parser.add_argument("--batches", type=int, default=8, help="training batches to average")
    parser.add_argument("--seed", type=int, default=0, help="which batches")
    args = parser.parse_args()
    for run in args.runs:
        sums, step = shares(run, args.batches, args.seed)
        print(f"\n{run} (checkpoints/last, step {step}; {args.batches} batches; norms summed "
              "over them)\n")
        print("\n".join(table(sums)))


if __name__ == "__main__":
    main()
