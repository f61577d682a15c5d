"""Datasets: readers for CVUSA, CVACT and VIGOR as distributed and for pairs CSVs (your own data),
registered by name; transforms, neighbour lists."""

from ssageo.data.datasets import ImageDataset, PairDataset
from ssageo.data.manifest import (
    DATASETS,
    SPLITS,
    VIGOR_MODES,
    Manifest,
    cache_dir_for,
    detect_dataset,
    load_manifest,
)
from ssageo.data.neighbours import EARTH_RADIUS_M, gps_neighbours, haversine
from ssageo.data.registry import dataset_names, get_spec
from ssageo.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    flip_pair,
    geometric_augment,
    rotate_pair,
)

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
