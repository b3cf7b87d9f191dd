"""ShapesWorld's catalogues and its one configuration dataclass.

The catalogues hold every name the world knows (colours with their RGB values, shapes,
textures, backgrounds, styles); a ``WorldConfig`` picks the small subset a run uses, so a
tiny profile that 2 CPU cores learn in minutes and a larger world share one code path.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

# Object colours. Chosen so that their RGB values are far apart, far from every background,
# and with distinct luminance, so that a grayscale render still tells
# them apart and the oracle can parse it.
OBJECT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (30, 60, 200),
    "yellow": (235, 205, 40),
    "orange": (250, 145, 20),
    "purple": (180, 100, 240),
    "pink": (250, 135, 205),
}
# Backgrounds. No two are close to each other's colour negative (white vs black would be),
# so the "invert" style is read off the background alone.
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "white": (240, 240, 240),
    "gray": (150, 150, 150),
    "navy": (20, 30, 90),
    "olive": (110, 110, 40),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "hexagon", "star")
TEXTURES = ("solid", "striped", "checked")
BG_TEXTURES = ("plain", "grid")
STYLES = ("normal", "grayscale", "invert")

# Every edit type the world knows: local object edits, global ones (background, style) and
# "do nothing". A ``WorldConfig`` picks the ones a run uses (``edit_types``).
EDIT_TYPES: tuple[str, ...] = ("add", "remove", "replace", "colour", "texture", "resize", "move",
                               "background", "style", "count", "noop")

# Rec. 601 luma weights: what "grayscale" means here, for the renderer and the oracle alike.
LUMA = np.array([0.299, 0.587, 0.114])


def luminance(rgb) -> np.ndarray:
    """Luma of RGB values (last axis), same units as the input."""
    return np.asarray(rgb, dtype=np.float64) @ LUMA


@dataclass
class WorldConfig:
    """Everything that sizes ShapesWorld. Plain data: ``to_dict``/``from_dict`` round-trip it.

    Sizes and positions are fractions of the image side; ``size`` is an object's width.
    Defaults are the tiny world: 3 shapes, 4 colours, 3 backgrounds, 2 textures, 1-3 objects.
    """

    resolution: int = 32
    supersample: int = 4  # anti-aliasing: draw at resolution * supersample, box-downsample
    shapes: tuple[str, ...] = ("circle", "square", "triangle")
    colours: tuple[str, ...] = ("red", "green", "blue", "yellow")
    backgrounds: tuple[str, ...] = ("white", "gray", "navy")
    textures: tuple[str, ...] = ("solid", "striped")
    bg_textures: tuple[str, ...] = ("plain",)
    styles: tuple[str, ...] = STYLES
    min_objects: int = 1
    max_objects: int = 3
    size_range: tuple[float, float] = (0.22, 0.34)
    min_gap: float = 0.07  # free space between two objects' enclosing circles
    move_range: tuple[float, float] = (0.22, 0.32)  # how far a "move" edit carries an object
    resize_factor: float = 1.4  # "bigger" multiplies the size by this, "smaller" divides
    pos_tol: float = 0.08  # oracle: positions closer than this count as unchanged
    size_tol: float = 0.2  # oracle: relative size change below this counts as unchanged
    gray_legibility: float = 40.0  # min luma gap object/background for a grayscale edit
    edit_types: tuple[str, ...] = EDIT_TYPES  # the edits a run draws (a type the world cannot apply is never drawn)

    def __post_init__(self):
        for name, known in (("shapes", SHAPES), ("colours", tuple(OBJECT_COLOURS)),
                            ("backgrounds", tuple(BACKGROUND_COLOURS)), ("textures", TEXTURES),
                            ("bg_textures", BG_TEXTURES), ("styles", STYLES), ("edit_types", EDIT_TYPES)):
            chosen = tuple(getattr(self, name))
            setattr(self, name, chosen)
            unknown = [v for v in chosen if v not in known]
            if unknown or not chosen or len(set(chosen)) != len(chosen):
                raise ValueError(f"WorldConfig.{name}={chosen!r}: give distinct names from {known}.")
        self.size_range = tuple(float(v) for v in self.size_range)
        self.move_range = tuple(float(v) for v in self.move_range)
        if not 16 <= self.resolution <= 64:
            raise ValueError(f"WorldConfig.resolution={self.resolution}: use 16 to 64 pixels.")
        if "normal" not in self.styles or "solid" not in self.textures or "plain" not in self.bg_textures:
            raise ValueError("WorldConfig: styles must hold 'normal', textures 'solid' and bg_textures 'plain'.")
        if not 1 <= self.min_objects <= self.max_objects <= 4:
            raise ValueError(f"WorldConfig: need 1 <= min_objects <= max_objects <= 4, got "
                             f"{self.min_objects}, {self.max_objects}.")
        low, high = self.size_range
        if not (0.1 <= low < high <= 0.45) or low * self.resize_factor > high:
            raise ValueError(f"WorldConfig.size_range={self.size_range}: need 0.1 <= low < high <= 0.45 "
                             f"and low * resize_factor <= high so every object can be resized.")
        if "grayscale" in self.styles:
            luma = {c: float(luminance(OBJECT_COLOURS[c])) for c in self.colours}
            for a in self.colours:
                for b in self.colours:
                    if a < b and abs(luma[a] - luma[b]) < 12:
                        raise ValueError(f"WorldConfig: colours {a!r} and {b!r} look alike in grayscale; "
                                         "drop one of them or drop 'grayscale' from styles.")
        if "invert" in self.styles:
            for a in self.backgrounds:
                for b in self.backgrounds:
                    negative = 255 - np.array(BACKGROUND_COLOURS[a])
                    if np.linalg.norm(negative - BACKGROUND_COLOURS[b]) < 50:
                        raise ValueError(f"WorldConfig: background {a!r} inverted looks like {b!r}, so the "
                                         "'invert' style could not be read; drop one or drop 'invert'.")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> "WorldConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"WorldConfig.from_dict: unknown keys {sorted(unknown)}; known: {sorted(names)}.")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


# The ladder of worlds, as plain data: each preset names the fields that differ from
# ``WorldConfig``'s defaults (which are the ``rich`` world). ``toy`` is the world of one object
# and one edit type known to be learnt in minutes on 2 CPU cores; ``small`` grows it to two
# objects and seven edit types (six edits and "do nothing", the background as the global one);
# ``rich`` adds a third object, textures, styles and the remaining edit types, for longer runs
# and GPUs. A run picks one by name (``world_name``) next to its profile; the profile's own
# choice lives in ``RunSettings.world``.
_PLAIN = dict(shapes=("circle", "square", "triangle"), colours=("red", "green", "blue", "yellow"),
              backgrounds=("white", "gray", "navy"), textures=("solid",), styles=("normal",))
WORLDS: dict[str, dict] = {
    "toy": dict(_PLAIN, min_objects=1, max_objects=1, edit_types=("colour", "noop")),
    "small": dict(_PLAIN, min_objects=1, max_objects=2,
                  edit_types=("add", "remove", "replace", "colour", "move", "background", "noop")),
    "rich": {},
}


def preset(name: str, **overrides) -> WorldConfig:
    """The ``WorldConfig`` of the ladder's world ``name`` (``WORLDS``), with ``overrides`` applied."""
    if name not in WORLDS:
        raise ValueError(f"world {name!r} is unknown; choose one of {sorted(WORLDS)} (world/config.py WORLDS).")
    return WorldConfig(**{**WORLDS[name], **overrides})
