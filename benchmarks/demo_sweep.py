"""Experiments for the demo's training regime (issue 18): what reaches R@1 >= 25 % on the demo
world's held-out places within the demo's compute budget?

Three subcommands, all on 1 torch thread (set ``OMP_NUM_THREADS=1``) so that runs can be
compared by steps and by single-thread step time, not by the wall time of a shared machine:

- ``world OUT [--places 1000] [--seed 0]``: the demo's world (CVUSA layout, 128 px tiles,
  512x128 panoramas) with the demo's VFM-like oracle priors, made by the demo's own code;
- ``steptime --backbones a,b+bev,c@128,d@128x64 [--threads T] [override ...]``: median step
  time (one thread unless ``--threads``) of each backbone (``+bev``: with the BEV head;
  ``@128``: 128x512 panoramas and 128 px tiles, ``@128x64``: 64 px tiles, with the BEV grid
  that covers the tile pixel for pixel; see ``variant_overrides``; without ``@``: the demo's
  sizes, its ``REGIME`` on the preset's), interleaved step by step in one process (fair on a
  busy machine); prints one line per backbone with its ratio to the first;
- ``train --steps N WORLD RUN [override ...]``: ``ssageo.train.train`` with the demo's
  overrides plus the given ones for N steps, then R@1/5/10 of ``checkpoints/last`` on the val
  split; appends one JSON line (overrides, steps, metrics, mean step time) to
  ``RUN/../sweep.jsonl``.

    OMP_NUM_THREADS=1 python benchmarks/demo_sweep.py world /tmp/dw
    OMP_NUM_THREADS=1 python benchmarks/demo_sweep.py steptime --backbones resnet18,resnet10t
    OMP_NUM_THREADS=1 python benchmarks/demo_sweep.py train --steps 300 /tmp/dw /tmp/sweep/r18 \
        model.bev.enabled=false
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import ssageo  # noqa: F401  (before timm)


def make_world(out: Path, places: int, seed: int) -> None:
    """The demo's world and priors, by the demo's own stages."""
    from ssageo.demo import PANO_SIZE, SAT_SIZE, VFM_LIKE
    from ssageo.priors.oracle import Corruption, OracleBackend
    from ssageo.priors.run import list_tiles, run_priors
    from ssageo.synth import generate

    generate(out, layout="cvusa", places=places, seed=seed, sat_size=SAT_SIZE,
             pano_size=PANO_SIZE, progress=True)
    result = run_priors(list_tiles(out), OracleBackend(out, Corruption(**VFM_LIKE), seed=seed),
                        force=True)
    print(f"priors mIoU {result.statistics['miou']:.3f}")


def variant_overrides(spec: str) -> tuple[bool, list[str]]:
    """``name[@Q[xT]][+bev]`` -> (BEV head on, overrides): backbone ``name``; ``@Q``: Q x 4Q
    panoramas and Q x Q tiles, ``@QxT``: T x T tiles instead, with the BEV grid that covers the
    tile pixel for pixel (T / 8; labels at T px); without ``@``, the demo's sizes."""
    bev = spec.endswith("+bev")
    name, _, size = spec.removesuffix("+bev").partition("@")
    out = [f"model.backbone={name}"]
    if size:
        q, _, t = size.partition("x")
        tile = int(t or q)
        out += [f"data.reference_size=[{tile},{tile}]", f"data.query_size=[{q},{4 * int(q)}]",
                f"model.bev.grid_size={tile // 8}", f"data.prior_size=[{tile},{tile}]"]
    return bev, out


def step_times(backbones: list[str], overrides: list[str], steps: int,
               threads: int) -> dict[str, float]:
    """Median step time per backbone on ``threads`` torch threads, interleaved step by step
    (``ssageo.demo.plan.step_seconds``, as the demo's plan measures); a name ending in ``+bev``
    is that backbone with the BEV head (the SSA model), otherwise without it; ``@S`` sets its
    input size (``variant_overrides``)."""
    from ssageo.demo.plan import demo_config, step_seconds

    configs = {}
    for b in backbones:
        bev, own = variant_overrides(b)
        configs[b] = demo_config(Path("."), 0, bev, [*own, *overrides, f"train.threads={threads}"])
    return step_seconds(configs, rounds=steps)


def train_and_evaluate(world: Path, run: Path, steps: int, overrides: list[str]) -> dict:
    """Train ``steps`` steps with the demo's config + ``overrides``; val metrics of the last."""
    from ssageo.data import load_manifest
    from ssageo.demo import demo_config
    from ssageo.evaluate.embed import evaluate_model
    from ssageo.model import load_model
    from ssageo.train import train

    bev = "model.bev.enabled=false" not in overrides
    base = demo_config(world, 0, bev, overrides)
    n_train = len(load_manifest(world, split="train").positive)
    per_epoch = n_train // int(base["train"]["batch_size"])
    epochs = max(1, -(-steps // per_epoch))
    config = demo_config(world, 0, bev, [*overrides, f"train.epochs={epochs}",
                                         f"train.max_steps_per_epoch={-(-steps // epochs)}",
                                         f"eval.every={epochs}", "train.checkpoint_every=100000"])
    started = time.perf_counter()
    summary = train(config, run)
    wall = time.perf_counter() - started
    model, config = load_model(summary["last_checkpoint"])
    metrics = evaluate_model(model.eval(), load_manifest(world, split="val"), config)
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    step_s = [config["train"]["batch_size"] / r["pairs_per_s"] for r in log
              if r["kind"] == "step"]
    record = {"run": run.name, "overrides": overrides, "steps": summary["steps"],
              "epochs": epochs, "wall_s": round(wall, 1),
              "mean_step_s": round(sum(step_s) / len(step_s), 3),
              **{k: metrics[k] for k in ("R@1", "R@5", "R@10", "R@1%")}}
    with open(run.parent / "sweep.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record))
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("world")
    w.add_argument("out", type=Path)
    w.add_argument("--places", type=int, default=1000)
    w.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("steptime")
    s.add_argument("--backbones", required=True)
    s.add_argument("--steps", type=int, default=5)
    s.add_argument("--threads", type=int, default=1, help="torch threads (the demo: 2)")
    s.add_argument("overrides", nargs="*")
    t = sub.add_parser("train")
    t.add_argument("world", type=Path)
    t.add_argument("run", type=Path)
    t.add_argument("--steps", type=int, required=True)
    t.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(args.threads if args.command == "steptime" else 1)
    if args.command == "world":
        make_world(args.out, args.places, args.seed)
    elif args.command == "steptime":
        names = args.backbones.split(",")
        times = step_times(names, args.overrides, args.steps, args.threads)
        for b, v in times.items():
            print(f"{b}: {v:.3f} s/step ({v / times[names[0]]:.2f}x {names[0]})")
    else:
        train_and_evaluate(args.world, args.run, args.steps, args.overrides)


if __name__ == "__main__":
    main()
