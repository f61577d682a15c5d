"""Per-tile time of `ssageo priors --backend langsam` with the tiny random models, on CPU or GPU.

Generates a synth world, saves the tiny GroundingDINO + SAM of ``ssageo.priors.tiny`` and times
``run_priors`` over every tile (labels written, as the CLI does) at batch size 1 (the baseline)
and ``--batch-size``, plus the oracle backend for scale. Thresholds are 0 so that every detector
query becomes a box and SAM really runs (the worst case for the tiny models). Prints the median
over ``--repeats`` runs of the per-tile time and the ratio to the batch-1 baseline.

    python benchmarks/bench_priors.py                        # CPU, 40 tiles of 64 px
    python benchmarks/bench_priors.py --device cuda --tiles 200 --size 128
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def _per_tile(tiles, backend, repeats: int) -> float:
    from ssageo.priors import run_priors

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        summary = run_priors(tiles, backend, force=True, progress=False)
        times.append((time.perf_counter() - start) / len(tiles))
        assert summary.ok and summary.done == len(tiles), summary.failed
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=40)
    parser.add_argument("--size", type=int, default=64, help="satellite tile side (px)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    import ssageo  # noqa: F401
    from ssageo.config import load_config
    from ssageo.priors import list_tiles
    from ssageo.priors.langsam import LangSamBackend
    from ssageo.priors.oracle import OracleBackend
    from ssageo.priors.tiny import save_tiny_langsam
    from ssageo.synth import generate

    if args.threads:
        torch.set_num_threads(args.threads)
    paper = load_config("priors-langsam")["priors"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "world"
        generate(root, layout="cvusa", places=args.tiles, seed=0, sat_size=args.size,
                 pano_size=(256, 64))
        tiles = list_tiles(root)
        detector, segmenter = save_tiny_langsam(Path(tmp) / "weights", paper["prompts"],
                                                image_size=args.size)
        section = {**paper, "detector": detector, "segmenter": segmenter,
                   "device": args.device, "box_threshold": 0.0, "text_threshold": 0.0}
        rows = []
        for batch in (1, args.batch_size):
            backend = LangSamBackend.from_config({**section, "batch_size": batch})
            _per_tile(tiles[: min(4, len(tiles))], backend, 1)  # warm-up
            rows.append((f"langsam tiny, batch {batch}", _per_tile(tiles, backend, args.repeats)))
        rows.append(("oracle (truth copy)", _per_tile(tiles, OracleBackend(root), args.repeats)))

    device = args.device if args.device != "cpu" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"{len(tiles)} tiles of {args.size} px, device {device}, "
          f"median of {args.repeats} runs")
    base = rows[0][1]
    for name, seconds in rows:
        print(f"{name:28s} {seconds * 1000:8.1f} ms/tile   x{seconds / base:.2f} of batch 1")


if __name__ == "__main__":
    main()
