"""Datasets: readers for CVUSA, CVACT and VIGOR as distributed, transforms, neighbour lists."""
