"""University-1652's layout for the synthetic world: buildings, drone views, satellite tiles.

Each place is a "building": its satellite tile and ``DRONE_VIEWS`` oblique drone views. A drone
view is the place's top-down render (the world's colours, its own capture's photometric shift)
seen from a random heading and tilt: rotated, then warped by a perspective that compresses the
far side, as a camera looking down at 45-70 degrees would see flat ground (building heights are
not modelled: no facades). Train/test buildings are split like the other layouts; a quarter of
the test buildings are distractors, in the galleries only. Query and gallery copies of a test
image are rendered from the same key, so they are byte-identical, as in the distributed data.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from ssageo.data.paths import truth_label_path
from ssageo.synth.layouts import Job, Plan
from ssageo.synth.places import assign_splits
from ssageo.synth.render import render_satellite
from ssageo.synth.world import World

DRONE_VIEWS = 4  # drone images per building (University-1652 has 54)
DISTRACTORS = 0.25  # share of test buildings that appear in the galleries only


def render_drone(world: World, row: int, col: int, size: int,
                 rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) uint8 oblique view of the place at (row, col); see the module docstring."""
    top, _ = render_satellite(world, row, col, size, rng)
    heading = rng.uniform(0.0, 360.0)
    zoom = rng.uniform(1.0, 1.3)  # lower flights see less ground
    turn = cv2.getRotationMatrix2D((size / 2, size / 2), heading, zoom)
    top = cv2.warpAffine(top, turn, (size, size), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_REFLECT)
    tilt = rng.uniform(0.15, 0.35)  # how much wider the far (top) edge's ground is
    pad = tilt * size
    src = np.float32([[-pad, 0], [size + pad, 0], [size, size], [0, size]])
    dst = np.float32([[0, 0], [size, 0], [size, size], [0, size]])
    warp = cv2.getPerspectiveTransform(src, dst)
    view = cv2.warpPerspective(top, warp, (size, size), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_REFLECT)
    # haze grows with distance: the far rows fade towards a light sky colour
    fade = np.linspace(0.25, 0.0, size, dtype=np.float32)[:, None, None]
    out = view.astype(np.float32) * (1 - fade) + fade * np.float32([200, 208, 218])
    return np.clip(out, 0, 255).astype(np.uint8)


def plan_university(world: World, places: np.ndarray, split: str, seed: int) -> Plan:
    """Jobs and (folder-only) index of a University-1652 copy; building ids are 1-based,
    4 digits, in place order."""
    which = assign_splits(world, places, ("train", "test"), (0.5,), split,
                          np.random.default_rng([seed, 3]))
    test = np.flatnonzero(which == 1)
    n_distract = min(int(round(len(test) * DISTRACTORS)), len(test) - 1)
    distractor = set(np.random.default_rng([seed, 5]).permutation(test)[:n_distract].tolist())
    jobs: list[Job] = []
    preview = []
    for i, (r, c) in enumerate(places.tolist()):
        b = f"{i + 1:04d}"
        sat_key, drone_keys = (0, 1, i), [(0, 2, i, k) for k in range(DRONE_VIEWS)]
        if which[i] == 0:
            sat_dirs, drone_dirs = ["train/satellite"], ["train/drone"]
        else:
            sat_dirs, drone_dirs = ["test/gallery_satellite"], ["test/gallery_drone"]
            if i not in distractor:
                sat_dirs.append("test/query_satellite")
                drone_dirs.append("test/query_drone")
        for d in sat_dirs:
            image = f"{d}/{b}/{b}.jpg"  # no SSA prior label: the BEV head is off here
            jobs.append(Job("sat", 0, r, c, image, (truth_label_path(image),), sat_key))
        for d in drone_dirs:
            jobs += [Job("drone", 0, r, c, f"{d}/{b}/image-{k + 1:02d}.jpeg", (), key)
                     for k, key in enumerate(drone_keys)]
        if len(sat_dirs) == 2 and len(preview) < 4:
            sat = f"test/gallery_satellite/{b}/{b}.jpg"
            preview.append((f"test/query_drone/{b}/image-01.jpeg", sat, truth_label_path(sat)))
    counts = {"train": int((which == 0).sum()), "test_queries": len(test) - n_distract,
              "test_distractors": n_distract, "drone_views": DRONE_VIEWS}

    def finish(out: Path) -> dict:
        return {"files": {}, "counts": counts}  # the folders are the index

    return Plan(jobs, finish, preview)
