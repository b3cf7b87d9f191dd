"""Shape geometry: inside tests in an object's own frame, enclosing radii and unit areas.

Coordinates (u, v) are offsets from the object's centre divided by its size, v pointing down
the image. Every shape is centred on its area centroid, so the oracle reads an object's
position straight off the centroid of its pixels.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

_SQRT3 = np.sqrt(3.0)


def _star(u, v):
    # a five-pointed star as a polar profile: radius falls linearly from tip (0.5) to notch (0.22)
    angle = np.arctan2(u, -v)  # 0 at the top tip
    phase = np.abs(((angle / (2 * np.pi / 5)) % 1.0) - 0.5) * 2  # 1 at tips, 0 at notches
    return np.hypot(u, v) <= 0.22 + 0.28 * phase


INSIDE = {
    "circle": lambda u, v: u * u + v * v <= 0.25,
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.4,
    # equilateral, pointing up, width 1, centroid at the origin: inradius 1 / (2 sqrt 3)
    "triangle": lambda u, v: (v <= 0.5 / _SQRT3) & (_SQRT3 / 2 * u - v / 2 <= 0.5 / _SQRT3)
    & (-_SQRT3 / 2 * u - v / 2 <= 0.5 / _SQRT3),
    "diamond": lambda u, v: np.abs(u) + np.abs(v) <= 0.5,
    "cross": lambda u, v: ((np.abs(u) <= 0.17) & (np.abs(v) <= 0.5)) | ((np.abs(v) <= 0.17) & (np.abs(u) <= 0.5)),
    "hexagon": lambda u, v: (np.abs(v) <= _SQRT3 / 4) & (_SQRT3 * np.abs(u) + np.abs(v) <= _SQRT3 / 2),
    "star": _star,
}

# Radius of the circle around the centre that holds the whole shape, per unit size.
ENCLOSING_RADIUS = {
    "circle": 0.5, "square": 0.4 * np.sqrt(2), "triangle": 1 / _SQRT3, "diamond": 0.5,
    "cross": float(np.hypot(0.5, 0.17)), "hexagon": 0.5, "star": 0.5,
}


def inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask: which points (u, v), in units of the object's size, lie in the shape."""
    try:
        return INSIDE[shape](u, v)
    except KeyError:
        raise ValueError(f"shape={shape!r} is unknown; use one of {tuple(INSIDE)}.") from None


@lru_cache(maxsize=None)
def unit_area(shape: str) -> float:
    """Area of the shape at size 1 (measured once on a fine grid)."""
    grid = (np.arange(2000) + 0.5) / 2000 - 0.5
    u, v = np.meshgrid(grid, grid)
    return float(inside(shape, u, v).mean())


def coverage(shape: str, x: float, y: float, size: float, resolution: int, supersample: int) -> np.ndarray:
    """Fraction of each pixel (H, W) covered by the shape: supersampled, then box-averaged."""
    n = resolution * supersample
    centres = (np.arange(n) + 0.5) / n
    u = (centres[None, :] - x) / size
    v = (centres[:, None] - y) / size
    hits = inside(shape, u, v).astype(np.float32)
    return hits.reshape(resolution, supersample, resolution, supersample).mean(axis=(1, 3))
