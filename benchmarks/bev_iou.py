"""Does the SSA BEV head learn the layout? Its prediction from each held-out panorama, scored
against the tile's true layout and against what it could get without looking.

For each SSA run (a world made by ``ssageo synth``, so the truth maps exist): the head's
``P(object) > 0.5`` on every val panorama (``checkpoints/last``, as the demo reports), at the
head's logit size, against

- ``truth``     the tile's true object layout (building + tree, the oracle's classes);
- ``prior``     the prior label the head was trained on (corrupted oracle: a VFM's errors);
- ``shuffled``  the truth of another val place (the prediction paired with the wrong tile);
- ``rot90`` / ``rot180`` / ``rot270``  the truth rotated (the head's frame must be north up);
- ``empty``     predicting no object anywhere (the majority class);

and the prior itself against the truth (the labels' own quality). Object IoU and mean IoU of
the two classes, pooled over pixels.

    python benchmarks/bev_iou.py /tmp/ssageo-demo/runs/ssa [RUN ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import ssageo  # noqa: F401  (before timm)


def scores(pairs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[float, float]:
    """(object IoU, mean IoU of object and background) of boolean (truth, predicted) maps,
    pooled over all pixels of all pairs."""
    from ssageo.priors.oracle import confusion, mean_iou

    matrix = sum(confusion(t, p, 2) for t, p in pairs)
    tp = matrix[1, 1]
    return float(tp / max(1, matrix[1].sum() + matrix[:, 1].sum() - tp)), mean_iou(matrix)


def layouts(run_dir: Path, batch: int = 50) -> dict[str, np.ndarray]:
    """Boolean (N, S, S) maps of the val places: ``predicted``, ``truth`` and ``prior``."""
    from ssageo.data import load_manifest
    from ssageo.data.paths import truth_label_path
    from ssageo.data.transforms import label_to_classes, resize_label
    from ssageo.io import read_image
    from ssageo.priors.oracle import DEFAULT_CLASSES, world_class_names
    from ssageo.report.analysis import bev_probabilities, load_run

    run = load_run(run_dir, "last")
    root = Path(run.config["data"]["root"])
    manifest = load_manifest(root, split="val")
    names = world_class_names(root)
    objects = [names.index(n) for n in DEFAULT_CLASSES["object"]]
    queries = manifest.query_paths
    probs = np.concatenate([bev_probabilities(run, queries[i:i + batch])
                            for i in range(0, len(queries), batch)])
    size = probs.shape[1:]

    def resized(mask: np.ndarray) -> np.ndarray:
        return resize_label(mask.astype(np.uint8), size) > 0

    truth, prior = [], []
    for i in range(len(queries)):
        tile = manifest.reference_paths[manifest.positive[i]]
        rel = tile.relative_to(root).as_posix()
        truth.append(resized(np.isin(read_image(root / truth_label_path(rel), mode="L"),
                                     objects)))
        label = manifest.prior_paths[manifest.positive[i]]
        prior.append(resized(label_to_classes(read_image(label, mode="L"), source=str(label),
                                              dtype=np.uint8) == 1))
    return {"predicted": probs > 0.5, "truth": np.stack(truth), "prior": np.stack(prior)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="SSA run directories")
    args = parser.parse_args()
    print("| run | places | pairing | object IoU | mIoU | object share |")
    print("|---|---|---|---|---|---|")
    for run in args.runs:
        m = layouts(run)
        pred, truth, prior = m["predicted"], m["truth"], m["prior"]
        rows = {
            "prediction vs truth": list(zip(truth, pred, strict=True)),
            "prediction vs prior": list(zip(prior, pred, strict=True)),
            "prediction vs shuffled truth": list(zip(np.roll(truth, 1, axis=0), pred,
                                                     strict=True)),
            **{f"prediction vs truth rot{90 * k}": [(np.rot90(t, k), p)
                                                    for t, p in zip(truth, pred, strict=True)]
               for k in (1, 2, 3)},
            "empty vs truth": [(t, np.zeros_like(t)) for t in truth],
            "prior vs truth": list(zip(truth, prior, strict=True)),
        }
        for name, pairs in rows.items():
            iou, miou = scores(pairs)
            share = np.mean([p.mean() for _, p in pairs])
            print(f"| {run} | {len(pred)} | {name} | {iou:.3f} | {miou:.3f} | {share:.3f} |")
    print(f"\n(object share of the truth: {truth.mean():.3f})")


if __name__ == "__main__":
    main()
