"""Shared fixtures: small synthetic worlds in the real layouts, generated once per session."""

import pytest

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
