"""Noisy paired targets (InstructPix2Pix-like data for Multi-Reward as Condition) and degradation.

InstructPix2Pix's generated targets often miss the instruction, change too much or look bad;
RewardEdit-20K scores them on following, preserving and quality. ``noisy_target`` produces
such targets on purpose, corrupted in a recorded way, and returns the oracle's verdict on
each, which is the truth a learned judge's scores are compared with.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .config import WorldConfig
from .edits import Edit, sample_edit
from .judge import judge
from .phrasing import DIRECTIONS
from .render import render, render_float
from .scene import fits

CORRUPTIONS = ("clean", "wrong_edit", "collateral", "artifacts", "partial")
PARTIAL_STRENGTH = 0.3  # a partial edit carries out this share of the change


@dataclass(frozen=True)
class NoisyTarget:
    image: np.ndarray
    corruption: str
    followed: bool | None  # None: not judged (``noisy_target(..., with_verdict=False)``)
    preserved: bool | None
    quality: float | None


def degrade(image: np.ndarray, rng: np.random.Generator, noise_std: float = 0.03, blur_sigma: float = 0.5) -> np.ndarray:
    """Gaussian blur (``blur_sigma`` pixels), then Gaussian noise (``noise_std`` of the range)."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"degrade: image must be uint8 (H, W, 3), got {image.dtype} {image.shape}.")
    out = image.astype(np.float64) / 255.0
    if blur_sigma > 0:
        out = ndimage.gaussian_filter(out, sigma=(blur_sigma, blur_sigma, 0))
    out = out + rng.normal(0.0, noise_std, out.shape) if noise_std > 0 else out
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def _wrong_edit(edit, rng, cfg):
    for _ in range(50):
        other = sample_edit(edit.source, rng, cfg)
        if other.edit_type != "noop" and other.target != edit.target and (
                other.edit_type != edit.edit_type or other.obj_index != edit.obj_index or edit.obj_index < 0):
            return render(other.target, cfg)
    raise ValueError(f"noisy_target: no wrong edit differs from this {edit.edit_type} edit.")


def _collateral(edit, rng, cfg):
    """The target with one more change to something the edit does not touch."""
    target = edit.target
    touched = set()
    if edit.edit_type in ("add", "count"):
        touched.add(len(target.objects) - 1)  # the new object (for count, the original too, below)
    if edit.obj_index >= 0 and edit.edit_type != "remove":
        touched.add(edit.obj_index)
    # indices shift after a remove: the touched object is gone, every other one is fair game
    untouched = [j for j in range(len(target.objects)) if j not in touched]
    if not untouched:
        if edit.edit_type in ("background", "style") or len(cfg.backgrounds) < 2:
            raise ValueError(f"noisy_target: nothing untouched to change in this {edit.edit_type} edit.")
        bg = [b for b in cfg.backgrounds if b != target.background]
        return render(target.with_(background=str(rng.choice(bg))), cfg)
    j = int(rng.choice(untouched))
    obj, others = target.objects[j], [o for k, o in enumerate(target.objects) if k != j]
    # a new colour must not duplicate a name in the scene, or the edit's own object gets confused
    changes = [obj.with_(colour=c) for c in cfg.colours if c != obj.colour
               and not target.matching(c, obj.shape) and not edit.source.matching(c, obj.shape)]
    changes += [obj.with_(texture=t) for t in cfg.textures if t != obj.texture]
    for (dx, dy), _ in DIRECTIONS.values():
        moved = obj.with_(x=obj.x + dx * cfg.move_range[1], y=obj.y + dy * cfg.move_range[1])
        changes += [moved] if fits(moved, others, cfg) else []
    objects = list(target.objects)
    objects[j] = changes[int(rng.integers(len(changes)))]
    return render(target.with_(objects=objects), cfg)


def _artifacts(edit, rng, cfg):
    image = render_float(edit.target, cfg)
    res = cfg.resolution
    rows, cols = np.mgrid[0:res, 0:res]
    for _ in range(int(rng.integers(2, 5))):  # blotches: soft discs of a random colour
        cy, cx, radius = rng.uniform(0, res), rng.uniform(0, res), rng.uniform(0.5, 0.9) * res / 32
        alpha = 0.7 * np.exp(-((rows - cy) ** 2 + (cols - cx) ** 2) / (2 * radius ** 2))[..., None]
        image = image * (1 - alpha) + rng.uniform(0, 255, 3) * alpha
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return degrade(image, rng, noise_std=0.04, blur_sigma=0.6)


def _partial(edit, rng, cfg):
    if edit.edit_type == "noop":
        raise ValueError("noisy_target: a noop edit has no partial version.")
    if edit.edit_type in ("move", "resize"):
        k = edit.obj_index
        was, goal = edit.source.objects[k], edit.target.objects[k]
        step = lambda a, b: a + PARTIAL_STRENGTH * (b - a)
        part = goal.with_(x=step(was.x, goal.x), y=step(was.y, goal.y),
                          size=float(was.size * (goal.size / was.size) ** PARTIAL_STRENGTH))
        objects = list(edit.target.objects)
        objects[k] = part
        return render(edit.target.with_(objects=objects), cfg)
    source, target = render_float(edit.source, cfg), render_float(edit.target, cfg)
    if edit.edit_type in ("background", "style"):
        # a global edit carried out on a band of the picture only
        rows = int(round(PARTIAL_STRENGTH * cfg.resolution))
        top = int(rng.integers(0, cfg.resolution - rows + 1))
        band = np.zeros((cfg.resolution, 1, 1), bool)
        band[top:top + rows] = True
        return np.clip(np.rint(np.where(band, target, source)), 0, 255).astype(np.uint8)
    # a local edit as a faint ghost: the target blended weakly over the source
    blend = (1 - PARTIAL_STRENGTH) * source + PARTIAL_STRENGTH * target
    return np.clip(np.rint(blend), 0, 255).astype(np.uint8)


_MAKERS = {"clean": lambda e, r, c: render(e.target, c), "wrong_edit": _wrong_edit, "collateral": _collateral,
           "artifacts": _artifacts, "partial": _partial}


def noisy_target(edit: Edit, rng: np.random.Generator, cfg: WorldConfig, corruption: str | None = None,
                 with_verdict: bool = True) -> NoisyTarget:
    """A target image for ``edit``, corrupted as ``corruption`` says (random when None), with the
    oracle's verdict on it: followed, preserved, quality. The verdict (two oracle parses, most of
    the cost) draws no random numbers, so ``with_verdict=False`` gives the same image faster."""
    if corruption is not None and corruption not in CORRUPTIONS:
        raise ValueError(f"corruption={corruption!r} is unknown; use one of {CORRUPTIONS}.")
    kinds = [corruption] if corruption else [str(k) for k in rng.permutation(CORRUPTIONS)]
    for kind in kinds:
        try:
            image = _MAKERS[kind](edit, rng, cfg)
        except ValueError:
            if corruption:
                raise
            continue
        if not with_verdict:
            return NoisyTarget(image, kind, None, None, None)
        verdict = judge(render(edit.source, cfg), edit, image, cfg)
        return NoisyTarget(image, kind, verdict.followed, verdict.preserved, verdict.quality)
    raise ValueError(f"noisy_target: no corruption applies to this {edit.edit_type} edit.")
