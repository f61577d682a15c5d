"""Fusion rules, oracle corruption and the shared driver of `ssageo priors`."""

import json
import shutil

import cv2
import numpy as np
import pytest

from ssageo.config import ConfigError, load_config
from ssageo.priors import NAMED_RULES, compile_classes, encode_label, fuse, parse_rule
from ssageo.priors.oracle import (
    Corruption,
    add_false_positives,
    confusion,
    corrupt_mask,
    drop_objects,
    mean_iou,
)

PAPER_PROMPTS = ["artificial buildings", "structures", "trees", "construction", "edifice"]
PAPER_RULE = "(artificial buildings & structures) | trees"


def _all_combinations(names):
    """Masks of one row whose pixels run through every truth assignment of ``names``."""
    n = len(names)
    bits = (np.arange(2**n)[:, None] >> np.arange(n)[None, :]) & 1  # (2^n, n)
    return {name: bits[None, :, i].astype(bool) for i, name in enumerate(names)}


def test_paper_rule_truth_table():
    masks = _all_combinations(["artificial buildings", "structures", "trees"])
    rule = parse_rule(PAPER_RULE)
    expected = (masks["artificial buildings"] & masks["structures"]) | masks["trees"]
    np.testing.assert_array_equal(rule(masks), expected)
    assert rule.names == {"artificial buildings", "structures", "trees"}


def _reference_code_files_and_loader(buildings, structures, trees):
    """What the SSA reference trains on, from 0/255 uint8 prompt masks, done the way its fusion
    script does it (bitwise and, times 255 in uint8, bitwise or with trees, times 255 in uint8;
    uint8 products wrap modulo 256) followed by its loaders' integer division by 255."""
    both = (np.bitwise_and(buildings, structures) * np.uint8(255)).astype(np.uint8)
    stored = (np.bitwise_or(trees, both) * np.uint8(255)).astype(np.uint8)
    return stored, stored // 255


def test_named_rules_paper_and_reference_code():
    masks = _all_combinations(["artificial buildings", "structures", "trees"])
    b, s, t = masks["artificial buildings"], masks["structures"], masks["trees"]
    rules = dict(compile_classes({"paper": "paper", "code": " Reference-Code "}, PAPER_PROMPTS))
    np.testing.assert_array_equal(rules["paper"](masks), (b & s) | t)
    np.testing.assert_array_equal(rules["code"](masks), b & s & ~t)
    assert rules["paper"].text == PAPER_RULE == NAMED_RULES["paper"]
    # reference-code is what the reference's files + loader give on crafted 0/255 masks
    stored, trained = _reference_code_files_and_loader(*(np.where(m, 255, 0).astype(np.uint8)
                                                         for m in (b, s, t)))
    np.testing.assert_array_equal(stored == 1, t)  # the file holds trees as 1 ...
    np.testing.assert_array_equal(stored == 255, b & s & ~t)  # ... the rest of the rule as 255
    np.testing.assert_array_equal(trained.astype(bool), rules["code"](masks))
    label = fuse(masks, compile_classes({"object": "reference-code"}, PAPER_PROMPTS))
    np.testing.assert_array_equal(label // 255, trained)  # our 0/255 file, read their way
    assert not np.array_equal(rules["paper"](masks), rules["code"](masks))


def test_the_priors_preset_selects_a_named_rule_and_it_can_be_overridden():
    assert load_config("priors-langsam")["priors"]["classes"] == {"object": "paper"}
    section = load_config("priors-langsam", ["priors.classes={object: reference-code}"])["priors"]
    ((_, rule),) = compile_classes(section["classes"], section["prompts"])
    assert rule.text == NAMED_RULES["reference-code"]
    with pytest.raises(ConfigError, match=r"'reference-code = .*' names 'structures'"):
        compile_classes({"object": "reference-code"}, ["artificial buildings", "trees"])


@pytest.mark.parametrize(
    ("text", "reference"),
    [
        ("a | b & c", lambda m: m["a"] | (m["b"] & m["c"])),  # & binds tighter than |
        ("~a & b", lambda m: ~m["a"] & m["b"]),  # ~ binds tightest
        ("!(a | b)", lambda m: ~(m["a"] | m["b"])),
        ("a & !!b", lambda m: m["a"] & m["b"]),
        ("((a))|c", lambda m: m["a"] | m["c"]),
    ],
)
def test_operators_and_precedence(text, reference):
    masks = _all_combinations(["a", "b", "c"])
    np.testing.assert_array_equal(parse_rule(text)(masks), reference(masks))


def test_names_ignore_case_and_spacing():
    masks = _all_combinations(["artificial buildings", "trees"])
    got = parse_rule("  Artificial   BUILDINGS|trees ")(masks)
    np.testing.assert_array_equal(got, masks["artificial buildings"] | masks["trees"])


@pytest.mark.parametrize(
    ("text", "message"),
    [("a &", "ends where"), ("(a | b", "never closed"), ("a | b)", "after a complete"),
     ("& a", "unexpected '&'"), ("", "ends where")],
)
def test_malformed_rules_are_refused(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_rule(text)


def test_rule_naming_an_unknown_prompt_is_refused():
    with pytest.raises(ConfigError, match="'buildings'.*not among the prompts"):
        compile_classes({"object": "buildings | trees"}, PAPER_PROMPTS)


def test_labels_two_class_and_multi_class():
    masks = _all_combinations(PAPER_PROMPTS[:3])
    one = fuse(masks, compile_classes({"object": PAPER_RULE}, PAPER_PROMPTS))
    assert one.dtype == np.uint8 and set(np.unique(one)) == {0, 255}
    expected = (masks["artificial buildings"] & masks["structures"]) | masks["trees"]
    np.testing.assert_array_equal(one == 255, expected)
    classes = compile_classes({"building": "artificial buildings", "tree": "trees"}, PAPER_PROMPTS)
    many = fuse(masks, classes)
    assert set(np.unique(many)) == {0, 1, 2}
    np.testing.assert_array_equal(many == 1, masks["artificial buildings"])  # first listed wins
    np.testing.assert_array_equal(many == 2, masks["trees"] & ~masks["artificial buildings"])
    assert encode_label([np.zeros((2, 2), bool)]).max() == 0


def _squares(count_per_side=20, size=4, gap=4):
    """A mask of count_per_side**2 separate square objects."""
    step = size + gap
    mask = np.zeros((count_per_side * step, count_per_side * step), bool)
    for i in range(count_per_side):
        for j in range(count_per_side):
            mask[i * step : i * step + size, j * step : j * step + size] = True
    return mask


def _objects(mask):
    return cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)[0] - 1


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.8, 1.0])
def test_drop_removes_the_requested_fraction_of_objects(fraction):
    mask = _squares()
    kept = _objects(drop_objects(mask, fraction, np.random.default_rng(1))) / _objects(mask)
    assert abs((1 - kept) - fraction) < 0.07  # 400 objects: binomial sd <= 0.025


def test_erosion_shrinks_and_dilation_grows_the_foreground():
    mask = _squares(size=8)
    rng = np.random.default_rng(0)
    areas = [corrupt_mask(mask, Corruption(erode=k), rng).sum() for k in (0, 1, 2)]
    assert areas[0] == mask.sum() > areas[1] > areas[2]
    assert not (corrupt_mask(mask, Corruption(erode=1), rng) & ~mask).any()  # only shrinks
    grown = corrupt_mask(mask, Corruption(dilate=2), rng)
    assert grown.sum() > mask.sum() and (grown | ~mask).all()  # only grows


@pytest.mark.parametrize("fraction", [0.1, 0.5])
def test_false_positives_add_the_requested_area_on_background(fraction):
    mask = _squares(size=8)
    radius = 3
    out = add_false_positives(mask, fraction * mask.sum(), radius, np.random.default_rng(0))
    added = (out & ~mask).sum()
    disc = np.pi * (radius + 0.5) ** 2  # the last blob may overshoot by at most one disc
    assert fraction * mask.sum() <= added <= fraction * mask.sum() + disc
    assert (out | ~mask).all()  # true objects are left alone
    rng = np.random.default_rng(0)
    assert not corrupt_mask(np.zeros((16, 16), bool), Corruption(false_positives=1.0), rng).any()


def test_miou_is_one_for_the_truth_and_falls_with_corruption():
    mask = _squares(size=8)
    rng = np.random.default_rng(0)
    scores = []
    for corruption in (Corruption(), Corruption(erode=1), Corruption(erode=2, drop=0.5)):
        out = corrupt_mask(mask, corruption, rng)
        scores.append(mean_iou(confusion(mask, out, 2)))
    assert scores[0] == 1.0 and scores[0] > scores[1] > scores[2]
    # IoU of each value, averaged: background 3/4 overlap, foreground 0 -> 0.375
    truth, pred = np.array([0, 0, 0, 1]), np.array([0, 0, 0, 0])
    assert mean_iou(confusion(truth, pred, 2)) == pytest.approx(0.375)


def test_invalid_corruption_is_refused():
    with pytest.raises(ConfigError, match="drop"):
        Corruption(drop=1.5)
    with pytest.raises(ConfigError, match="erode"):
        Corruption(erode=-1)


# --- The record of how the labels were made (ROOT/priors-run.json) -------------------------


def _unlabelled_world(synth_world, where):
    """A private copy of the CVUSA-layout synth world without its shipped prior labels."""
    shutil.copytree(synth_world("cvusa"), where)
    shutil.rmtree(where / "sat_BEV_label")
    return where


def _priors(capsys, *args):
    """`ssageo priors` through the real entry point: (exit status, stdout, stderr)."""
    from ssageo.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["priors", *map(str, args), "--backend", "oracle", "--no-progress"])
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def _labels(root):
    from ssageo.io import read_image
    from ssageo.priors import list_tiles

    return {t.rel: read_image(t.prior_path, mode="L") for t in list_tiles(root)}


def test_a_rerun_with_other_parameters_is_refused_naming_them(synth_world, tmp_path, capsys):
    world = _unlabelled_world(synth_world, tmp_path / "world")
    assert _priors(capsys, world)[0] == 0
    record = json.loads((world / "priors-run.json").read_text())
    assert record["parameters"]["backend"] == "oracle" and record["parameters"]["erode"] == 0
    from test_io_decode import png_zlib_level  # written to decode fast: level 3, no filters

    labels = (world / "sat_BEV_label").rglob("*.png")
    assert {png_zlib_level(p) for p in labels} == {(1, (0,))}
    code, out, err = _priors(capsys, world, "--erode", "1", "--seed", "4")
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1
    assert "priors-run.json" in err and "erode (0 -> 1)" in err and "seed (0 -> 4)" in err
    assert "tiles done" not in out
    code, out, _ = _priors(capsys, world)  # the same parameters: a rerun resumes (all done)
    assert code == 0 and "tiles done 0, skipped (already there) 40" in out
    code, out, _ = _priors(capsys, world, "--erode", "1", "--force")
    assert code == 0 and "tiles done 40" in out
    assert json.loads((world / "priors-run.json").read_text())["parameters"]["erode"] == 1


def test_an_unfinished_force_run_is_resumed_without_mixing_labels(synth_world, tmp_path, capsys):
    world = _unlabelled_world(synth_world, tmp_path / "world")
    assert _priors(capsys, world)[0] == 0  # labels of the uncorrupted truth
    # A --force run with other parameters that stopped after the train split's tiles: on disk
    # exactly what an interrupted one leaves (val tiles still hold the old labels).
    corrupt = ["--erode", "2", "--drop", "0.3"]
    assert _priors(capsys, world, *corrupt, "--force", "--split", "train")[0] == 0
    assert json.loads((world / "priors-run.json").read_text())["redo"] is True
    code, out, _ = _priors(capsys, world, *corrupt)  # rerun without --force
    assert code == 0 and "tiles done 8, skipped (already there) 32" in out  # the val tiles
    assert json.loads((world / "priors-run.json").read_text())["redo"] is False
    assert not (world / "priors-run.done").exists()
    clean = _unlabelled_world(synth_world, tmp_path / "clean")
    assert _priors(capsys, clean, *corrupt)[0] == 0
    resumed, expected = _labels(world), _labels(clean)
    assert all((resumed[rel] == expected[rel]).all() for rel in expected)


def test_a_label_that_cannot_be_written_stops_the_run(synth_world, tmp_path, capsys):
    world = _unlabelled_world(synth_world, tmp_path / "world")
    (world / "sat_BEV_label").write_text("a file where the labels' folder belongs")
    code, out, err = _priors(capsys, world)
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1
    assert f"{world / 'sat_BEV_label'}" in err and "cannot write" in err
    assert "mIoU" not in out and "tiles done" not in out
