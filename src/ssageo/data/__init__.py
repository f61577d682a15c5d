"""Datasets: readers for CVUSA, CVACT and VIGOR as distributed and for pairs CSVs (your own data),
registered by name; transforms, neighbour lists."""

from ssageo._lazy import lazy_exports

# Lazy (PEP 562), so that importing a light submodule (the registry, the readers) or the CLI does
# not load torch through the datasets and transforms.
_WHERE = {
    "ImageDataset": "datasets", "PairDataset": "datasets",
    "DATASETS": "manifest", "SPLITS": "manifest", "VIGOR_MODES": "manifest",
    "Manifest": "manifest", "cache_dir_for": "manifest", "detect_dataset": "manifest",
    "load_manifest": "manifest",
    "EARTH_RADIUS_M": "neighbours", "gps_neighbours": "neighbours", "haversine": "neighbours",
    "dataset_names": "registry", "get_spec": "registry",
    "IMAGENET_MEAN": "transforms", "IMAGENET_STD": "transforms", "flip_pair": "transforms",
    "geometric_augment": "transforms", "rotate_pair": "transforms",
}


__getattr__ = lazy_exports(__name__, _WHERE)


__all__ = [
    "DATASETS",
    "EARTH_RADIUS_M",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SPLITS",
    "VIGOR_MODES",
    "ImageDataset",
    "Manifest",
    "PairDataset",
    "cache_dir_for",
    "dataset_names",
    "detect_dataset",
    "flip_pair",
    "geometric_augment",
    "get_spec",
    "gps_neighbours",
    "haversine",
    "load_manifest",
    "rotate_pair",
]
