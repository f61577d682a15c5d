"""Sharded geo index at city scale: build time, bytes per tile, queries/s, recall vs exact.

Descriptors of millions of tiles cannot be embedded here, so they are drawn from a model fitted
to real ones: a checkpoint (or, without ``--checkpoint``, a random-init model of ``--config``)
embeds the satellite tiles of a synthetic dataset (``ssageo synth``); their mean, a Gaussian
mixture in their top principal components and the isotropic residual variance are kept, then
lifted to ``--dim`` dimensions by a random orthonormal map and sampled chunk by chunk (never all
in memory). ``--source random`` draws uniform random unit vectors instead: the worst case, where
the nearest tile is barely nearer than the others. Queries are fresh draws of the same model.

Every database chunk is generated once: it goes to the index builder (``build_sharded``, the
code ``ssageo index build`` runs) and, on the way, to an exact blockwise top-10 of the query
subset, so recall@1/@10 of the IVF-PQ search is measured against exact search in the same run.

    OMP_NUM_THREADS=1 python benchmarks/bench_index.py --fit-from SYNTH_DIR --tiles 1000000 \\
        --dim 256 --work /tmp/bench_index [--lists 1024 --pq-bytes 32 --nprobe 16 32 64]
    # 10 M x 1024-d as recorded in RESULTS.md (a trained checkpoint, the sq12 store in RAM)
    OMP_NUM_THREADS=2 python benchmarks/bench_index.py --fit-from SYNTH_DIR --checkpoint CKPT \
        --tiles 10000000 --dim 1024 --lists 2048 --pca 256 --nprobe 32 64 \
        --rerank 0 200 500 1000 --exact-queries 0 --rerank-store sq12 --in-memory \
        --search-threads 1 --queries 500
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from ssageo.evaluate import ann
from ssageo.evaluate.ann import exact_topk
from ssageo.evaluate.shardindex import ShardedIndex
from ssageo.evaluate.shards import build_sharded


def fit_mixture(data: Path, checkpoint: Path | None, config: str, rank: int, components: int):
    """(mean, PCA-space GaussianMixture, residual variance per dim, real dim) of the tile
    descriptors of a dataset, embedded by ``checkpoint`` or a random-init ``config`` model."""
    import torch
    from sklearn.decomposition import PCA
    from sklearn.mixture import GaussianMixture

    from ssageo.config import load_config
    from ssageo.evaluate.embed import embed_paths
    from ssageo.evaluate.index import load_checkpoint
    from ssageo.evaluate.tiles import dataset_tiles
    from ssageo.model import build_model

    if checkpoint is not None:
        model, cfg, _ = load_checkpoint(checkpoint)
    else:
        cfg = load_config(config, [])
        torch.manual_seed(0)
        model = build_model(cfg["model"], cfg["data"]["reference_size"], cfg["data"]["query_size"])
    paths, _, _ = dataset_tiles(data)
    x = embed_paths(model, paths, cfg["data"]["reference_size"], "reference", progress=False)
    mean = x.mean(0)
    pca = PCA(rank, random_state=0).fit(x - mean)
    z = pca.transform(x - mean)
    gmm = GaussianMixture(components, covariance_type="full", random_state=0).fit(z)
    residual = ((x - mean) ** 2).sum(1).mean() - pca.explained_variance_.sum()
    print(f"fitted to {len(x)} tiles ({x.shape[1]}-d): mean norm {np.linalg.norm(mean):.3f}, "
          f"top-{rank} PCs hold {pca.explained_variance_ratio_.sum():.1%} of the variance, "
          f"{components} mixture components", flush=True)
    return mean, gmm, max(residual, 0.0), x.shape[1]


class Sampler:
    """Unit vectors of ``dim`` dimensions, deterministic per (seed, chunk)."""

    def __init__(self, dim: int, fitted=None, seed: int = 0) -> None:
        self.dim, self.fitted, self.seed = dim, fitted, seed
        if fitted is not None:
            mean, gmm, residual, _ = fitted
            rng = np.random.default_rng(seed)
            rank = gmm.means_.shape[1]
            basis, _ = np.linalg.qr(rng.normal(size=(dim, rank + 1)))
            self.mean_dir = basis[:, 0] * np.linalg.norm(mean)
            self.lift = basis[:, 1:].T  # (rank, dim), orthonormal rows, orthogonal to the mean
            self.sigma = np.sqrt(residual / dim)
            self.chol = np.linalg.cholesky(gmm.covariances_)

    def chunk(self, index: int, n: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, index])
        if self.fitted is None:
            x = rng.standard_normal((n, self.dim), dtype=np.float32)
        else:
            gmm = self.fitted[1]
            comp = rng.choice(len(gmm.weights_), size=n, p=gmm.weights_)
            eps = rng.standard_normal((n, gmm.means_.shape[1]))
            z = gmm.means_[comp] + np.einsum("nij,nj->ni", self.chol[comp], eps)
            x = (self.mean_dir + z @ self.lift).astype(np.float32)
            x += rng.standard_normal((n, self.dim), dtype=np.float32) * np.float32(self.sigma)
        return x / np.linalg.norm(x, axis=1, keepdims=True)


def recall(found: np.ndarray, truth: np.ndarray, at: int) -> float:
    """Fraction of queries whose exact nearest tile is among the first ``at`` found."""
    return float(np.mean([truth[q, 0] in found[q, :at] for q in range(len(truth))]))


class NamedRows:
    """Tile names and lat/lon made on demand (``ssageo.evaluate.tiles.TileTable``): no list of
    millions of names is held, as a streamed tiles CSV holds none."""

    def __init__(self, count: int) -> None:
        self.count = count

    def __len__(self) -> int:
        return self.count

    def rows(self, start: int, stop: int) -> tuple[list[str], np.ndarray]:
        stop = min(stop, self.count)
        return [f"tile{i:09d}.png" for i in range(start, stop)], np.zeros((stop - start, 2))

    def paths_at(self, rows: np.ndarray) -> list[str]:
        return [f"tile{i:09d}.png" for i in rows.tolist()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fit-from", type=Path, help="Dataset whose tiles the model fits.")
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--config", default="synth-cpu")
    parser.add_argument("--source", choices=["mixture", "random"], default="mixture")
    parser.add_argument("--tiles", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--shard-size", type=int, default=262144)
    parser.add_argument("--lists", type=int, default=1024)
    parser.add_argument("--pq-bytes", type=int, default=32)
    parser.add_argument("--pca", type=int, default=0,
                        help="Lists and codes after a PCA projection to this many dims (0: off).")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--rerank", type=int, nargs="+", default=[0, 50, 100, 200])
    parser.add_argument("--rerank-store", choices=["float32", "sq12", "sq8"], default="float32",
                        help="What the index keeps for re-ranking (ssageo.evaluate.ann).")
    parser.add_argument("--in-memory", action="store_true",
                        help="Read the re-ranking store into RAM at load (locate --in-memory).")
    parser.add_argument("--keep", action="store_true", help="Keep the index folder.")
    parser.add_argument("--search-threads", type=int, default=None,
                        help="faiss/BLAS threads while searching (default: as while building).")
    parser.add_argument("--exact-queries", type=int, default=100,
                        help="Queries timed through the exact sharded index (0: skip).")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()

    fitted = None
    if args.source == "mixture":
        if args.fit_from is None:
            parser.error("--source mixture needs --fit-from DATASET (ssageo synth output)")
        fitted = fit_mixture(args.fit_from, args.checkpoint, args.config, 32, 8)
    db, queries = Sampler(args.dim, fitted, 0), Sampler(args.dim, fitted, 0)
    queries.seed = 1  # same lift, other draws
    q = queries.chunk(0, args.queries)
    truth_s = np.full((len(q), 0), -np.inf, np.float32)
    truth_i = np.zeros((len(q), 0), np.int64)
    gen_s = gt_s = 0.0

    def embed(start: int, stop: int) -> np.ndarray:
        nonlocal truth_s, truth_i, gen_s, gt_s
        t0 = time.perf_counter()
        x = db.chunk(start // args.shard_size, stop - start)
        t1 = time.perf_counter()
        # exact ground truth, one chunk and 100 queries at a time (bounded score matrices)
        parts = [exact_topk(q[a: a + 100], [(start, x)], 10) for a in range(0, len(q), 100)]
        s, i = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        both_s, both_i = np.concatenate([truth_s, s], 1), np.concatenate([truth_i, i], 1)
        keep = np.argsort(-both_s, 1, kind="stable")[:, :10]
        truth_s, truth_i = (np.take_along_axis(t, keep, 1) for t in (both_s, both_i))
        gen_s += t1 - t0
        gt_s += time.perf_counter() - t1
        return x

    if args.work:
        Path(args.work).mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="bench_index.", dir=args.work)) / "index"
    train = Sampler(args.dim, fitted, 0)
    train.seed = 2  # the quantisers' training sample: other draws of the same model (i.i.d.
    # draws are what a uniform sample of the database rows is)
    meta = {"model_hash": args.source, "weights_sha256": "none", "descriptor_dim": args.dim,
            "checkpoint": "none", "model": {}, "count": 0}
    try:
        t0 = time.perf_counter()
        build_sharded(folder, NamedRows(args.tiles), embed, meta, "ivfpq", args.shard_size,
                      args.lists, args.pq_bytes, rerank_store=args.rerank_store,
                      embed_rows=lambda rows: train.chunk(0, len(rows)),
                      log=lambda m: print(m, flush=True), pca=args.pca)
        build_s = time.perf_counter() - t0 - gen_s - gt_s
        sizes = {p.name: p.stat().st_size for p in folder.iterdir()}
        t0 = time.perf_counter()
        index = ShardedIndex.load(folder, in_memory=args.in_memory)
        load_s = time.perf_counter() - t0
        result = {
            "source": args.source, "tiles": args.tiles, "dim": args.dim, "lists": args.lists,
            "pq_bytes": args.pq_bytes, "pca": args.pca, "rerank_store": args.rerank_store,
            "queries": len(q),
            "threads": os.environ.get("OMP_NUM_THREADS"), "load_avg_start": os.getloadavg()[0],
            "build_s": round(build_s, 1), "generate_s": round(gen_s, 1),
            "ground_truth_s": round(gt_s, 1), "load_s": round(load_s, 1),
            "memory_bytes_per_tile": round(ann.memory_bytes(index.ann) / args.tiles, 2),
            "disk_codes_bytes_per_tile": round(sum(
                v for k, v in sizes.items() if k.endswith(".npz")) / args.tiles, 2),
            "disk_store_bytes_per_tile": round(sum(
                v for k, v in sizes.items() if k.endswith((".f32.npy", ".sq12.npy", ".sq8.npy")))
                / args.tiles, 2),
            "runs": [],
        }
        if args.search_threads:
            from threadpoolctl import threadpool_limits

            threadpool_limits(args.search_threads)
            ann.faiss_module().omp_set_num_threads(args.search_threads)
            result["search_threads"] = args.search_threads
        result["in_memory"] = args.in_memory
        for nprobe in args.nprobe:
            for rerank in args.rerank:
                index.search(q[:20], 10, nprobe=nprobe, rerank=rerank)  # warm the page cache
                t0 = time.perf_counter()
                _, found = index.search(q, 10, nprobe=nprobe, rerank=rerank)
                qps = len(q) / (time.perf_counter() - t0)
                run = {"nprobe": nprobe, "rerank": rerank, "qps": round(qps, 1),
                       "recall@1": recall(found, truth_i, 1),
                       "recall@10": recall(found, truth_i, 10)}
                result["runs"].append(run)
                print(json.dumps(run), flush=True)
        if args.exact_queries and args.rerank_store == "float32":
            t0 = time.perf_counter()
            exact_topk(q[: args.exact_queries], index.stores(), 10)
            result["exact_qps"] = round(args.exact_queries / (time.perf_counter() - t0), 1)
        result["load_avg_end"] = os.getloadavg()[0]
        print(json.dumps(result))
    finally:
        if not args.keep:
            shutil.rmtree(folder.parent)  # the bench's own temporary folder


if __name__ == "__main__":
    main()
