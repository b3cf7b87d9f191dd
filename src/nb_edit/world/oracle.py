"""The oracle's eyes: parse any RGB uint8 image back into a scene, with a confidence.

Analysis by synthesis on a tiny budget:
1. style: which filter (none, grayscale, negative) makes every pixel best explained as a
   mix of a palette background and a palette object colour;
2. background colour (median pixel) and texture (best-fitting background map);
3. foreground = pixels far from the background; objects = connected components;
4. per object: colour and texture jointly, by the residual of the expected pattern on its
   interior pixels; its coverage (soft alpha) gives area and centroid, hence position and
   (per shape hypothesis) size; the shape is the template whose coverage fits best;
5. quality = how well a re-render of the parsed scene reproduces the image.
Works on generated, imperfect images too: everything is a nearest fit, nothing assumes exact
palette pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .config import BACKGROUND_COLOURS, LUMA, OBJECT_COLOURS, WorldConfig
from .render import apply_style, background_map, grid_line_colour, render_float, texture_pattern
from .scene import Obj, Scene
from .shapes import coverage, unit_area

QUALITY_SCALE = 0.03  # mean absolute residual (in [0, 1] units) at which quality falls to 1/e
FG_FRACTION = 0.3  # a pixel is foreground beyond this share of the nearest colour's contrast


@dataclass(frozen=True)
class Parsed:
    """A parsed scene, the confidence of the parse in [0, 1] and the image's render quality."""

    scene: Scene
    confidence: float
    quality: float


def _rgb(names, table) -> np.ndarray:
    return np.array([table[n] for n in names], dtype=np.float64)


def _segment_distance(pixels: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """(N,) distance of each pixel to the nearest of K segments start[k] -> end[k]."""
    delta = end - start
    rel = pixels[:, None, :] - start[None]
    t = np.clip((rel * delta[None]).sum(-1) / np.maximum((delta ** 2).sum(-1), 1e-9)[None], 0, 1)
    return np.linalg.norm(rel - t[..., None] * delta[None], axis=-1).min(axis=1)


def detect_style(image: np.ndarray, cfg: WorldConfig) -> tuple[str, float]:
    """The style whose filtered palette explains the pixels best, and a margin in [0, 1]."""
    pixels = image.reshape(-1, 3)
    bgs, colours = _rgb(cfg.backgrounds, BACKGROUND_COLOURS), _rgb(cfg.colours, OBJECT_COLOURS)
    starts = np.repeat(bgs, len(colours), axis=0)
    ends = np.tile(colours, (len(bgs), 1))
    if "grid" in cfg.bg_textures:
        grids = np.stack([grid_line_colour(b) for b in cfg.backgrounds])
        starts, ends = np.concatenate([starts, bgs]), np.concatenate([ends, grids])
    residuals = [_segment_distance(pixels, apply_style(starts, s), apply_style(ends, s)).mean() for s in cfg.styles]
    order = np.argsort(residuals)
    margin = 1.0 - residuals[order[0]] / max(residuals[order[1]], 1e-9) if len(order) > 1 else 1.0
    return cfg.styles[order[0]], float(margin)


def features(rgb: np.ndarray, style: str) -> np.ndarray:
    """Undo the style as far as possible: RGB for normal/negative, luma (1 channel) for grayscale."""
    rgb = np.asarray(rgb, dtype=np.float64)
    if style == "invert":
        return 255.0 - rgb
    if style == "grayscale":
        return (rgb @ LUMA)[..., None]
    return rgb


def palette_features(rgb: np.ndarray, style: str) -> np.ndarray:
    """Where an unstyled RGB value lands in the feature space of ``features(image, style)``."""
    rgb = np.asarray(rgb, dtype=np.float64)
    return (rgb @ LUMA)[..., None] if style == "grayscale" else rgb


def _fit_colour_texture(feat, interior, bg_plain, colours, cfg):
    """(colour index, texture, margin): the (colour, texture) pattern closest to the interior."""
    pixels = feat[interior]
    scores = []
    for texture in cfg.textures:
        weight = texture_pattern(texture, cfg.resolution)[interior][:, None]
        for ci, colour in enumerate(colours):
            expected = weight * colour + (1 - weight) * bg_plain
            scores.append((np.linalg.norm(pixels - expected, axis=-1).mean(), ci, texture))
    scores.sort(key=lambda s: s[0])
    margin = 1.0 - scores[0][0] / max(scores[1][0], 1e-9) if len(scores) > 1 else 1.0
    return scores[0][1], scores[0][2], margin


def _parse_object(feat, mask, bg_map, bg_plain, colours, cfg, min_area):
    res = cfg.resolution
    interior = ndimage.binary_erosion(mask, ndimage.generate_binary_structure(2, 1))
    if interior.sum() < 3:
        interior = mask
    ci, texture, colour_margin = _fit_colour_texture(feat, interior, bg_plain, colours, cfg)
    # soft coverage: projection of each pixel between background and the expected full colour
    weight = texture_pattern(texture, res)[..., None]
    full = weight * colours[ci] + (1 - weight) * bg_plain
    span = full - bg_map
    alpha = ((feat - bg_map) * span).sum(-1) / np.maximum((span ** 2).sum(-1), 1e-9)
    region = ndimage.binary_dilation(mask, np.ones((3, 3), bool))
    alpha = np.where(region, np.clip(alpha, 0, 1), 0.0)
    area = alpha.sum()
    if area < min_area:
        return None, 0.0  # a blob that no palette colour explains: not an object
    rows, cols = np.mgrid[0:res, 0:res]
    x, y = ((alpha * (cols + 0.5)).sum() / area) / res, ((alpha * (rows + 0.5)).sum() / area) / res
    fits = []
    for shape in cfg.shapes:
        size = float(np.sqrt(area / res ** 2 / unit_area(shape)))
        template = coverage(shape, x, y, size, res, cfg.supersample)
        fits.append((np.abs(alpha - template).sum(), shape, size))
    fits.sort(key=lambda f: f[0])
    shape_margin = 1.0 - fits[0][0] / max(fits[1][0], 1e-9) if len(fits) > 1 else 1.0
    obj = Obj(fits[0][1], cfg.colours[ci], fits[0][2], float(x), float(y), texture)
    return obj, min(colour_margin, shape_margin)


def parse(image: np.ndarray, cfg: WorldConfig) -> Parsed:
    """Read a scene out of an RGB uint8 (H, W, 3) image at ``cfg.resolution``."""
    image = np.asarray(image)
    res = cfg.resolution
    if image.dtype != np.uint8 or image.shape != (res, res, 3):
        raise ValueError(f"parse: image must be uint8 of shape ({res}, {res}, 3), got {image.dtype} "
                         f"{image.shape}; resize it or pass a WorldConfig with that resolution.")
    rgb = image.astype(np.float64)
    style, style_margin = detect_style(rgb, cfg)
    feat = features(rgb, style)
    bg_feats = palette_features(_rgb(cfg.backgrounds, BACKGROUND_COLOURS), style)
    colours = palette_features(_rgb(cfg.colours, OBJECT_COLOURS), style)
    median = np.median(feat.reshape(-1, feat.shape[-1]), axis=0)
    bi = int(np.argmin(np.linalg.norm(bg_feats - median, axis=-1)))
    background = cfg.backgrounds[bi]
    maps = {t: palette_features(background_map(background, t, res), style) for t in cfg.bg_textures}
    bg_texture = min(maps, key=lambda t: np.minimum(np.linalg.norm(feat - maps[t], axis=-1), 30).mean())
    bg_map = maps[bg_texture]
    # foreground threshold: a share of the weakest contrast a legible object can have here
    contrast = np.linalg.norm(colours - bg_feats[bi], axis=-1)
    legible = contrast[contrast >= 0.75 * cfg.gray_legibility]
    threshold = FG_FRACTION * (legible.min() if legible.size else contrast.max())
    foreground = np.linalg.norm(feat - bg_map, axis=-1) > threshold
    labels, count = ndimage.label(foreground, np.ones((3, 3), bool))
    min_area = 0.35 * min(unit_area(s) for s in cfg.shapes) * (cfg.size_range[0] * res) ** 2
    objects, margins = [], [style_margin]
    for k in range(1, count + 1):
        mask = labels == k
        if mask.sum() < min_area:
            continue  # specks: noise or blotches, not objects
        obj, margin = _parse_object(feat, mask, bg_map, bg_feats[bi], colours, cfg, min_area)
        if obj is None:
            continue
        objects.append(obj)
        margins.append(margin)
    scene = Scene(background, tuple(objects), style, bg_texture)
    residual = np.abs(render_float(scene, cfg) - rgb).mean() / 255.0
    quality = float(np.exp(-residual / QUALITY_SCALE))
    confidence = float(np.clip(quality * min(margins), 0.0, 1.0))
    return Parsed(scene, confidence, quality)
