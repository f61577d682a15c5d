import json

import numpy as np
import pytest
from typer.testing import CliRunner

from ssageo.cli import app
from ssageo.evaluate.descriptors import DescriptorSet, load_descriptors, save_descriptors
from ssageo.evaluate.metrics import retrieval_metrics
from ssageo.io import DataError


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def vigor_like(seed=0, n_q=30, n_r=40, dim=8):
    rng = np.random.default_rng(seed)
    reference = unit(rng.normal(size=(n_r, dim)))
    positive = rng.integers(0, n_r, size=n_q)
    query = unit(reference[positive] + 0.8 * rng.normal(size=(n_q, dim)))
    semi = rng.integers(-1, n_r, size=(n_q, 3))
    ref_coords = np.column_stack([41.8 + rng.random(n_r) * 0.01, -87.6 + rng.random(n_r) * 0.01])
    query_coords = ref_coords[positive] + 1e-5
    return DescriptorSet(query, reference, positive, semi, query_coords, ref_coords)


def test_roundtrip_keeps_every_entry_and_gives_the_same_metrics(tmp_path):
    ds = vigor_like()
    path = tmp_path / "descriptors.bin"  # any suffix: numpy must not append ".npz"
    save_descriptors(path, ds)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["descriptors.bin"]  # no temp left
    loaded = load_descriptors(path)
    for name in ("query", "reference", "positive", "semi_positive", "query_coords"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(ds, name))
    metrics = loaded.metrics(block_size=7)
    expected = retrieval_metrics(
        ds.query, ds.reference, ds.positive, ds.semi_positive, ds.query_coords, ds.reference_coords
    )
    assert metrics == expected
    assert {"hit_rate", "median_error_m", "mean_error_m"} <= set(metrics)


def test_minimal_file_with_float16_descriptors(tmp_path):
    ds = vigor_like()
    path = tmp_path / "min.npz"
    np.savez(
        path,
        query=ds.query.astype(np.float16),
        reference=ds.reference.astype(np.float16),
        positive=ds.positive.astype(np.int32),
    )
    metrics = load_descriptors(path).metrics()
    assert set(metrics) == {"R@1", "R@5", "R@10", "R@1%", "queries", "gallery", "k_1%"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"positive": None}, "missing entries positive"),
        ({"semi_positives": np.zeros((30, 3), int)}, "unexpected entries semi_positives"),
        ({"reference": np.zeros((40, 9), np.float32)}, "dimension mismatch: query has 8"),
        ({"positive": np.full(30, 40)}, r"'positive' indices must lie in \[0, 40\)"),
        ({"positive": np.zeros(30)}, "'positive' must hold integers"),
        ({"positive": np.zeros(29, int)}, r"'positive' must have shape \(30,\)"),
        ({"semi_positive": np.zeros((30,), int)}, r"'semi_positive' must have shape \(30, S\)"),
        ({"query": np.zeros((30, 8), np.int8)}, "'query' must be a non-empty"),
        ({"query_coords": None}, "both query_coords and reference_coords"),
        ({"reference_coords": np.zeros((40, 3))}, r"must be a \(40, 2\) float array"),
        ({"query_coords": np.full((30, 2), 100.0)}, "finite latitudes/longitudes"),
        ({"reference": np.full((40, 8), np.nan, np.float32)}, "'reference' contains NaN"),
    ],
)
def test_invalid_files_are_refused_naming_the_file(tmp_path, change, message):
    ds = vigor_like()
    arrays = {k: v for k, v in vars(ds).items()}
    arrays.update(change)
    path = tmp_path / "bad.npz"
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    with pytest.raises(DataError, match=message) as err:
        load_descriptors(path)
    assert str(path) in str(err.value)


def test_unreadable_or_missing_file(tmp_path):
    bad = tmp_path / "text.npz"
    bad.write_text("not a zip")
    with pytest.raises(DataError, match="not a readable .npz"):
        load_descriptors(bad)
    with pytest.raises(DataError, match="not found"):
        load_descriptors(tmp_path / "absent.npz")


def test_unnormalised_descriptors_need_explicit_normalize(tmp_path):
    ds = vigor_like()
    path = tmp_path / "raw.npz"
    save_descriptors(path, DescriptorSet(ds.query * 3, ds.reference * 0.5, ds.positive))
    with pytest.raises(DataError, match="not L2-normalised"):
        load_descriptors(path)
    fixed = load_descriptors(path, normalize=True)
    np.testing.assert_allclose(np.linalg.norm(fixed.reference, axis=1), 1, rtol=1e-6)
    assert fixed.metrics()["R@1"] == retrieval_metrics(ds.query, ds.reference, ds.positive)["R@1"]


def test_cli_eval_descriptors_prints_and_writes_json(tmp_path):
    ds = vigor_like()
    save_descriptors(tmp_path / "d.npz", ds)
    out = tmp_path / "metrics.json"
    result = CliRunner().invoke(
        app, ["eval", "--descriptors", str(tmp_path / "d.npz"), "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "R@1%" in result.output and "hit_rate" in result.output
    assert json.loads(out.read_text()) == ds.metrics()


def test_cli_eval_refuses_bad_file_and_conflicting_options(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["eval", "--descriptors", str(tmp_path / "none.npz")])
    assert isinstance(result.exception, DataError) and "none.npz" in str(result.exception)
    result = runner.invoke(app, ["eval"])
    assert result.exit_code == 2 and "--checkpoint" in result.output


def test_normalize_float16_descriptors_in_float64_not_to_zeros(tmp_path):
    """Raw float16 descriptors whose norms exceed float16's range (65504): normalising in
    float16 made every row zero, every score a tie, and R@1 100 %."""
    ds = vigor_like(dim=64)
    path = tmp_path / "raw16.npz"
    # every entry fits float16 (max 65504) but every row norm is well above it
    scale = 60000 / max(np.abs(ds.query).max(), np.abs(ds.reference).max())
    query, reference = (x * scale for x in (ds.query, ds.reference))
    assert (np.linalg.norm(query, axis=1) > 65504).all()
    np.savez(path, query=query.astype(np.float16), reference=reference.astype(np.float16),
             positive=ds.positive)
    loaded = load_descriptors(path, normalize=True)
    assert loaded.query.dtype == np.float32 and np.isfinite(loaded.query).all()
    np.testing.assert_allclose(np.linalg.norm(loaded.reference, axis=1), 1, rtol=1e-5)
    expected = retrieval_metrics(ds.query, ds.reference, ds.positive)["R@1"]
    assert loaded.metrics()["R@1"] == pytest.approx(expected) and expected < 100
    result = CliRunner().invoke(app, ["eval", "--descriptors", str(path), "--normalize"])
    assert result.exit_code == 0 and f"{expected:.2f} %" in result.output


@pytest.mark.parametrize("normalize", [False, True])
def test_all_zero_descriptors_are_refused(tmp_path, normalize):
    ds = vigor_like()
    query = ds.query.copy()
    query[4] = 0
    path = tmp_path / "zero.npz"
    np.savez(path, query=query, reference=ds.reference, positive=ds.positive)
    message = r"1 'query' rows are all zero \(first: row 4\)" if normalize else "not L2-normalised"
    with pytest.raises(DataError, match=message) as err:
        load_descriptors(path, normalize=normalize)
    assert str(err.value).startswith(str(path))
