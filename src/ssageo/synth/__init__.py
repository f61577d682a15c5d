"""The synthetic cross-view world: a procedural city rendered as satellite tiles and panoramas,
written in the real CVUSA / CVACT / VIGOR layouts (``ssageo synth``)."""

from ssageo.synth.city import generate_world
from ssageo.synth.generate import GENERATOR_VERSION, LAYOUTS, SPLITS, generate, parse_size
from ssageo.synth.render import TILE_M, render_panorama, render_satellite, sat_metres_per_pixel
from ssageo.synth.world import CLASS_NAMES, World, blank_world, finish

__all__ = [
    "CLASS_NAMES", "GENERATOR_VERSION", "LAYOUTS", "SPLITS", "TILE_M", "World", "blank_world",
    "finish", "generate", "generate_world", "parse_size", "render_panorama", "render_satellite",
    "sat_metres_per_pixel",
]
