"""Evaluation: exact retrieval metrics, descriptor files, extraction, the geo index."""
