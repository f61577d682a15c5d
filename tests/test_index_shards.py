"""Sharded geo indexes (exact and faiss IVF-PQ): agreement, resume, extend, damaged shards."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from ssageo.evaluate import ann
from ssageo.evaluate.ann import exact_topk
from ssageo.evaluate.shardindex import ShardedIndex
from ssageo.evaluate.shards import MANIFEST, build_sharded, training_rows
from ssageo.evaluate.tiles import TileList, TilesCsv
from ssageo.io import DataError, write_image
from test_index import make_checkpoint

DIM = 64


def structured(n, seed=0, centres=40):
    """Unit vectors from a mixture of low-rank clusters, like real descriptors (not uniform)."""
    rng = np.random.default_rng(seed)
    means = np.random.default_rng(123).normal(size=(centres, DIM))
    basis = np.random.default_rng(321).normal(size=(centres, 8, DIM))
    c = rng.integers(0, centres, n)
    x = means[c] + np.einsum("nk,nkd->nd", rng.normal(size=(n, 8)), basis[c]) * 0.3
    x += rng.normal(size=(n, DIM)) * 0.2
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def meta(dim=DIM):
    return {"model_hash": "synthetic", "weights_sha256": "none", "descriptor_dim": dim,
            "checkpoint": "none", "model": {}, "count": 0}


def build(folder, desc, **kw):
    tiles = [f"t{i}.png" for i in range(len(desc))]
    coords = np.column_stack([np.linspace(-60, 60, len(desc)), np.zeros(len(desc))])
    return build_sharded(folder, TileList(tiles, coords), lambda a, b: desc[a:b],
                         meta(desc.shape[1]), **kw)


def recall_at_1(index, queries, truth, **kw):
    _, ids = index.search(queries, 10, **kw)
    return float(np.mean(ids[:, 0] == truth))


def test_ivfpq_agrees_with_exact_search_on_structured_vectors(tmp_path):
    desc = structured(4000)
    rng = np.random.default_rng(7)
    queries = desc[:300] + rng.normal(size=(300, DIM)).astype(np.float32) * 0.05
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    truth = np.argmax(queries @ desc.T, axis=1)  # exact nearest tile, by brute force

    build(tmp_path / "exact", desc, kind="exact", shard_size=1500)
    exact = ShardedIndex.load(tmp_path / "exact")
    assert len(exact.manifest["shards"]) == 3
    scores, ids = exact.search(queries, 5)
    np.testing.assert_array_equal(ids[:, 0], truth)
    np.testing.assert_allclose(scores[:, 0], np.max(queries @ desc.T, axis=1), rtol=1e-5)

    build(tmp_path / "ivf", desc, kind="ivfpq", shard_size=1500, lists=16, pq_bytes=8)
    ivf = ShardedIndex.load(tmp_path / "ivf")
    reranked = recall_at_1(ivf, queries, truth, nprobe=8, rerank=50)
    codes_only = recall_at_1(ivf, queries, truth, nprobe=8, rerank=0)
    assert reranked >= 0.99, (reranked, codes_only)
    assert codes_only < reranked  # 8-byte codes alone are approximate: re-ranking matters
    s, i = ivf.search(queries[:5], 3, nprobe=8, rerank=50)  # re-ranked scores are exact cosines
    np.testing.assert_allclose(s, np.take_along_axis(queries[:5] @ desc.T, i, 1), rtol=1e-5)


@pytest.mark.parametrize("store, bits", [("sq8", 8), ("sq12", 12)])
def test_a_compressed_store_reranks_like_the_float_store_in_fewer_bytes(tmp_path, store, bits):
    desc = structured(4000, seed=3)
    rng = np.random.default_rng(8)
    queries = desc[:300] + rng.normal(size=(300, DIM)).astype(np.float32) * 0.05
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    exact = queries @ desc.T
    for kind in ("float32", store):
        build(tmp_path / kind, desc, kind="ivfpq", shard_size=2000, lists=16, pq_bytes=8,
              rerank_store=kind)
    f32, small = ShardedIndex.load(tmp_path / "float32"), ShardedIndex.load(tmp_path / store)
    codes = np.load(tmp_path / store / f"shard-00001.{store}.npy")
    assert codes.dtype == np.uint8 and codes.shape == (2000, 4 + DIM * bits // 8)
    assert not list((tmp_path / store).glob("*.f32.npy"))
    # residual components within half a step, but for the few that fall beyond the widened
    # range of the training sample (the first shard's tiles) and are clipped to it
    decoded = small.sq.decode(codes)
    pq_codes = np.load(tmp_path / store / "shard-00001.npz")["codes"]  # lists as the PQ's
    np.testing.assert_array_equal(codes[:, :4].copy().view("<u4")[:, 0],
                                  ann.list_numbers(small.ann, pq_codes))
    assert np.mean(np.abs(decoded - desc[2000:]) <= small.sq.step * 0.5 + 1e-6) > 0.999
    np.testing.assert_allclose(small.sq.scores(codes, queries[0]), decoded @ queries[0],
                               atol=1e-5)  # scoring without decoding is the same sum
    s_f, i_f = f32.search(queries, 10, nprobe=8, rerank=50)
    s_q, i_q = small.search(queries, 10, nprobe=8, rerank=50)
    in_ram = ShardedIndex.load(tmp_path / store, in_memory=True)  # read whole, not mapped
    assert all(type(in_ram._store(s)) is np.ndarray for s in range(2))
    assert all(isinstance(small._store(s), np.memmap) for s in range(2))
    np.testing.assert_array_equal(in_ram.search(queries, 10, nprobe=8, rerank=50)[1], i_q)
    assert np.mean(i_q[:, 0] == np.argmax(exact, axis=1)) >= 0.99
    assert np.mean(i_q[:, 0] == i_f[:, 0]) >= 0.99
    error = np.abs(s_q - np.take_along_axis(exact, i_q, 1))
    assert error.max() > 1e-7  # approximate, not the floats; 16x finer steps with 12 bits
    assert np.quantile(error, 0.99) < (3e-3 if bits == 8 else 3e-4), np.quantile(error, 0.99)
    with pytest.raises(DataError, match="holds no float32 descriptors"):
        list(small.stores())
    (tmp_path / store / "residual-sq.npz").write_bytes(b"damaged")
    with pytest.raises(DataError, match=r"residual-sq\.npz: re-ranking store quantiser is "
                                        "corrupt"):
        ShardedIndex.load(tmp_path / store)


def test_a_pca_projection_codes_fewer_dimensions_and_reranks_from_whole_descriptors(tmp_path):
    from ssageo.config import ConfigError

    desc = structured(4000, seed=5)
    rng = np.random.default_rng(9)
    queries = desc[:300] + rng.normal(size=(300, DIM)).astype(np.float32) * 0.05
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    exact = queries @ desc.T
    build(tmp_path / "pca", desc[:3000], kind="ivfpq", shard_size=1500, lists=16, pq_bytes=8,
          pca=16, rerank_store="sq12")
    index = ShardedIndex.load(tmp_path / "pca")
    assert index.manifest["params"]["pca"] == 16
    inner = ann.ivf(index.ann)
    assert (index.ann.d, inner.d, inner.pq.dsub) == (DIM, 16, 2)  # 8 bytes code 16 dims
    assert ann.project(index.ann, desc[:5]).shape == (5, 16)
    assert ann.memory_bytes(index.ann) - ann.memory_bytes(ann.ivf(index.ann)) == DIM * 16 * 4
    codes = np.load(tmp_path / "pca" / "shard-00001.sq12.npy")
    pq_codes = np.load(tmp_path / "pca" / "shard-00001.npz")["codes"]
    assert pq_codes.shape == (1500, 1 + 8)  # list byte + PQ code
    np.testing.assert_array_equal(index.sq.lists(codes), ann.list_numbers(index.ann, pq_codes))
    # the store's residuals are to the lists' centroids mapped back to the whole space
    # (shard 1 holds rows 1500-2999)
    decoded = index.sq.decode(codes)
    assert np.mean(np.abs(decoded - desc[1500:3000]) <= index.sq.step * 0.5 + 1e-6) > 0.999
    # an extension encodes new tiles with the same projection and lists
    build_sharded(tmp_path / "pca", TileList([f"n{i}.png" for i in range(1000)],
                                             np.zeros((1000, 2))),
                  lambda a, b: desc[3000 + a: 3000 + b], meta(), extend=True)
    index = ShardedIndex.load(tmp_path / "pca")
    assert index.manifest["params"]["pca"] == 16 and index.manifest["count"] == 4000
    _, ids = index.search(queries, 10, nprobe=8, rerank=50)
    assert np.mean(ids[:, 0] == np.argmax(exact, axis=1)) >= 0.99
    _, ids = index.search(desc[[3100, 3999]], 1, nprobe=8, rerank=20)
    assert ids[:, 0].tolist() == [3100, 3999]
    with pytest.raises(ConfigError, match="--pca 65 must be between 0 .off. and the "
                                          "descriptor dimension 64"):
        build(tmp_path / "wide", desc, kind="ivfpq", lists=4, pca=65)
    with pytest.raises(ConfigError, match="--pq-bytes 8 must divide the --pca dimension 12"):
        build(tmp_path / "odd", desc, kind="ivfpq", lists=4, pq_bytes=8, pca=12)
    assert not (tmp_path / "wide").exists() and not (tmp_path / "odd").exists()


def test_a_store_that_cannot_hold_the_descriptors_is_refused_before_any_work(tmp_path):
    from ssageo.config import ConfigError

    odd = structured(500)[:, :63]
    with pytest.raises(ConfigError, match="sq12 packs dimensions in pairs.*63"):
        build(tmp_path / "odd", odd, kind="ivfpq", lists=4, pq_bytes=7, rerank_store="sq12")
    with pytest.raises(ConfigError, match="--rerank-store must be one of"):
        build(tmp_path / "bad", structured(500), kind="ivfpq", lists=4, rerank_store="f16")
    assert not (tmp_path / "odd").exists() and not (tmp_path / "bad").exists()


def test_an_index_written_with_a_boolean_rerank_store_still_opens(tmp_path):
    desc = structured(1000, seed=4)
    build(tmp_path / "ivf", desc, kind="ivfpq", shard_size=1000, lists=8, pq_bytes=8)
    path = tmp_path / "ivf" / MANIFEST
    manifest = json.loads(path.read_text())
    assert manifest["params"]["rerank_store"] == "float32"
    manifest["params"]["rerank_store"] = True  # as indexes before the sq8 store say it
    path.write_text(json.dumps(manifest))
    index = ShardedIndex.load(tmp_path / "ivf")
    assert index.store == "float32"
    _, ids = index.search(desc[:20], 1, nprobe=8, rerank=20)
    np.testing.assert_array_equal(ids[:, 0], np.arange(20))


def test_extending_an_index_keeps_the_old_tiles(tmp_path):
    desc = structured(3000, seed=1)
    build(tmp_path / "ivf", desc[:2000], kind="ivfpq", shard_size=1000, lists=8, pq_bytes=8)
    before = json.loads((tmp_path / "ivf" / MANIFEST).read_text())
    old_mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ivf").glob("shard-*")}
    tiles = [f"new{i}.png" for i in range(1000)]
    coords = np.full((1000, 2), 10.0)
    build_sharded(tmp_path / "ivf", TileList(tiles, coords), lambda a, b: desc[2000 + a: 2000 + b],
                  meta(), extend=True)
    after = ShardedIndex.load(tmp_path / "ivf")
    assert after.manifest["count"] == 3000 and after.manifest["shards"][:2] == before["shards"]
    assert {p: (tmp_path / "ivf" / p).stat().st_mtime_ns for p in old_mtimes} == old_mtimes
    assert after.tiles[0] == "t0.png" and after.tiles[2500] == "new500.png"
    _, ids = after.search(desc[[5, 1500, 2100, 2999]], 1, nprobe=8, rerank=20)
    assert ids[:, 0].tolist() == [5, 1500, 2100, 2999]
    with pytest.raises(DataError, match="already complete; pass --extend"):
        build(tmp_path / "ivf", desc[:2000], kind="ivfpq", shard_size=1000, lists=8, pq_bytes=8)


def test_an_interrupted_ivfpq_build_resumes_with_its_trained_quantiser(tmp_path):
    desc = structured(2400, seed=2)
    calls = []

    def failing(a, b):
        calls.append(a)
        if len(calls) == 2:
            raise KeyboardInterrupt  # interrupted while embedding the second shard
        return desc[a:b]

    kw = {"kind": "ivfpq", "shard_size": 800, "lists": 8, "pq_bytes": 8}
    tiles = TileList([f"t{i}.png" for i in range(2400)], np.zeros((2400, 2)))
    with pytest.raises(KeyboardInterrupt):
        build_sharded(tmp_path / "a", tiles, failing, meta(), **kw)
    trained = (tmp_path / "a" / "ivfpq.trained").read_bytes()
    calls.clear()
    build_sharded(tmp_path / "a", tiles, lambda a, b: (calls.append(a), desc[a:b])[1], meta(),
                  **kw)
    assert calls == [800, 1600]  # the first shard was kept, not embedded again
    assert (tmp_path / "a" / "ivfpq.trained").read_bytes() == trained
    build_sharded(tmp_path / "b", tiles, lambda a, b: desc[a:b], meta(), **kw)
    a, b = (json.loads((tmp_path / d / MANIFEST).read_text()) for d in "ab")
    assert a["shards"] == b["shards"] and a["trained"] == b["trained"]


def test_other_tiles_or_checkpoint_cannot_resume_an_index(tmp_path):
    desc = structured(100)
    build(tmp_path / "x", desc, shard_size=40)
    other = meta() | {"weights_sha256": "other"}
    with pytest.raises(DataError, match="differs in weights_sha256"):
        build_sharded(tmp_path / "x", TileList(["a"], np.zeros((1, 2))), lambda a, b: desc[:1],
                      other, extend=True)
    got = exact_topk(desc[:3], [(0, desc[:50]), (50, desc[50:])], 2)[1]
    assert got[:, 0].tolist() == [0, 1, 2]


def test_quantisers_train_on_a_sample_of_the_whole_input_not_its_first_region(tmp_path):
    # tiles in geographic order: the first shard holds a few clusters (one region) only
    desc = structured(6000, seed=3)
    desc = desc[np.argsort(np.argmax(desc @ structured(40, seed=9).T, axis=1), kind="stable")]
    asked = []

    def embed_rows(rows):
        asked.append(rows)
        return desc[rows]

    build(tmp_path / "ivf", desc, kind="ivfpq", shard_size=1000, lists=16, pq_bytes=8,
          train_size=1500, embed_rows=embed_rows)
    rows = asked[0]
    assert len(asked) == 1 and len(rows) == 1500 and np.all(np.diff(rows) > 0)
    assert rows.max() > 5000 and np.array_equal(rows, training_rows(6000, 1500))
    ivf = ShardedIndex.load(tmp_path / "ivf")
    last = desc[-300:] + np.random.default_rng(1).normal(size=(300, DIM)).astype(np.float32) * .05
    last /= np.linalg.norm(last, axis=1, keepdims=True)
    truth = np.argmax(last @ desc.T, axis=1)
    assert recall_at_1(ivf, last, truth, nprobe=4, rerank=50) >= 0.99


def test_a_tiles_csv_is_read_in_blocks_with_the_lines_of_bad_rows_named(tmp_path):
    rows = [f"sub/t{i}.png,{i * 1e-3},{-i * 1e-3}" for i in range(103)]
    csv = tmp_path / "tiles.csv"
    csv.write_bytes(b"\xef\xbb\xbfpath,lat,lon\n" + "\n\n".join(rows).encode() + b"\n")
    table = TilesCsv(csv, block=10)
    assert len(table) == 103 and len(table.offsets) == 11
    paths, coords = table.rows(27, 41)
    assert paths == [str(tmp_path / f"sub/t{i}.png") for i in range(27, 41)]
    np.testing.assert_allclose(coords[:, 0], np.arange(27, 41) * 1e-3)
    assert table.paths_at(np.array([0, 9, 10, 99, 102])) == [
        str(tmp_path / f"sub/t{i}.png") for i in (0, 9, 10, 99, 102)]
    whole = TileList(*table.rows(0, 103))
    assert whole.rows(50, 52)[0] == table.rows(50, 52)[0]
    rows[60] = "t60.png,north,8"
    csv.write_text("path,lat,lon\n" + "\n\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"tiles.csv:122: lat/lon are not numbers"):
        TilesCsv(csv, block=10)


def test_a_sharded_index_reads_tile_names_and_coordinates_per_shard(tmp_path):
    desc = structured(500, seed=4)
    build(tmp_path / "x", desc, shard_size=100)
    index = ShardedIndex.load(tmp_path / "x")
    assert index._column.cache_info().currsize == 0  # nothing but the manifest read yet
    assert index.tiles[250] == "t250.png" and index.tiles[-1] == "t499.png"
    np.testing.assert_allclose(index.coords[[0, 499]][:, 0], [-60, 60])
    assert index._column.cache_info().currsize == 4  # tiles of shards 2, 4; coords of 0, 4
    with pytest.raises(IndexError):
        index.tiles[500]


@pytest.fixture(scope="module")
def tile_csv(tmp_path_factory):
    """60 rows over 12 small tile images, and a checkpoint of a small model."""
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    lines = ["path,lat,lon"]
    for i in range(60):
        if i < 12:
            tile = np.kron(rng.integers(0, 256, (4, 4, 3)), np.ones((16, 16, 1))).astype(np.uint8)
            write_image(root / f"t{i}.png", tile)
        lines.append(f"t{i % 12}.png,{47 + i * 1e-3},{8 + i * 1e-3}")
    (root / "tiles.csv").write_text("\n".join(lines) + "\n")
    return root, make_checkpoint(root / "ckpt")


def cli(*args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "ssageo", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def build_args(root, checkpoint, out):
    return ("index", "build", "--checkpoint", checkpoint, "--tiles", root / "tiles.csv",
            "--out", out, "--kind", "exact", "--shard-size", 2, "--device", "cpu")


@pytest.mark.slow
def test_a_build_killed_after_its_first_shard_resumes_to_the_same_index(tile_csv):
    root, checkpoint = tile_csv
    proc = cli(*build_args(root, checkpoint, root / "killed"))
    manifest = root / "killed" / MANIFEST
    while proc.poll() is None and not (manifest.is_file() and
                                       json.loads(manifest.read_text())["shards"]):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = json.loads(manifest.read_text())
    assert not state["complete"] and 1 <= len(state["shards"]) < 30
    with pytest.raises(DataError, match="interrupted after"):
        ShardedIndex.load(root / "killed")

    resumed = cli(*build_args(root, checkpoint, root / "killed"))
    out, err = resumed.communicate()
    assert resumed.returncode == 0, err
    assert "resuming:" in out and "indexed 60 tiles" in out
    whole = cli(*build_args(root, checkpoint, root / "whole"))
    assert whole.wait() == 0
    a, b = (json.loads((root / d / MANIFEST).read_text()) for d in ("killed", "whole"))
    assert a["shards"] == b["shards"] and a["count"] == 60  # byte-identical shard files
    assert ShardedIndex.load(root / "killed").tiles.tolist() == [
        str(root / f"t{i % 12}.png") for i in range(60)]

    image = root / "t3.png"
    located = cli("locate", image, "--index", root / "killed", "--json", "--device", "cpu")
    out, err = located.communicate()
    assert located.returncode == 0, err
    hits = json.loads(out)[0]
    assert hits["results"][0]["tile"] == str(image) and hits["time_s"]["search_s"] >= 0

    # a damaged shard is named in one line (exit 2): first corrupt, then missing
    shard = root / "killed" / "shard-00004.f32.npy"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    for damage in ("corrupt", "missing"):
        if damage == "missing":
            shard.unlink()
        located = cli("locate", image, "--index", root / "killed", "--device", "cpu")
        _, err = located.communicate()
        assert located.returncode == 2
        assert err.strip().splitlines() == [
            f"error: {shard}: index shard is {damage} (" + err.split(f"is {damage} (", 1)[1]
            .strip()]


@pytest.mark.slow
def test_cli_builds_an_ivfpq_index_and_locates_with_reranking(tile_csv, tmp_path):
    root, checkpoint = tile_csv
    rows = ["path,lat,lon"] + [f"{root}/t{i % 12}.png,{i * 1e-3},0" for i in range(300)]
    (tmp_path / "big.csv").write_text("\n".join(rows) + "\n")
    built = cli("index", "build", "--checkpoint", checkpoint, "--tiles", tmp_path / "big.csv",
                "--out", tmp_path / "ivf", "--kind", "ivfpq", "--lists", 2, "--pq-bytes", 8,
                "--shard-size", 300, "--rerank-store", "sq12", "--pca", 64, "--device", "cpu")
    out, err = built.communicate()
    assert built.returncode == 0, err
    assert "indexed 300 tiles (ivfpq, D = 320)" in " ".join(out.split())
    manifest = json.loads((tmp_path / "ivf" / MANIFEST).read_text())
    assert manifest["params"] == {"shard_size": 300, "lists": 2, "pq_bytes": 8,
                                  "rerank_store": "sq12", "pca": 64}
    located = cli("locate", root / "t5.png", root / "t7.png", "--index", tmp_path / "ivf",
                  "--json", "--rerank", 20, "--in-memory", "--nprobe", 2, "--top-k", 3,
                  "--device", "cpu")
    out, err = located.communicate()
    assert located.returncode == 0, err
    for image, hits in zip(("t5.png", "t7.png"), json.loads(out), strict=True):
        assert hits["results"][0]["tile"] == str(root / image)
        assert hits["results"][0]["score"] == pytest.approx(1.0, abs=1e-3)  # sq12 re-score
        assert set(hits["time_s"]) == {"embed_s", "search_s"}
    # the local page opens the same index with its store read into RAM (serve --in-memory)
    from ssageo.serve.server import LocateService

    service = LocateService(tmp_path / "ivf", device="cpu", top_k=3, in_memory=True)
    assert type(service.localizer.index._store(0)) is np.ndarray
    answer = service.locate((root / "t7.png").read_bytes(), "t7.png")
    assert answer["results"][0]["tile"] == str(root / "t7.png")
