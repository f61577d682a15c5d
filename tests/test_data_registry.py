"""The dataset registry: one spec per reader, asked instead of dataset names; no import circle."""

import ast
from pathlib import Path

import numpy as np
import pytest

import ssageo.data
from ssageo.config import load_config
from ssageo.data import load_manifest
from ssageo.data.registry import dataset_names, get_spec, reader
from ssageo.io import DataError, write_image

DATA = Path(ssageo.data.__file__).parent


def test_the_registry_names_pairs_and_the_config_takes_it():
    assert dataset_names() == ("cvusa", "cvact", "vigor", "university", "pairs")
    spec = get_spec("pairs")
    assert (spec.splits, spec.held_out, spec.validation, spec.coords, spec.query) == (
        ("train", "val", "test"), "val", "val", "gps", "panorama")
    assert load_config("synth-cpu", ["data.dataset=pairs"])["data"]["dataset"] == "pairs"
    with pytest.raises(DataError, match=r"unknown dataset 'bogus' \(use auto, cvusa, cvact, "
                                        r"vigor, university, pairs\)"):
        get_spec("bogus")


def test_every_spec_is_consistent_and_its_reader_complete():
    for name in dataset_names():
        module, spec = reader(name), get_spec(name)
        assert spec.name == name and module.SPEC is spec
        assert all(callable(getattr(module, f)) for f in ("markers", "sources", "read"))
    assert (get_spec("vigor").validation, get_spec("vigor").held_out) == (None, "test")
    assert [get_spec(n).held_out for n in ("cvusa", "cvact")] == ["val", "val"]
    assert get_spec("cvact").coords == "utm" and get_spec("vigor").modes


def test_readers_import_no_loader_or_registry():
    """The circle manifest <-> readers is gone: readers build on base, the loader on them."""
    for name in dataset_names():
        tree = ast.parse((DATA / f"{name}.py").read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert not imported & {"ssageo.data.manifest", "ssageo.data.registry", "ssageo.data"}, name
    base = ast.parse((DATA / "base.py").read_text())
    assert all(not (isinstance(n, ast.ImportFrom) and n.module in {
        f"ssageo.data.{d}" for d in (*dataset_names(), "manifest", "registry")})
        for n in ast.walk(base))


def test_training_without_val_rows_runs_without_validation(tmp_path):
    from ssageo.train.trainer import validation_manifest

    for name in ("q.jpg", "t.jpg"):
        write_image(tmp_path / name, np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "pairs.csv").write_text("query,reference,split,lat,lon\nq.jpg,t.jpg,train,47,8\n")
    train = load_manifest(tmp_path / "pairs.csv")
    manifest, why = validation_manifest(train, {"data": {"root": str(tmp_path / "pairs.csv")}})
    assert manifest is None and "no pairs with split 'val' (it lists train)" in why
    assert why.endswith("no validation during training; use checkpoints/last")
