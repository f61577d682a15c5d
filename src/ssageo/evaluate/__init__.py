"""Evaluation: exact retrieval metrics, descriptor files, extraction, the geo index."""

from ssageo.evaluate.ann import exact_topk
from ssageo.evaluate.descriptors import (
    DescriptorSet,
    is_descriptor_file,
    load_descriptors,
    save_descriptors,
)
from ssageo.evaluate.embed import (
    descriptor_set,
    embed_manifest,
    embed_paths,
    evaluate_model,
    manifest_metrics,
)
from ssageo.evaluate.index import GeoIndex, Localizer, build_index, is_index_file, open_index
from ssageo.evaluate.metrics import haversine_m, one_percent_k, rank_queries, retrieval_metrics
from ssageo.evaluate.shards import ShardedIndex, build_sharded, build_tile_index
from ssageo.evaluate.tiles import dataset_tiles, read_tiles_csv

__all__ = [
    "DescriptorSet",
    "GeoIndex",
    "Localizer",
    "ShardedIndex",
    "build_index",
    "build_sharded",
    "build_tile_index",
    "dataset_tiles",
    "descriptor_set",
    "embed_manifest",
    "embed_paths",
    "evaluate_model",
    "exact_topk",
    "haversine_m",
    "is_descriptor_file",
    "is_index_file",
    "load_descriptors",
    "manifest_metrics",
    "one_percent_k",
    "open_index",
    "rank_queries",
    "read_tiles_csv",
    "retrieval_metrics",
    "save_descriptors",
]
