"""Scenes of ShapesWorld: objects on a background, how to sample them and how to caption them.

Captions name what a real caption would (each object by colour and shape, how many, the
background colour and a global style) and leave out what an edit must preserve but a caption
never says: exact positions, sizes and textures. A text-to-image teacher therefore cannot
draw an edit's target from the edited caption alone (NP-Edit's DMD-only ablation stays honest).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

import numpy as np

from .config import WorldConfig
from .shapes import ENCLOSING_RADIUS


@dataclass(frozen=True)
class Obj:
    """One object: ``x``, ``y`` are its centre in [0, 1] (y down), ``size`` its width."""

    shape: str
    colour: str
    size: float
    x: float
    y: float
    texture: str = "solid"

    @property
    def name(self) -> str:
        """How instructions and captions refer to it: colour and shape."""
        return f"{self.colour} {self.shape}"

    @property
    def radius(self) -> float:
        return ENCLOSING_RADIUS[self.shape] * self.size

    def with_(self, **changes) -> "Obj":
        return replace(self, **changes)


@dataclass(frozen=True)
class Scene:
    """A background colour (and texture), objects, and a global style applied last."""

    background: str
    objects: tuple[Obj, ...]
    style: str = "normal"
    bg_texture: str = "plain"

    def with_(self, **changes) -> "Scene":
        if "objects" in changes:
            changes["objects"] = tuple(changes["objects"])
        return replace(self, **changes)

    def matching(self, colour: str | None = None, shape: str | None = None) -> list[int]:
        """Indices of the objects a reference by colour and/or shape picks out."""
        return [i for i, o in enumerate(self.objects)
                if (colour is None or o.colour == colour) and (shape is None or o.shape == shape)]

    def to_dict(self) -> dict:
        return {"background": self.background, "style": self.style, "bg_texture": self.bg_texture,
                "objects": [dict(shape=o.shape, colour=o.colour, size=float(o.size), x=float(o.x),
                                 y=float(o.y), texture=o.texture) for o in self.objects]}

    @classmethod
    def from_dict(cls, data: dict) -> "Scene":
        try:
            objects = tuple(Obj(**o) for o in data["objects"])
            return cls(data["background"], objects, data.get("style", "normal"), data.get("bg_texture", "plain"))
        except (KeyError, TypeError) as err:
            raise ValueError(f"Scene.from_dict: malformed scene dict ({err}); expected keys background, "
                             "objects (shape, colour, size, x, y, texture), style, bg_texture.") from None


def fits(obj: Obj, others, cfg: WorldConfig, margin: float | None = None) -> bool:
    """True when ``obj`` lies inside the frame and keeps ``cfg.min_gap`` from every other object."""
    border = 1.0 / cfg.resolution if margin is None else margin
    r = obj.radius
    if not (border + r <= obj.x <= 1 - border - r and border + r <= obj.y <= 1 - border - r):
        return False
    return all(np.hypot(obj.x - o.x, obj.y - o.y) >= r + o.radius + cfg.min_gap for o in others)


def place(obj: Obj, others, rng: np.random.Generator, cfg: WorldConfig, tries: int = 200) -> Obj | None:
    """``obj`` moved to a random free position, or None when none was found."""
    for _ in range(tries):
        border = 1.0 / cfg.resolution + obj.radius
        if border >= 0.5:
            return None
        candidate = obj.with_(x=float(rng.uniform(border, 1 - border)), y=float(rng.uniform(border, 1 - border)))
        if fits(candidate, others, cfg):
            return candidate
    return None


def random_object(rng: np.random.Generator, cfg: WorldConfig, **fixed) -> Obj:
    """An object with random attributes (any given in ``fixed`` kept), not yet placed."""
    attrs = dict(shape=str(rng.choice(cfg.shapes)), colour=str(rng.choice(cfg.colours)),
                 size=float(rng.uniform(*cfg.size_range)), x=0.5, y=0.5, texture=str(rng.choice(cfg.textures)))
    attrs.update(fixed)
    return Obj(**attrs)


def sample_scene(rng: np.random.Generator, cfg: WorldConfig) -> Scene:
    """A random scene: background, 1..max objects at free positions, style 'normal'."""
    for _ in range(100):
        n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
        objects: list[Obj] = []
        for _ in range(n):
            placed = place(random_object(rng, cfg), objects, rng, cfg)
            if placed is None:
                break
            objects.append(placed)
        if len(objects) == n:
            return Scene(str(rng.choice(cfg.backgrounds)), tuple(objects),
                         bg_texture=str(rng.choice(cfg.bg_textures)))
    raise ValueError(f"sample_scene: could not place {cfg.max_objects} objects of sizes {cfg.size_range} "
                     "without overlap; lower max_objects, size_range or min_gap.")


_NUMBERS = {2: "two", 3: "three", 4: "four"}


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith(("s", "x", "ch")) else "s")


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene) -> str:
    """Colour-and-shape names with counts, the background colour and the style; nothing more."""
    counts = Counter((o.colour, o.shape) for o in scene.objects)
    parts = []
    for (colour, shape), k in sorted(counts.items(), key=lambda item: (item[0][1], item[0][0])):
        parts.append(f"{article(colour)} {colour} {shape}" if k == 1 else f"{_NUMBERS.get(k, str(k))} {colour} {plural(shape)}")
    things = " and ".join(parts) if parts else "nothing"
    text = f"{things} on {article(scene.background)} {scene.background} background"
    prefix = {"normal": "", "grayscale": "a grayscale picture of ", "invert": "a colour negative of "}
    return prefix[scene.style] + text
