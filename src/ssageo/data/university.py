"""University-1652 as distributed: one folder per building under each view's folder.

``train/drone/<building>/image-NN.jpeg`` (several oblique drone views per building),
``train/satellite/<building>/<building>.jpg`` (one tile); ``train/street`` is not read. The
test split has ``test/query_drone`` + ``test/gallery_satellite`` (drone -> satellite) and
``test/query_satellite`` + ``test/gallery_drone`` (satellite -> drone); a gallery also holds
buildings no query shows (distractors).

Reading modes: ``drone-satellite`` (the default) and ``satellite-drone`` choose the test
direction; training pairs are the same in both (each drone image with its building's satellite
tile, as Sample4Geo trains). Each manifest carries ``reference_groups`` (the building of every
gallery image), so a query's relevant gallery images are every image of its building (several
drone images in the satellite -> drone direction); the protocol (R@k and AP) is in
docs/UNIVERSITY.md.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ssageo.data.base import DatasetSpec, Manifest, SplitUnavailable, file_problem
from ssageo.io import DataError

DRONE_SATELLITE, SATELLITE_DRONE = "drone-satellite", "satellite-drone"
MODES = (DRONE_SATELLITE, SATELLITE_DRONE)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
TRAIN = ("train/drone", "train/satellite")
# (split, mode) -> (query folder, gallery folder)
FOLDERS = {
    ("train", DRONE_SATELLITE): TRAIN,
    ("train", SATELLITE_DRONE): TRAIN,  # training pairs do not depend on the test direction
    ("test", DRONE_SATELLITE): ("test/query_drone", "test/gallery_satellite"),
    ("test", SATELLITE_DRONE): ("test/query_satellite", "test/gallery_drone"),
}
MARKERS = ("train/drone", "train/satellite", "test/query_drone", "test/gallery_satellite",
           "test/query_satellite", "test/gallery_drone")

SPEC = DatasetSpec(
    name="university", title="University-1652", splits=("train", "test"), held_out="test",
    validation=None,
    no_validation="University-1652 has no validation split: no validation during training and "
    "no model selection; use checkpoints/last (the test split is never used for selection)",
    expected="train/drone/ + train/satellite/, test/query_drone/ + test/gallery_satellite/ "
             "(one folder per building)",
    coords="gps", coords_source="none (the distributed layout has no coordinates)",
    coords_missing="{root}: the distributed layout has no coordinates",
    query="perspective", sizes={"reference": (512, 512), "query": (512, 512)}, modes=MODES,
    protocol="groups",
)


def markers(root: Path) -> list[str]:
    """The University-1652 folders present under ``root``."""
    return [rel for rel in MARKERS if (root / rel).is_dir()]


def _folders(root: Path, split: str, mode: str) -> tuple[Path, Path]:
    if split not in SPEC.splits:
        raise DataError(f"University-1652 has no '{split}' split: use 'train' or 'test' (with "
                        f"--vigor-mode {' or '.join(MODES)} for the test direction)")
    if mode not in MODES:
        raise DataError(f"unknown University-1652 reading mode '{mode}' (use "
                        f"{', '.join(MODES)})")
    query, gallery = (root / rel for rel in FOLDERS[(split, mode)])
    absent = [p for p in (query, gallery) if not p.is_dir()]
    if absent:
        raise SplitUnavailable(f"{absent[0]}: missing (University-1652 {split}, {mode})")
    return query, gallery


def sources(root: Path, split: str, mode: str) -> tuple[list[Path], list[Path]]:
    """No index files: the view folders and every building folder (their listings)."""
    folders = []
    for top in _folders(root, split, mode):
        folders += [top, *sorted(p for p in top.iterdir() if p.is_dir())]
    return [], folders


def _buildings(top: Path, notes: list[str]) -> dict[str, list[Path]]:
    """Building id -> its images (sorted by name) for one view folder. Files beside the
    building folders and non-image files are noted, never read; a building without an image
    is noted and left out."""
    out: dict[str, list[Path]] = {}
    for entry in sorted(top.iterdir()):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            notes.append(f"{entry}: not a building folder (ignored)")
            continue
        images = []
        for f in sorted(entry.iterdir()):
            if f.name.startswith("."):
                continue
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                notes.append(f"{f}: not a .jpg/.jpeg/.png image (ignored)")
                continue
            problem = file_problem(f)
            if problem:
                notes.append(problem)
            else:
                images.append(f)
        if images:
            out[entry.name] = images
        else:
            notes.append(f"{entry}: building folder without a readable image")
    return out


def _one_tile(building: str, images: list[Path]) -> Path:
    if len(images) != 1:
        raise DataError(f"{images[0].parent}: a satellite folder holds one tile per building, "
                        f"found {len(images)} images")
    return images[0]


def read(root: Path, split: str, vigor_mode: str = DRONE_SATELLITE) -> Manifest:
    """Read one split in one direction; see the module docstring."""
    query_dir, gallery_dir = _folders(root, split, vigor_mode)
    notes: list[str] = []
    queries, gallery = _buildings(query_dir, notes), _buildings(gallery_dir, notes)
    satellite_queries = query_dir.name.endswith("satellite")
    refs: list[Path] = []
    ref_groups: list[int] = []
    group_of = {b: g for g, b in enumerate(gallery)}
    first: dict[str, int] = {}  # building -> index of its first gallery image
    for b, images in gallery.items():
        if not satellite_queries:
            images = [_one_tile(b, images)]
        first[b] = len(refs)
        refs += images
        ref_groups += [group_of[b]] * len(images)
    q_paths: list[Path] = []
    q_ids: list[str] = []
    positive: list[int] = []
    skipped = 0
    for b, images in queries.items():
        if satellite_queries:
            images = [_one_tile(b, images)]
        if b not in first:
            notes.append(f"{gallery_dir / b}: missing (the gallery has no image of building {b})")
            skipped += len(images)
            continue
        q_paths += images
        q_ids += [b] * len(images)
        positive += [first[b]] * len(images)
    if not q_paths:
        raise DataError(f"{root}: University-1652 {split} ({vigor_mode}): no query building has "
                        f"gallery images (e.g. {notes[0] if notes else 'empty folders'})")
    n = len(q_paths)
    return Manifest(
        dataset="university", split=split, root=root, layout="university", vigor_mode=vigor_mode,
        query_paths=q_paths, reference_paths=refs, prior_paths=[None] * len(refs),
        positive=np.asarray(positive, dtype=np.int64), semi_positive=np.full((n, 3), -1),
        place_ids=q_ids, reference_ids=[f"{p.parent.name}/{p.stem}" if satellite_queries
                                        else p.parent.name for p in refs],
        reference_groups=np.asarray(ref_groups, dtype=np.int64), missing=notes, skipped=skipped,
    )
