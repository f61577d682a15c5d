"""Limited field of view on the synthetic benchmark (issue 19): recall vs FoV for SSA and
no-SSA models, and the heading error of the BEV head on synthetic pinhole photos.

One world (CVUSA layout, seed 0, ``--places`` places, 64x64 tiles, 256x64 panoramas, a pinhole
photo per place at ``--photo-fov`` degrees). Arms, each trained from random weights for the
same ``--epochs`` (whole epochs of 16 pairs):

- ``ssa-360``:   SSA (BEV head, true priors), whole north-aligned panoramas;
- ``none-360``:  InfoNCE only, whole panoramas;
- ``ssa-rand``:  SSA, random FoV: each batch's crops ``--fov-min``..360 degrees wide
  (``data.fov_min``), at random headings (BEV label in the camera frame);
- ``none-rand``: InfoNCE only, the same random FoV and headings;
- ``ssa-90r``:   SSA, 90-degree crops at random headings (not in the default arms).

Each arm's ``checkpoints/last`` is evaluated on the val split with queries cropped to 360 /
180 / 90 / 70 degrees, centred on north and on a random heading (seeded per query). For the
arms with a BEV head, each val place's photo is mapped to its panorama band and the heading
is searched against its true tile's prior (``ssageo.evaluate.heading``): the median and mean
error in degrees, and the share within 30 degrees (chance: median 90, 1/6 within 30).

    python benchmarks/bench_fov.py --out /tmp/bench-fov --epochs 6
    python benchmarks/bench_fov.py --out /tmp/fov-smoke --places 60 --epochs 1

Times on the shared 2-core machine depend on its load: compare arms within one run only.
Writes ``OUT/results.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import ssageo  # noqa: F401  (before timm)
from ssageo.io import atomic_write_text

NO_SSA = "model.bev.enabled=false"
ARMS = {"ssa-360": ["data.fov=360", "data.heading=north"],
        "none-360": ["data.fov=360", "data.heading=north", NO_SSA],
        "ssa-rand": ["data.fov=360", "data.heading=random"],  # + data.fov_min (--fov-min)
        "none-rand": ["data.fov=360", "data.heading=random", NO_SSA],
        "ssa-90r": ["data.fov=90", "data.heading=random"]}
DEFAULT_ARMS = ("ssa-360", "none-360", "ssa-rand", "none-rand")
FOVS = (360.0, 180.0, 90.0, 70.0)


def make_world(out: Path, places: int, photo_fov: float) -> Path:
    """The benchmark's world (reused when already complete)."""
    from ssageo.synth import generate

    root = out / "world"
    generate(root, layout="cvusa", places=places, seed=0, sat_size=64, pano_size=(256, 64),
             photos=photo_fov)
    return root


def train_arm(out: Path, root: Path, name: str, epochs: int, seed: int,
              fov_min: float) -> Path:
    """Train one arm into ``OUT/<name>`` (a finished run is reused); its last checkpoint."""
    from ssageo.config import load_config
    from ssageo.train.loop import train

    run = out / name
    last = run / "checkpoints" / "last"
    if not (run / "summary.json").is_file():
        config = load_config("synth-cpu", [f"data.root={root}", f"train.epochs={epochs}",
                                           f"train.seed={seed}", "data.workers=0",
                                           "train.threads=1", *ARMS[name],
                                           *([f"data.fov_min={fov_min}"]
                                             if name.endswith("-rand") else [])])
        train(config, run, resume=run.exists())
    return last


def recalls(checkpoint: Path, root: Path) -> dict:
    """R@1 / R@5 (%) on val for each (FoV, heading) crop of the queries."""
    from ssageo.data.fov import QueryCrop
    from ssageo.data.manifest import load_manifest
    from ssageo.evaluate.embed import embed_manifest, embed_paths
    from ssageo.evaluate.metrics import rank_queries
    from ssageo.model import load_model

    model, config = load_model(checkpoint)
    manifest = load_manifest(root, split="val")
    _, reference = embed_manifest(model, manifest, config, workers=0, progress=False)
    table = {}
    for heading in ("north", "random"):
        for fov in FOVS:
            query = embed_paths(model, manifest.query_paths, config["data"]["query_size"],
                                "query", workers=0, progress=False, crop=QueryCrop(fov, heading))
            rank = rank_queries(query, reference, manifest.positive)["rank"]
            table[f"{heading} {fov:g}"] = {k: 100.0 * float(np.mean(rank < n))
                                           for k, n in (("R@1", 1), ("R@5", 5))}
    return table


def heading_errors(checkpoint: Path, root: Path) -> dict:
    """Heading search against each val photo's true tile: error statistics in degrees."""
    from ssageo.data.manifest import load_manifest
    from ssageo.data.transforms import to_tensor
    from ssageo.evaluate.heading import best_heading, heading_scores, object_probability, tile_prior
    from ssageo.evaluate.photos import photo_band
    from ssageo.io import read_image
    from ssageo.model import load_model
    from ssageo.synth.photos import read_photo_csv

    model, config = load_model(checkpoint)
    model.eval()
    norm = model.data_config()
    manifest = load_manifest(root, split="val")
    tiles = {str(q.relative_to(root)): manifest.reference_paths[int(p)]
             for q, p in zip(manifest.query_paths, manifest.positive, strict=True)}
    errors, confidences = [], []
    for photo in read_photo_csv(root / "photos" / "photos.csv"):
        tile = tiles.get(photo["panorama"])
        if tile is None:  # a training place
            continue
        band = photo_band(read_image(photo["path"]), photo["fov"], config["data"]["query_size"])
        probability = object_probability(model, to_tensor(band, norm["mean"], norm["std"]),
                                         photo["fov"])
        prior = tile_prior(tile, probability.shape[0], config["model"]["bev"]["classes"])
        found = best_heading(*heading_scores(probability, prior, photo["fov"]))
        if found is None:
            errors.append(180.0)  # counted as a miss, not left out
            continue
        errors.append(abs((found["heading"] - photo["heading"] + 180.0) % 360.0 - 180.0))
        confidences.append(found["heading_confidence"])
    errors = np.asarray(errors)
    return {"photos": len(errors), "median_deg": float(np.median(errors)),
            "mean_deg": float(errors.mean()), "within_30_pct": 100.0 * float(np.mean(errors <= 30)),
            "mean_confidence": float(np.mean(confidences)) if confidences else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--places", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--photo-fov", type=float, default=90.0)
    parser.add_argument("--fov-min", type=float, default=60.0,
                        help="data.fov_min of the -rand arms (degrees)")
    parser.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS), choices=list(ARMS))
    args = parser.parse_args()
    started = time.perf_counter()
    root = make_world(args.out, args.places, args.photo_fov)
    from ssageo.data.manifest import load_manifest

    val = load_manifest(root, split="val").num_queries
    results = {"places": args.places, "epochs": args.epochs, "seed": args.seed,
               "photo_fov": args.photo_fov, "fov_min": args.fov_min, "val_queries": val,
               "chance_R@1": 100.0 / val, "chance_R@5": 500.0 / val, "arms": {}}
    for name in args.arms:
        t0 = time.perf_counter()
        checkpoint = train_arm(args.out, root, name, args.epochs, args.seed, args.fov_min)
        arm = {"train_s": time.perf_counter() - t0, "recall": recalls(checkpoint, root)}
        if NO_SSA not in ARMS[name]:
            arm["heading"] = heading_errors(checkpoint, root)
        results["arms"][name] = arm
        print(name, json.dumps(arm), flush=True)
    results["seconds"] = time.perf_counter() - started
    atomic_write_text(args.out / "results.json", json.dumps(results, indent=2) + "\n")
    keys = list(next(iter(results["arms"].values()))["recall"])
    print(f"{val} val queries: chance R@1 {results['chance_R@1']:.1f} %, "
          f"R@5 {results['chance_R@5']:.1f} %")
    print("| arm | " + " | ".join(f"R@1 {k}" for k in keys) + " | heading median / within 30 |")
    print("|---" * (len(keys) + 2) + "|")
    for name, arm in results["arms"].items():
        cells = [f"{arm['recall'][k]['R@1']:.1f}" for k in keys]
        h = arm.get("heading")
        cells.append(f"{h['median_deg']:.0f} deg / {h['within_30_pct']:.0f} %" if h else "-")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
