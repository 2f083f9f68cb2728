"""Procedural remote-sensing scenes with small objects: the embedded default dataset.

A scene is built in layers, all vectorised numpy on the full image: land-cover parcels (Voronoi cells with warped
borders; fields with oriented crop rows, bare soil, paved/urban, forest), roads with lane markings, a river or lake,
scattered trees, then objects and look-alike distractors with cast shadows from one sun direction, sensor noise and
an illumination gradient. Objects are small oriented shapes with plausible ground sizes at ~0.5-1 m/pixel:

================  =========================  ==============================================
class             length (HR px)             drawn as
================  =========================  ==============================================
airplane          14-56                      fuselage + swept wings + tail, light grey
ship              12-60, on water            pointed hull + superstructure
storage-tank      8-34 (diameter)            shaded disc with rim, often in tank farms
vehicle           6-13, on roads / lots      small car with windscreen, in rows in lots
tennis-court      18-36                      coloured court with white lines (flat)
swimming-pool     8-22                       rounded cyan basin with coping (flat)
================  =========================  ==============================================

Distractors (never labelled): buildings (roofs with ridge and shadow), dark round tree crowns / ponds (tank-like),
containers (vehicle-like), solar-panel arrays (pool/court-like). The labelled box is the tight axis-aligned box of the
object's rendered pixels (alpha >= 0.5), shadow excluded. Each image depends only on (seed, index), so a dataset is
reproducible and any image can be regenerated alone.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from sdconet.config import SyntheticDataConfig, config_to_dict
from sdconet.data.coco import make_annotation, write_coco
from sdconet.data.image_io import save_image
from sdconet.utils.logging import get_logger

logger = get_logger(__name__)

GENERATOR_VERSION = 1  # bump when the rendering changes, so cached datasets regenerate
SYNTHETIC_CATEGORIES = ("airplane", "ship", "storage-tank", "vehicle", "tennis-court", "swimming-pool")
CLASS_WEIGHTS = {"airplane": 0.14, "ship": 0.14, "storage-tank": 0.16, "vehicle": 0.3, "tennis-court": 0.12,
                 "swimming-pool": 0.14}
Array = np.ndarray


# --------------------------------------------------------------------------------------------------------------------
# Terrain
# --------------------------------------------------------------------------------------------------------------------
def _smooth_upsampler(size: int, cell: int) -> Array:
    """``[size, n]`` matrix interpolating an n-point grid (spacing ``cell``) with smoothstep weights."""
    position = (np.arange(size, dtype=np.float32) + 0.5) / cell
    left = np.floor(position).astype(np.int64)
    frac = position - left
    frac = frac * frac * (3 - 2 * frac)
    matrix = np.zeros((size, size // cell + 2), dtype=np.float32)
    matrix[np.arange(size), left] = 1 - frac
    matrix[np.arange(size), left + 1] = frac
    return matrix


def _fractal_noise(rng: np.random.Generator, size: int, cell: int, octaves: int) -> Array:
    """Sum of smoothly upsampled random grids (value noise), ``[size, size]`` with unit standard deviation."""
    total = np.zeros((size, size), dtype=np.float32)
    amplitude = 1.0
    for _ in range(octaves):
        cell = max(1, cell)
        upsample = _smooth_upsampler(size, cell)
        grid = rng.standard_normal((upsample.shape[1], upsample.shape[1]), dtype=np.float32)
        total += amplitude * (upsample @ grid @ upsample.T)
        amplitude *= 0.5
        cell //= 2
    return total / max(float(total.std()), 1e-6)


def _land_cover(rng: np.random.Generator, size: int, xx: Array, yy: Array) -> tuple[Array, Array]:
    """Voronoi parcels -> (rgb ``[S, S, 3]``, urban mask ``[S, S]`` bool)."""
    num_parcels = max(3, int(rng.integers(6, 16) * (size / 512) ** 2))
    warp = 10.0 * _fractal_noise(rng, size, 64, 2)
    seeds = rng.uniform(0, size, (num_parcels, 2)).astype(np.float32)
    warped_x, warped_y = xx + warp, yy - warp
    nearest = np.full((size, size), np.inf, dtype=np.float32)
    parcel = np.zeros((size, size), dtype=np.int64)
    for k, (sx, sy) in enumerate(seeds):  # Voronoi labels without a [S, S, K] distance array
        dist = (warped_x - sx) ** 2 + (warped_y - sy) ** 2
        closer = dist < nearest
        nearest[closer] = dist[closer]
        parcel[closer] = k
    # parcel kinds: 0 field, 1 bare soil, 2 urban/paved, 3 forest
    kind = rng.choice(4, num_parcels, p=[0.45, 0.15, 0.22, 0.18])
    palettes = {0: [(0.33, 0.45, 0.20), (0.55, 0.52, 0.28), (0.42, 0.50, 0.25), (0.62, 0.58, 0.38)],
                1: [(0.52, 0.43, 0.32), (0.60, 0.50, 0.38)],
                2: [(0.50, 0.50, 0.50), (0.58, 0.56, 0.54), (0.44, 0.45, 0.47)],
                3: [(0.14, 0.26, 0.12), (0.18, 0.30, 0.14)]}
    colors = np.array([palettes[k][rng.integers(len(palettes[k]))] for k in kind], dtype=np.float32)
    colors *= rng.uniform(0.9, 1.1, (num_parcels, 1)).astype(np.float32)
    angle = rng.uniform(0, np.pi, num_parcels).astype(np.float32)
    period = rng.uniform(4, 11, num_parcels).astype(np.float32)
    stripe_amp = np.where(kind == 0, 0.07, 0.0).astype(np.float32)
    texture_amp = np.array([0.04, 0.08, 0.05, 0.25], dtype=np.float32)[kind]
    stripes = np.sin(2 * np.pi * (xx * np.cos(angle[parcel]) + yy * np.sin(angle[parcel])) / period[parcel])
    fine = _fractal_noise(rng, size, 8, 3)
    shade = 1.0 + stripe_amp[parcel] * stripes + texture_amp[parcel] * fine
    rgb = colors[parcel] * shade[..., None]
    border = np.zeros((size, size), dtype=bool)  # hedges / tracks between parcels
    border[:, 1:] |= parcel[:, 1:] != parcel[:, :-1]
    border[1:, :] |= parcel[1:, :] != parcel[:-1, :]
    rgb[border] *= 0.8
    return rgb, kind[parcel] == 2


@dataclass
class _Road:
    x: float
    y: float
    angle: float
    width: float


def _roads(rng: np.random.Generator, size: int, xx: Array, yy: Array, rgb: Array) -> tuple[list[_Road], Array]:
    """Straight roads with lane markings painted into ``rgb`` -> (roads, road mask)."""
    roads = []
    mask = np.zeros((size, size), dtype=bool)
    for _ in range(int(rng.integers(0, 4))):
        angle = float(rng.choice([0.0, np.pi / 2]) + rng.normal(0, 0.15)) if rng.random() < 0.7 \
            else float(rng.uniform(0, np.pi))
        road = _Road(float(rng.uniform(0.1, 0.9) * size), float(rng.uniform(0.1, 0.9) * size), angle,
                     float(rng.uniform(6, 14)))
        across = (xx - road.x) * np.sin(angle) - (yy - road.y) * np.cos(angle)
        along = (xx - road.x) * np.cos(angle) + (yy - road.y) * np.sin(angle)
        alpha = np.clip(road.width / 2 - np.abs(across) + 0.5, 0, 1)[..., None]
        asphalt = np.float32(rng.uniform(0.28, 0.4))
        rgb[:] = rgb * (1 - alpha) + asphalt * alpha
        marking = (np.abs(across) < 0.6) & (np.sin(along / 3.0) > 0.2)
        rgb[marking] = 0.8
        mask |= np.abs(across) < road.width / 2
        roads.append(road)
    return roads, mask


def _water(rng: np.random.Generator, size: int, xx: Array, yy: Array, rgb: Array) -> Array:
    """A river (sinuous band) or lake (noise blob) painted into ``rgb`` -> water mask."""
    roll = rng.random()
    if roll < 0.45:
        angle = rng.uniform(0, np.pi)
        across = (xx - size / 2) * np.sin(angle) - (yy - size / 2) * np.cos(angle)
        along = (xx - size / 2) * np.cos(angle) + (yy - size / 2) * np.sin(angle)
        offset = rng.uniform(-0.3, 0.3) * size
        centre = offset + rng.uniform(10, 40) * np.sin(2 * np.pi * along / rng.uniform(150, 400) + rng.uniform(0, 6))
        signed = rng.uniform(25, 70) - np.abs(across - centre)
    elif roll < 0.75:
        signed = 12.0 * (_fractal_noise(rng, size, 128, 2) - rng.uniform(0.6, 1.0))
    else:
        return np.zeros((size, size), dtype=bool)
    alpha = np.clip(signed + 0.5, 0, 1)[..., None]
    tint = np.array([0.10, 0.20, 0.27], dtype=np.float32) * rng.uniform(0.85, 1.2)
    ripple = 1.0 + 0.06 * _fractal_noise(rng, size, 4, 2)[..., None]
    shore = (np.abs(signed) < 2.5)[..., None] * 0.15  # light sand band
    rgb[:] = (rgb + shore) * (1 - alpha) + tint * ripple * alpha
    return signed > 0


def _trees(rng: np.random.Generator, size: int, rgb: Array, free: Array) -> None:
    """Scattered tree crowns (clutter) on free land."""
    density = rng.uniform(0.0005, 0.004)
    points = (rng.random((size, size)) < density) & free
    crowns = ndimage.gaussian_filter(points.astype(np.float32), sigma=rng.uniform(1.2, 2.2))
    alpha = np.clip(crowns / max(float(crowns.max()), 1e-6) * 3.0, 0, 1)[..., None]
    rgb[:] = rgb * (1 - 0.75 * alpha) + np.array([0.10, 0.22, 0.08], dtype=np.float32) * 0.75 * alpha


# --------------------------------------------------------------------------------------------------------------------
# Shapes: signed distances in the object frame (u along the length, v across), negative inside
# --------------------------------------------------------------------------------------------------------------------
def _box(u: Array, v: Array, half_length: float, half_width: float) -> Array:
    return np.maximum(np.abs(u) - half_length, np.abs(v) - half_width)


def _rounded_box(u: Array, v: Array, half_length: float, half_width: float, radius: float) -> Array:
    qu, qv = np.abs(u) - (half_length - radius), np.abs(v) - (half_width - radius)
    outside = np.hypot(np.maximum(qu, 0), np.maximum(qv, 0))
    return outside + np.minimum(np.maximum(qu, qv), 0) - radius


def _coverage(sdf: Array) -> Array:
    """Anti-aliased coverage from a signed distance (pixel units)."""
    return np.clip(0.5 - sdf, 0.0, 1.0)


@dataclass
class _Spec:
    """One object or distractor to draw; ``height`` (px) sets the shadow length."""

    kind: str
    length: float
    width: float
    height: float
    color: Array
    labelled: bool


def _draw_airplane(u: Array, v: Array, s: _Spec) -> tuple[Array, Array]:
    length = s.length
    fuselage = _box(u, v, length / 2, max(0.8, 0.06 * length))
    wings = _box(u - 0.05 * length + 0.3 * np.abs(v), v, 0.09 * length, 0.45 * length)
    tail = _box(u + 0.42 * length - 0.25 * np.abs(v), v, 0.05 * length, 0.17 * length)
    sdf = np.minimum(np.minimum(fuselage, wings), tail)
    shade = 1.0 - 0.12 * np.abs(v) / (0.45 * length)
    return sdf, s.color * shade[..., None]


def _draw_ship(u: Array, v: Array, s: _Spec) -> tuple[Array, Array]:
    half_length, half_width = s.length / 2, s.width / 2
    bow = 1.5 * s.width
    taper = np.clip((half_length - u) / bow, 0, 1)
    sdf = np.maximum(np.abs(u) - half_length, np.abs(v) - half_width * taper)
    deck = s.color * (1.0 - 0.2 * (np.abs(v) / half_width))[..., None]
    bridge = _box(u + 0.2 * s.length, v, 0.1 * s.length, 0.6 * half_width) < 0
    deck[bridge] = np.clip(s.color * 1.35 + 0.1, 0, 1)
    return sdf, deck


def _draw_tank(u: Array, v: Array, s: _Spec) -> tuple[Array, Array]:
    radius = s.length / 2
    rho = np.hypot(u, v)
    shade = 1.0 - 0.25 * (rho / radius) ** 2 - 0.08 * (u / radius)
    rim = (rho > radius - 1.2)
    color = s.color * shade[..., None]
    color[rim] *= 0.75
    color[rho < max(0.8, 0.12 * radius)] *= 0.8
    return rho - radius, color


def _draw_vehicle(u: Array, v: Array, s: _Spec) -> tuple[Array, Array]:
    sdf = _rounded_box(u, v, s.length / 2, s.width / 2, min(1.0, s.width / 3))
    color = np.broadcast_to(s.color, u.shape + (3,)).copy()
    windscreen = (u > 0.12 * s.length) & (u < 0.28 * s.length)
    color[windscreen] = 0.12
    return sdf, color


def _draw_court(u: Array, v: Array, s: _Spec) -> tuple[Array, Array]:
    half_length, half_width = s.length / 2, s.width / 2
    sdf = _box(u, v, half_length, half_width)
    inner = _box(u, v, 0.8 * half_length, 0.75 * half_width)
    lines = (np.abs(inner) < 0.5) | ((np.abs(u) < 0.4) & (inner < 0)) | \
            ((np.abs(np.abs(u) - 0.45 * half_length) < 0.4) & (inner < 0))
    color = np.broadcast_to(s.color, u.shape + (3,)).copy()
    color[lines] = 0.92
    return sdf, color


def _draw_pool(u: Array, v: Array, s: _Spec) -> tuple[Array, Array]:
    sdf = _rounded_box(u, v, s.length / 2, s.width / 2, min(s.width / 2, 3.0))
    color = s.color * (1.0 + 0.15 * (u / s.length))[..., None]
    color[sdf > -1.0] = 0.9  # coping
    return sdf, color


def _draw_building(u: Array, v: Array, s: _Spec) -> tuple[Array, Array]:
    sdf = _box(u, v, s.length / 2, s.width / 2)
    color = s.color * np.where(v > 0, 1.0, 0.8)[..., None]  # pitched roof: one face in shade
    return sdf, color


def _draw_crown(u: Array, v: Array, s: _Spec) -> tuple[Array, Array]:
    rho = np.hypot(u, v)
    return rho - s.length / 2, s.color * (1.0 - 0.3 * (rho / (s.length / 2)))[..., None]


def _draw_container(u: Array, v: Array, s: _Spec) -> tuple[Array, Array]:
    sdf = _box(u, v, s.length / 2, s.width / 2)
    ribs = 1.0 - 0.1 * (np.sin(u * 2.5) > 0)
    return sdf, s.color * ribs[..., None]


def _draw_solar(u: Array, v: Array, s: _Spec) -> tuple[Array, Array]:
    sdf = _box(u, v, s.length / 2, s.width / 2)
    grid = (np.abs(np.sin(u * 1.6)) < 0.25) | (np.abs(np.sin(v * 1.6)) < 0.25)
    color = np.broadcast_to(s.color, u.shape + (3,)).copy()
    color[grid] = 0.55
    return sdf, color


_DRAW: dict[str, Callable[[Array, Array, _Spec], tuple[Array, Array]]] = {
    "airplane": _draw_airplane, "ship": _draw_ship, "storage-tank": _draw_tank, "vehicle": _draw_vehicle,
    "tennis-court": _draw_court, "swimming-pool": _draw_pool, "building": _draw_building, "crown": _draw_crown,
    "container": _draw_container, "solar": _draw_solar,
}
_CAR_COLORS = [(0.92, 0.92, 0.92), (0.08, 0.08, 0.09), (0.65, 0.66, 0.68), (0.7, 0.1, 0.1), (0.12, 0.2, 0.55),
               (0.3, 0.32, 0.3)]
_HULL_COLORS = [(0.85, 0.85, 0.85), (0.55, 0.55, 0.58), (0.5, 0.15, 0.12), (0.15, 0.25, 0.45)]
_COURT_COLORS = [(0.2, 0.5, 0.3), (0.2, 0.35, 0.6), (0.65, 0.35, 0.22)]


def _sample_spec(rng: np.random.Generator, kind: str) -> _Spec:
    """Size, colour and height of one object/distractor of ``kind``."""
    def pick(colors: list) -> Array:
        return np.array(colors[rng.integers(len(colors))], dtype=np.float32) * np.float32(rng.uniform(0.9, 1.1))

    if kind == "airplane":
        length = rng.uniform(14, 56)
        return _Spec(kind, length, 0.9 * length, 0.2 * length, np.float32(rng.uniform(0.8, 0.95)) *
                     np.array([1.0, 1.0, 1.02], dtype=np.float32), True)
    if kind == "ship":
        length = rng.uniform(12, 60)
        return _Spec(kind, length, length * rng.uniform(0.18, 0.26), 0.15 * length, pick(_HULL_COLORS), True)
    if kind == "storage-tank":
        diameter = rng.uniform(8, 34)
        return _Spec(kind, diameter, diameter, 0.5 * diameter,
                     np.full(3, rng.uniform(0.75, 0.92), dtype=np.float32), True)
    if kind == "vehicle":
        length = rng.uniform(6, 13)
        return _Spec(kind, length, length * rng.uniform(0.42, 0.5), 0.35 * length * 0.5, pick(_CAR_COLORS), True)
    if kind == "tennis-court":
        length = rng.uniform(18, 36)
        return _Spec(kind, length, 0.5 * length, 0.0, pick(_COURT_COLORS), True)
    if kind == "swimming-pool":
        length = rng.uniform(8, 22)
        return _Spec(kind, length, length * rng.uniform(0.45, 0.7), 0.0,
                     np.array([0.3, 0.72, 0.85], dtype=np.float32) * np.float32(rng.uniform(0.9, 1.1)), True)
    if kind == "building":
        length = rng.uniform(8, 34)
        return _Spec(kind, length, length * rng.uniform(0.4, 1.0), rng.uniform(3, 10),
                     pick([(0.6, 0.35, 0.3), (0.55, 0.55, 0.55), (0.7, 0.68, 0.62), (0.4, 0.3, 0.25)]), False)
    if kind == "crown":
        diameter = rng.uniform(8, 24)
        return _Spec(kind, diameter, diameter, 0.4 * diameter,
                     pick([(0.12, 0.25, 0.1), (0.08, 0.15, 0.12), (0.25, 0.22, 0.15)]), False)
    if kind == "container":
        length = rng.uniform(9, 16)
        return _Spec(kind, length, length * rng.uniform(0.3, 0.4), 2.0,
                     pick([(0.6, 0.25, 0.15), (0.15, 0.3, 0.55), (0.85, 0.85, 0.8), (0.25, 0.45, 0.3)]), False)
    if kind == "solar":
        length = rng.uniform(12, 30)
        return _Spec(kind, length, length * rng.uniform(0.3, 0.6), 0.5, pick([(0.1, 0.12, 0.25)]), False)
    raise ValueError(f"unknown shape kind '{kind}'")


# --------------------------------------------------------------------------------------------------------------------
# Scene
# --------------------------------------------------------------------------------------------------------------------
class _Scene:
    """Draws shapes into an image, keeps an occupancy map so shapes never overlap, records labelled boxes."""

    def __init__(self, rgb: Array, sun_angle: float) -> None:
        self.rgb = rgb
        self.size = rgb.shape[0]
        self.occupied = np.zeros(rgb.shape[:2], dtype=bool)
        self.sun = (math.cos(sun_angle), math.sin(sun_angle))
        self.boxes: list[tuple[str, tuple[int, int, int, int]]] = []

    def place(self, spec: _Spec, cx: float, cy: float, angle: float) -> bool:
        """Draw ``spec`` centred at (cx, cy) rotated by ``angle`` if it fits inside the image on free ground."""
        reach = 0.5 * math.hypot(spec.length, spec.width) + 1.5
        shadow = (spec.height * self.sun[0], spec.height * self.sun[1])
        x0 = int(math.floor(cx - reach + min(0.0, shadow[0])))
        y0 = int(math.floor(cy - reach + min(0.0, shadow[1])))
        x1 = int(math.ceil(cx + reach + max(0.0, shadow[0])))
        y1 = int(math.ceil(cy + reach + max(0.0, shadow[1])))
        body = (int(cx - reach) - 1, int(cy - reach) - 1, int(cx + reach) + 2, int(cy + reach) + 2)
        if body[0] < 1 or body[1] < 1 or body[2] > self.size - 1 or body[3] > self.size - 1:
            return False
        if self.occupied[body[1]:body[3], body[0]:body[2]].any():
            return False
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, self.size), min(y1, self.size)
        ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
        cos, sin = math.cos(angle), math.sin(angle)

        def frame(dx: float, dy: float) -> tuple[Array, Array]:
            px, py = xs - cx - dx, ys - cy - dy
            return px * cos + py * sin, -px * sin + py * cos

        draw = _DRAW[spec.kind]
        sdf, color = draw(*frame(0.0, 0.0), spec)
        alpha = _coverage(sdf)
        rows, cols = np.nonzero(alpha >= 0.5)
        if len(rows) == 0:  # too thin to be visible: neither drawn nor labelled
            return False
        window = self.rgb[y0:y1, x0:x1]
        if spec.height > 0:
            shadow_alpha = _coverage(draw(*frame(*shadow), spec)[0])[..., None]
            window *= 1.0 - 0.5 * shadow_alpha
        window[:] = window * (1 - alpha[..., None]) + np.clip(color, 0, 1) * alpha[..., None]
        self.occupied[body[1]:body[3], body[0]:body[2]] = True
        if spec.labelled:
            self.boxes.append((spec.kind, (x0 + int(cols.min()), y0 + int(rows.min()),
                                           x0 + int(cols.max()) + 1, y0 + int(rows.max()) + 1)))
        return True


def _random_point(rng: np.random.Generator, mask: Optional[Array], size: int) -> tuple[float, float]:
    """A uniform point inside ``mask`` (anywhere when None or empty)."""
    if mask is not None:
        flat = np.flatnonzero(mask)
        if len(flat):
            index = int(flat[rng.integers(len(flat))])
            return index % size + rng.random(), index // size + rng.random()
    return rng.uniform(0, size), rng.uniform(0, size)


def render_scene(rng: np.random.Generator, size: int, num_objects: int, num_distractors: int,
                 class_weights: Optional[dict[str, float]] = None, extent: Optional[tuple[int, int]] = None
                 ) -> tuple[Array, list[tuple[str, tuple[int, int, int, int]]]]:
    """One synthetic HR image -> (``[size, size, 3]`` uint8, [(class name, (x1, y1, x2, y2)), ...]).

    ``class_weights`` (default ``CLASS_WEIGHTS``) sets which classes are drawn and how often; ``extent`` =
    (height, width) keeps every object and distractor inside that top-left part, so the image can be cropped to it
    without cutting one (the large-scene generator's non-square tiles)."""
    class_weights = CLASS_WEIGHTS if class_weights is None else class_weights
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    rgb, urban = _land_cover(rng, size, xx, yy)
    roads, road_mask = _roads(rng, size, xx, yy, rgb)
    water = _water(rng, size, xx, yy, rgb)
    land = ~water & ~road_mask
    _trees(rng, size, rgb, land & ~urban)
    scene = _Scene(rgb, sun_angle=float(rng.uniform(0, 2 * np.pi)))
    if extent is not None:  # shapes are only placed on unoccupied ground
        scene.occupied[extent[0]:, :] = True
        scene.occupied[:, extent[1]:] = True
    deep_water = ndimage.distance_transform_edt(water) if water.any() else None

    for _ in range(num_distractors):
        kind = str(rng.choice(["building", "building", "crown", "container", "solar"]))
        spec = _sample_spec(rng, kind)
        where = urban & land if kind == "building" and (urban & land).any() else land
        for _attempt in range(10):
            cx, cy = _random_point(rng, where, size)
            if scene.place(spec, cx, cy, float(rng.uniform(0, np.pi))):
                break

    kinds = list(class_weights)
    weights = np.array([class_weights[k] for k in kinds])
    placed = 0
    for _ in range(num_objects * 3):  # allow for rejections; groups may place several at once
        if placed >= num_objects:
            break
        kind = str(rng.choice(kinds, p=weights / weights.sum()))
        spec = _sample_spec(rng, kind)
        placed += _place_object(rng, scene, spec, roads, land, deep_water, size, num_objects - placed)
    if not scene.boxes:  # every image carries at least one object: the smallest kind fits almost anywhere
        for _attempt in range(200):
            cx, cy = rng.uniform(0, size, 2)
            fallback = "vehicle" if "vehicle" in class_weights else kinds[0]
            if scene.place(_sample_spec(rng, fallback), cx, cy, float(rng.uniform(0, np.pi))):
                break

    illumination = 1.0 + 0.08 * (xx * scene.sun[0] + yy * scene.sun[1]) / size
    noisy = rgb * illumination[..., None] + 0.012 * rng.standard_normal(rgb.shape, dtype=np.float32)
    return (np.clip(noisy, 0, 1) * 255).round().astype(np.uint8), scene.boxes


def _place_object(rng: np.random.Generator, scene: _Scene, spec: _Spec, roads: list[_Road], land: Array,
                  deep_water: Optional[Array], size: int, budget: int) -> int:
    """Place one object (or a row/grid group for tanks and parked vehicles) in its context -> number placed."""
    angle = float(rng.uniform(0, np.pi))
    if spec.kind == "ship":
        if deep_water is None:
            return 0
        clearance = max(spec.width, 0.5 * spec.length)
        cx, cy = _random_point(rng, deep_water > clearance, size)
        if deep_water[min(int(cy), size - 1), min(int(cx), size - 1)] <= clearance:
            return 0
        return int(scene.place(spec, cx, cy, angle))
    if spec.kind == "vehicle" and roads and rng.random() < 0.6:
        road = roads[int(rng.integers(len(roads)))]
        along = rng.uniform(-size, size)
        lane = rng.choice([-1.0, 1.0]) * road.width / 4
        cx = road.x + along * math.cos(road.angle) - lane * math.sin(road.angle)
        cy = road.y + along * math.sin(road.angle) + lane * math.cos(road.angle)
        return int(scene.place(spec, cx, cy, road.angle + (np.pi if lane < 0 else 0.0)))
    cx, cy = _random_point(rng, land, size)
    if spec.kind in ("vehicle", "storage-tank") and rng.random() < 0.5:  # parking rows / tank farms
        rows, cols = int(rng.integers(1, 3)), int(rng.integers(2, 5))
        step_u = spec.width * 1.8 if spec.kind == "vehicle" else spec.length * 1.35
        step_v = spec.length * 1.4 if spec.kind == "vehicle" else spec.length * 1.35
        placed = 0
        for r in range(rows):
            for c in range(cols):
                if placed >= budget:
                    return placed
                du, dv = c * step_u, r * step_v
                x = cx + du * math.cos(angle) - dv * math.sin(angle)
                y = cy + du * math.sin(angle) + dv * math.cos(angle)
                member = _sample_spec(rng, spec.kind) if spec.kind == "vehicle" else spec
                placed += int(scene.place(member, x, y, angle + np.pi / 2 if spec.kind == "vehicle" else angle))
        return placed
    return int(scene.place(spec, cx, cy, angle))


# --------------------------------------------------------------------------------------------------------------------
# Dataset files
# --------------------------------------------------------------------------------------------------------------------
def generate_synthetic_dataset(out_dir: str | Path, cfg: SyntheticDataConfig, progress: bool = True) -> dict:
    """Write ``images/{train,val}/*.png`` and ``annotations/{train,val}.json`` under ``out_dir`` -> summary dict.

    The last ``round(num_images * val_fraction)`` images form the validation split (images are i.i.d.).
    """
    if cfg.num_images < 1:
        raise ValueError(f"synthetic num_images must be >= 1, got {cfg.num_images}")
    if cfg.image_size < 32:
        raise ValueError(f"synthetic image_size must be >= 32, got {cfg.image_size}")
    out_dir = Path(out_dir)
    num_val = min(cfg.num_images - 1, round(cfg.num_images * cfg.val_fraction)) if cfg.val_fraction > 0 else 0
    if cfg.val_fraction > 0 and cfg.num_images > 1:
        num_val = max(1, num_val)
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(SYNTHETIC_CATEGORIES)]
    category_ids = {c["name"]: c["id"] for c in categories}
    splits: dict[str, tuple[list, list]] = {"train": ([], []), "val": ([], [])}
    ann_id = 1
    for index in tqdm(range(cfg.num_images), desc="synthetic images", disable=not progress, unit="img"):
        rng = np.random.default_rng([cfg.seed, index])
        num_objects = int(rng.integers(cfg.objects_per_image[0], cfg.objects_per_image[1] + 1))
        num_distractors = int(rng.integers(cfg.distractors_per_image[0], cfg.distractors_per_image[1] + 1))
        image, boxes = render_scene(rng, cfg.image_size, num_objects, num_distractors)
        split = "val" if index >= cfg.num_images - num_val else "train"
        file_name = f"{index:06d}.png"
        save_image(image, out_dir / "images" / split / file_name)
        images, annotations = splits[split]
        images.append({"id": index + 1, "file_name": file_name, "width": cfg.image_size, "height": cfg.image_size})
        for name, box in boxes:
            annotations.append(make_annotation(ann_id, index + 1, category_ids[name], box))
            ann_id += 1
    summary = {"generator_version": GENERATOR_VERSION, "config": config_to_dict(cfg)}
    for split, (images, annotations) in splits.items():
        if images:
            write_coco(out_dir / "annotations" / f"{split}.json", images, annotations, categories,
                       f"sdconet synthetic remote-sensing dataset v{GENERATOR_VERSION} ({split})")
        summary[split] = {"images": len(images), "boxes": len(annotations)}
    (out_dir / "synthetic.json").write_text(json.dumps(summary, indent=2))
    return summary


def synthetic_cache_key(cfg: SyntheticDataConfig) -> str:
    """Short hash of the settings and the generator version: a change of either regenerates the cache."""
    text = json.dumps({"version": GENERATOR_VERSION, "config": config_to_dict(cfg)}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def ensure_synthetic_dataset(cfg: SyntheticDataConfig, cache_dir: str | Path) -> Path:
    """The synthetic dataset folder for ``cfg`` under ``cache_dir``, generated on first use.

    Generation writes into a private temporary folder and renames it into place, so concurrent processes (DDP ranks,
    two runs) never see a half-written dataset: the first rename wins, the others discard their copy.
    """
    cache_dir = Path(cache_dir)
    target = cache_dir / f"synthetic-{synthetic_cache_key(cfg)}"
    if target.is_dir():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    logger.info("generating the synthetic dataset (%d images of %dx%d px) into %s", cfg.num_images, cfg.image_size,
                cfg.image_size, target)
    try:
        generate_synthetic_dataset(tmp, cfg)
        os.rename(tmp, target)
    except OSError:
        if not target.is_dir():
            raise
        logger.info("another process generated %s first; using it", target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
