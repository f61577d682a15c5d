"""CVACT as distributed: ``ACT_data.mat`` plus the ``ANU_data_small`` / ``ANU_data_test`` folders.

``ACT_data.mat`` holds ``panoIds`` (N), ``utm`` (N, 2) and the structs ``trainSet.trainInd``,
``valSet.valInd`` and ``valSetAll.valInd`` of **1-based** indices into ``panoIds``. Train and val
images live in ``ANU_data_small``; the test split (CVACT_test) is ``valSetAll`` restricted to the
ids whose two images are both in ``ANU_data_test``. Ids without files are reported, not hidden.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ssageo.data.base import (
    DatasetSpec,
    Manifest,
    SplitUnavailable,
    file_problem,
    find_prior,
    resolve_entry,
)
from ssageo.io import DataError

MAT_FILE = "ACT_data.mat"
# split -> (struct, index field, image folder)
SPLITS = {
    "train": ("trainSet", "trainInd", "ANU_data_small"),
    "val": ("valSet", "valInd", "ANU_data_small"),
    "test": ("valSetAll", "valInd", "ANU_data_test"),
}
MARKERS = (MAT_FILE, "ANU_data_small", "ANU_data_test")

SPEC = DatasetSpec(
    name="cvact", title="CVACT", splits=("train", "val", "test"), held_out="val",
    validation="val", no_validation="", expected="ACT_data.mat, ANU_data_small/, ANU_data_test/",
    coords="utm", coords_source="ACT_data.mat utm (easting, northing)",
    query="panorama", sizes={"reference": (1200, 1200), "query": (1664, 832)},
)


def markers(root: Path) -> list[str]:
    """The CVACT layout markers present under ``root``."""
    return [rel for rel in MARKERS if (root / rel).exists()]


def image_paths(root: Path, folder: str, pano_id: str, where: str) -> tuple[Path, Path]:
    """(satellite, panorama) paths of one CVACT id inside ``folder``."""
    sat = resolve_entry(root, f"{folder}/satview_polish/{pano_id}_satView_polish.jpg", where)
    pano = resolve_entry(root, f"{folder}/streetview/{pano_id}_grdView.jpg", where)
    return sat, pano


def sources(root: Path, split: str, vigor_mode: str) -> tuple[list[Path], list[Path]]:
    """Files whose content, and folders whose listing, determine the manifest."""
    folder = root / SPLITS[split][2]
    return [root / MAT_FILE], [folder / "satview_polish", folder / "streetview",
                               folder / "sat_BEV_label"]


def _strings(values: np.ndarray) -> list[str]:
    """Ids from a MATLAB cell array of strings or a char matrix, as loadmat returns them."""
    out = []
    for v in np.asarray(values).ravel():
        while isinstance(v, np.ndarray):  # a cell holds a (1,) string array
            v = v.ravel()[0] if v.size else ""
        out.append(str(v).strip())
    return out


def read_mat(root: Path, split: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(all pano ids, utm (N, 2), 0-based indices of ``split``) from ACT_data.mat."""
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    path = root / MAT_FILE
    if not path.is_file():
        raise DataError(f"{path}: CVACT metadata file is missing")
    struct, field, _ = SPLITS[split]
    try:
        mat = loadmat(str(path))
    except NotImplementedError:  # scipy reads up to v7; v7.3 is HDF5
        raise DataError(f"{path}: MATLAB v7.3 (HDF5) file, which ssageo does not read; re-save "
                        "it as v7 (in MATLAB or Octave: S = load('ACT_data.mat'); "
                        "save('ACT_data.mat', '-struct', 'S', '-v7'))") from None
    except (MatReadError, ValueError, OSError) as exc:
        raise DataError(f"{path}: cannot read as a MATLAB file ({exc})") from None
    absent = [k for k in ("panoIds", "utm", struct) if k not in mat]
    if absent:
        present = sorted(k for k in mat if not k.startswith("__"))
        raise DataError(f"{path}: missing key(s) {', '.join(absent)} (found: "
                        f"{', '.join(present) or 'none'}); expected panoIds, utm, trainSet, "
                        "valSet, valSetAll")
    names = mat[struct].dtype.names or ()
    if field not in names:
        raise DataError(f"{path}: struct '{struct}' has no field '{field}' (fields: "
                        f"{', '.join(names) or 'none'})")
    ids = _strings(mat["panoIds"])
    utm = np.asarray(mat["utm"], dtype=np.float64)
    if utm.shape != (len(ids), 2):
        raise DataError(f"{path}: 'utm' has shape {utm.shape}, expected ({len(ids)}, 2) "
                        "(one easting/northing per panoId)")
    raw = _indices(path, mat, struct, field)
    if raw.size == 0:
        raise DataError(f"{path}: {struct}.{field} is empty")
    # 0-based indices shift every id by one without leaving 1..N, unless some split holds a 0:
    # look at all the splits, so each split is refused, not only the one that holds the 0.
    every = {f"{st}.{fi}": _indices(path, mat, st, fi) for st, fi, _ in SPLITS.values()
              if st in mat and fi in (mat[st].dtype.names or ())}
    zero = [name for name, values in every.items() if values.size and values.min() == 0]
    if zero:
        raise DataError(f"{path}: indices look 0-based ({', '.join(zero)} hold 0); ACT_data.mat "
                        f"must hold MATLAB's 1-based indices into panoIds (1..{len(ids)})")
    if np.any(raw != np.round(raw)) or raw.min() < 1 or raw.max() > len(ids):
        raise DataError(f"{path}: {struct}.{field} must hold 1-based integer indices into "
                        f"panoIds (1..{len(ids)}), found values in [{raw.min():g}, {raw.max():g}]")
    return ids, utm, raw.astype(np.int64) - 1


def _indices(path: Path, mat: dict, struct: str, field: str) -> np.ndarray:
    """The index vector ``struct.field`` of a loaded .mat, as float64."""
    try:
        return np.asarray(mat[struct][field].ravel()[0], dtype=np.float64).ravel()
    except (TypeError, ValueError):
        raise DataError(f"{path}: {struct}.{field} is not a numeric index vector") from None


def read(root: Path, split: str, vigor_mode: str = "same-area") -> Manifest:
    """Read one CVACT split into a Manifest (ids with missing/empty files are skipped)."""
    ids, utm, index = read_mat(root, split)
    folder = SPLITS[split][2]
    if not (root / folder).is_dir():
        raise SplitUnavailable(f"{root / folder}: folder missing, so CVACT {split} cannot be "
                               "loaded" + (" (ANU_data_test is a separate download)"
                                           if split == "test" else ""))
    where = f"{root / MAT_FILE}"
    kept, missing = [], []
    for i in index:
        sat, pano = image_paths(root, folder, ids[i], f"{where}: panoIds[{i + 1}]")
        problems = [p for p in (file_problem(sat), file_problem(pano)) if p]
        if problems:
            missing.extend(problems)
        else:
            kept.append((i, sat, pano))
    if not kept:
        raise DataError(f"{root}: CVACT {split}: none of the {len(index)} ids listed in "
                        f"{MAT_FILE} has both images in {folder}/ (e.g. {missing[0]})")
    sel = np.array([i for i, _, _ in kept])
    refs = [s for _, s, _ in kept]
    place_ids = [ids[i] for i in sel]
    n = len(kept)
    return Manifest(
        dataset="cvact", split=split, root=root, layout="cvact",
        query_paths=[p for _, _, p in kept], reference_paths=refs,
        prior_paths=[find_prior(root, s) for s in refs],
        positive=np.arange(n), semi_positive=np.full((n, 3), -1),
        place_ids=place_ids, reference_ids=list(place_ids),
        utm=utm[sel], missing=missing, skipped=len(index) - n,
    )
