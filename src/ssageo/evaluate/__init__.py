"""Evaluation: exact retrieval metrics, descriptor files, extraction, the geo index."""

from ssageo._lazy import lazy_exports

# Lazy (PEP 562): the ONNX deployment path (``locate --onnx``) imports submodules of this package
# in a process without torch, which the eager imports below would load.
_WHERE = {
    "exact_topk": "ann",
    "DescriptorSet": "descriptors", "is_descriptor_file": "descriptors",
    "load_descriptors": "descriptors", "save_descriptors": "descriptors",
    "descriptor_set": "embed", "embed_manifest": "embed", "embed_paths": "embed",
    "evaluate_model": "embed", "manifest_metrics": "embed",
    "GeoIndex": "index", "Localizer": "index", "build_index": "index",
    "is_index_file": "index", "open_index": "index",
    "haversine_m": "metrics", "one_percent_k": "metrics", "rank_queries": "metrics",
    "retrieval_metrics": "metrics",
    "ShardedIndex": "shardindex", "build_sharded": "shards", "build_tile_index": "shards",
    "dataset_tiles": "tiles", "read_tiles_csv": "tiles",
}


__getattr__ = lazy_exports(__name__, _WHERE)


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
