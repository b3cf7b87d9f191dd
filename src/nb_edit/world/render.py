"""Deterministic, anti-aliased rendering of a scene to a uint8 (H, W, 3) image.

Each object's coverage is computed on a grid ``supersample`` times finer and box-averaged
(anti-aliasing), then composited over the background. Textures are pixel-aligned patterns
whose "off" pixels mix the object colour half-way with the background, so a textured object
stays one connected blob. The style (grayscale, colour negative) is applied to the finished
image, as a global photo filter would be.
"""

from __future__ import annotations

import numpy as np

from .config import BACKGROUND_COLOURS, LUMA, OBJECT_COLOURS, WorldConfig
from .scene import Obj, Scene
from .shapes import coverage

STRIPE_MIX = 0.5  # weight of the object colour in a texture's "off" pixels
GRID_MIX = 0.2  # how far a background grid line moves toward black (light bg) or white (dark bg)


def texture_pattern(texture: str, resolution: int) -> np.ndarray:
    """(H, W) float map: 1 where the object shows its full colour, STRIPE_MIX elsewhere."""
    half = max(1, resolution // 16)  # stripes 2 px wide at 32 px
    rows, cols = np.mgrid[0:resolution, 0:resolution] // half
    if texture == "solid":
        on = np.ones((resolution, resolution), bool)
    elif texture == "striped":
        on = rows % 2 == 0
    elif texture == "checked":
        on = (rows + cols) % 2 == 0
    else:
        raise ValueError(f"texture={texture!r} is unknown; use solid, striped or checked.")
    return np.where(on, 1.0, STRIPE_MIX)


def grid_line_colour(background: str) -> np.ndarray:
    """RGB of a grid line on this background: a step toward black (light bg) or white (dark bg)."""
    colour = np.array(BACKGROUND_COLOURS[background], dtype=np.float64)
    contrast = 0.0 if colour @ LUMA > 128 else 255.0
    return (1 - GRID_MIX) * colour + GRID_MIX * contrast


def background_map(background: str, bg_texture: str, resolution: int) -> np.ndarray:
    """(H, W, 3) float background before objects: a colour, optionally with grid lines."""
    colour = np.array(BACKGROUND_COLOURS[background], dtype=np.float64)
    image = np.broadcast_to(colour, (resolution, resolution, 3)).copy()
    if bg_texture == "grid":
        period = max(4, resolution // 4)
        lines = (np.arange(resolution) % period) == period // 2
        mask = lines[:, None] | lines[None, :]
        image[mask] = grid_line_colour(background)
    elif bg_texture != "plain":
        raise ValueError(f"bg_texture={bg_texture!r} is unknown; use plain or grid.")
    return image


def apply_style(image: np.ndarray, style: str) -> np.ndarray:
    """The global filter on a float RGB image in [0, 255]."""
    if style == "normal":
        return image
    if style == "grayscale":
        return np.repeat((image @ LUMA)[..., None], 3, axis=-1)
    if style == "invert":
        return 255.0 - image
    raise ValueError(f"style={style!r} is unknown; use normal, grayscale or invert.")


def object_layer(obj: Obj, background: str, cfg: WorldConfig) -> tuple[np.ndarray, np.ndarray]:
    """(alpha (H, W), colour (H, W, 3)) of one object, textured, before compositing."""
    res = cfg.resolution
    alpha = coverage(obj.shape, obj.x, obj.y, obj.size, res, cfg.supersample)
    weight = texture_pattern(obj.texture, res)[..., None]
    colour = np.array(OBJECT_COLOURS[obj.colour], dtype=np.float64)
    bg = np.array(BACKGROUND_COLOURS[background], dtype=np.float64)
    return alpha, weight * colour + (1 - weight) * bg


def render_float(scene: Scene, cfg: WorldConfig) -> np.ndarray:
    """The scene as float RGB (H, W, 3) in [0, 255], before rounding."""
    image = background_map(scene.background, scene.bg_texture, cfg.resolution)
    for obj in scene.objects:
        alpha, colour = object_layer(obj, scene.background, cfg)
        image = image * (1 - alpha[..., None]) + colour * alpha[..., None]
    return apply_style(image, scene.style)


def render(scene: Scene, cfg: WorldConfig) -> np.ndarray:
    """The scene as a uint8 (H, W, 3) image; the same scene always gives the same pixels."""
    if scene.background not in BACKGROUND_COLOURS:
        raise ValueError(f"Scene.background={scene.background!r} is unknown; use one of "
                         f"{tuple(BACKGROUND_COLOURS)}.")
    for obj in scene.objects:
        if obj.colour not in OBJECT_COLOURS:
            raise ValueError(f"Obj.colour={obj.colour!r} is unknown; use one of {tuple(OBJECT_COLOURS)}.")
    return np.clip(np.rint(render_float(scene, cfg)), 0, 255).astype(np.uint8)


def changed_region(source: Scene, target: Scene, cfg: WorldConfig) -> np.ndarray:
    """Bool (H, W): the pixels an edit from ``source`` to ``target`` changes."""
    return np.any(render(source, cfg) != render(target, cfg), axis=-1)
