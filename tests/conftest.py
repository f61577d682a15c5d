"""Shared fixtures: small synthetic worlds in the real layouts, generated once per session.

The suite runs in one pytest-xdist worker per core, at most 4 (``-n auto --maxprocesses=4`` in
pyproject.toml). Each worker and every process it starts gets one torch thread
(``OMP_NUM_THREADS=1``, which ``train.threads: auto`` and torch both read), so tests side by
side never put more busy OpenMP threads than cores: over-subscribed OpenMP threads wait on each
other (up to ~16x slower training steps, see ``ssageo.train.distributed.cpu_threads``).
"""

import os

import pytest

if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

SYNTH_PLACES = 40
SYNTH_SAT = 64
SYNTH_PANO = (256, 64)  # (W, H)


@pytest.fixture(scope="session")
def synth_world(tmp_path_factory):
    """``synth_world(layout="cvusa", split="same-area") -> Path``: a 40-place world written by
    ``ssageo synth`` (64 px tiles, 256x64 panoramas, seed 0), made once per session.

    Treat it as read-only; copy it (``shutil.copytree``) before changing anything.
    """
    from ssageo.synth import generate

    made = {}

    def make(layout: str = "cvusa", split: str = "same-area"):
        if (layout, split) not in made:
            out = tmp_path_factory.mktemp(f"synth-{layout}-{split}") / "world"
            generate(out, layout=layout, places=SYNTH_PLACES, seed=0, sat_size=SYNTH_SAT,
                     pano_size=SYNTH_PANO, split=split)
            made[(layout, split)] = out
        return made[(layout, split)]

    return make


# Two short epochs of a small model: enough for every curve, table row and figure to be real.
TINY_RUN = ["model.backbone=convnext_atto",
            "data.workers=0", "data.query_size=[32,128]", "data.reference_size=[32,32]",
            "model.bev.grid_size=4", "model.bev.depth_bins=8", "train.epochs=2",
            "train.batch_size=16", "train.checkpoint_every=1000",
            "train.sampling.similarity=false", "eval.batch_size=32"]


@pytest.fixture(scope="session")
def tiny_run(synth_world, tmp_path_factory):
    """``{"run": Path, "world": Path}``: a real tiny SSA run (BEV head on, TINY_RUN) trained
    once per session on a copy of the synthetic CVUSA world with oracle priors (the report's
    and the local page's tests use it). Treat both as read-only."""
    import shutil

    from ssageo.config import load_config
    from ssageo.priors import list_tiles, run_priors
    from ssageo.priors.oracle import OracleBackend
    from ssageo.train.loop import train

    base = tmp_path_factory.mktemp("tiny-run")
    world = shutil.copytree(synth_world("cvusa"), base / "world")
    run_priors(list_tiles(world), OracleBackend(world), progress=False)
    train(load_config("synth-cpu", [f"data.root={world}", *TINY_RUN]), base / "ssa")
    return {"run": base / "ssa", "world": world}
