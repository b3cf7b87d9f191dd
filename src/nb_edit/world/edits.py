"""Edits: an instruction, the target scene it asks for, both captions and the edited region.

The edit types cover the categories of the three papers' benchmarks (NP-Edit's proposer,
Real-Edit's seven categories, EdiVal's multi-turn edits): local object edits (add, remove,
replace the shape, colour, texture, resize, move, count = "add another") and global ones
(background, style), plus "do nothing". A valid edit always refers to its object by colour and
shape, and that pair is unique in the scene.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .config import BACKGROUND_COLOURS, EDIT_TYPES, LUMA, OBJECT_COLOURS, WorldConfig
from .phrasing import DIRECTIONS, phrase, thing
from .render import changed_region
from .scene import Scene, caption, fits, place, random_object, sample_scene

OBJECT_EDITS = ("remove", "replace", "colour", "texture", "resize", "move", "count")


@dataclass(eq=False)  # the region array has no single truth value; compare fields instead
class Edit:
    """One edit of ``source`` into ``target``; ``obj_index`` is the referred object's index in
    ``source`` (-1 for add and global edits; an added object is always last in ``target``)."""

    edit_type: str
    instruction: str
    source: Scene
    target: Scene
    caption: str
    caption_edited: str
    region: np.ndarray = field(repr=False)
    valid: bool = True
    reason: str = ""
    obj_index: int = -1

    def to_dict(self) -> dict:
        """JSON-able; the region is left out (``from_dict`` re-renders it)."""
        return dict(edit_type=self.edit_type, instruction=self.instruction, source=self.source.to_dict(),
                    target=self.target.to_dict(), caption=self.caption, caption_edited=self.caption_edited,
                    valid=self.valid, reason=self.reason, obj_index=self.obj_index,
                    resolution=int(self.region.shape[0]))

    @classmethod
    def from_dict(cls, data: dict, cfg: WorldConfig | None = None) -> "Edit":
        cfg = cfg or WorldConfig(resolution=int(data.get("resolution", 32)))
        source, target = Scene.from_dict(data["source"]), Scene.from_dict(data["target"])
        return cls(data["edit_type"], data["instruction"], source, target, data["caption"],
                   data["caption_edited"], changed_region(source, target, cfg), bool(data.get("valid", True)),
                   data.get("reason", ""), int(data.get("obj_index", -1)))


def make_edit(edit_type, instruction, source, target, cfg, obj_index=-1, valid=True, reason="") -> Edit:
    return Edit(edit_type, instruction, source, target, caption(source), caption(target),
                changed_region(source, target, cfg), valid, reason, obj_index)


class Impossible(ValueError):
    """This edit type cannot be applied to this scene (the caller may retry another)."""


def referable(scene: Scene) -> list[int]:
    """Objects whose colour and shape pair is unique in the scene."""
    return [i for i, o in enumerate(scene.objects) if len(scene.matching(o.colour, o.shape)) == 1]


def _pick_object(scene, rng):
    options = referable(scene)
    if not options:
        raise Impossible("no object has a unique colour and shape")
    return int(rng.choice(options))


def _shuffled(values, rng, exclude=()):
    return [str(v) for v in rng.permutation(list(values)) if v not in exclude]


def _replace_object(scene, index, obj):
    objects = list(scene.objects)
    objects[index] = obj
    return scene.with_(objects=objects)


def _others(scene, index):
    return [o for j, o in enumerate(scene.objects) if j != index]


def _add(scene, rng, cfg):
    if len(scene.objects) >= cfg.max_objects:
        raise Impossible(f"the scene already holds max_objects={cfg.max_objects}")
    new_pairs = [(c, s) for c in cfg.colours for s in cfg.shapes if not scene.matching(c, s)]
    colour, shape = new_pairs[int(rng.integers(len(new_pairs)))]
    obj = place(random_object(rng, cfg, colour=colour, shape=shape), scene.objects, rng, cfg)
    if obj is None:
        raise Impossible("no free space for a new object")
    return scene.with_(objects=scene.objects + (obj,)), "add", dict(thing=thing(colour, shape, obj.texture)), -1


def _remove(scene, rng, cfg):
    if len(scene.objects) <= max(cfg.min_objects, 1):
        raise Impossible("removing would leave fewer than min_objects (at least 1)")
    i = _pick_object(scene, rng)
    return scene.with_(objects=_others(scene, i)), "remove", {}, i


def _replace(scene, rng, cfg):
    i = _pick_object(scene, rng)
    obj = scene.objects[i]
    for shape in _shuffled(cfg.shapes, rng, exclude=(obj.shape,)):
        new = obj.with_(shape=shape)
        if not scene.matching(obj.colour, shape) and fits(new, _others(scene, i), cfg):
            return _replace_object(scene, i, new), "replace", dict(shape=shape, colour=obj.colour), i
    raise Impossible("no other shape is free and fits")


def _colour(scene, rng, cfg):
    i = _pick_object(scene, rng)
    obj = scene.objects[i]
    for colour in _shuffled(cfg.colours, rng, exclude=(obj.colour,)):
        if not scene.matching(colour, obj.shape):
            return _replace_object(scene, i, obj.with_(colour=colour)), "colour", dict(colour=colour), i
    raise Impossible("every other colour of this shape is already present")


def _texture(scene, rng, cfg):
    i = _pick_object(scene, rng)
    obj = scene.objects[i]
    options = _shuffled(cfg.textures, rng, exclude=(obj.texture,))
    if not options:
        raise Impossible("the config has a single texture")
    return _replace_object(scene, i, obj.with_(texture=options[0])), "texture", dict(texture=options[0]), i


def _resize(scene, rng, cfg):
    i = _pick_object(scene, rng)
    obj = scene.objects[i]
    low, high = cfg.size_range
    for way in _shuffled(("bigger", "smaller"), rng):
        size = obj.size * cfg.resize_factor if way == "bigger" else obj.size / cfg.resize_factor
        new = obj.with_(size=size)
        if low - 1e-9 <= size <= high + 1e-9 and fits(new, _others(scene, i), cfg):
            return _replace_object(scene, i, new), f"resize:{way}", {}, i
    raise Impossible("the object can neither grow nor shrink within size_range and free space")


def _move(scene, rng, cfg):
    i = _pick_object(scene, rng)
    obj = scene.objects[i]
    for name in _shuffled(DIRECTIONS, rng):
        (dx, dy), words = DIRECTIONS[name]
        for distance in sorted(rng.uniform(*cfg.move_range, size=4)):
            new = obj.with_(x=obj.x + dx * distance, y=obj.y + dy * distance)
            if fits(new, _others(scene, i), cfg):
                return _replace_object(scene, i, new), "move", dict(direction=words), i
    raise Impossible("the object has no room to move in any direction")


def _background(scene, rng, cfg):
    options = _shuffled(cfg.backgrounds, rng, exclude=(scene.background,))
    if not options:
        raise Impossible("the config has a single background")
    return scene.with_(background=options[0]), "background", dict(bg=options[0]), -1


def _style(scene, rng, cfg):
    for style in _shuffled(cfg.styles, rng, exclude=("normal",)):
        if style == "grayscale":
            bg_luma = np.array(BACKGROUND_COLOURS[scene.background]) @ LUMA
            if any(abs(np.array(OBJECT_COLOURS[o.colour]) @ LUMA - bg_luma) < cfg.gray_legibility
                   for o in scene.objects):
                continue  # an object would vanish into the background: not a fair edit
        return scene.with_(style=style), f"style:{style}", {}, -1
    raise Impossible("no style keeps every object visible")


def _count(scene, rng, cfg):
    if len(scene.objects) >= cfg.max_objects:
        raise Impossible(f"the scene already holds max_objects={cfg.max_objects}")
    i = _pick_object(scene, rng)
    copy = place(scene.objects[i], scene.objects, rng, cfg)
    if copy is None:
        raise Impossible("no free space for a copy")
    return scene.with_(objects=scene.objects + (copy,)), "count", {}, i


def _noop(scene, rng, cfg):
    return scene, "noop", {}, -1


_MAKERS = {"add": _add, "remove": _remove, "replace": _replace, "colour": _colour, "texture": _texture,
           "resize": _resize, "move": _move, "background": _background, "style": _style, "count": _count,
           "noop": _noop}


def _check_type(edit_type: str | None, cfg: WorldConfig) -> None:
    if edit_type is not None and edit_type not in EDIT_TYPES:
        raise ValueError(f"edit_type={edit_type!r} is unknown; use one of {EDIT_TYPES}.")
    if edit_type is not None and edit_type not in cfg.edit_types:
        raise ValueError(f"edit_type={edit_type!r} is not among this world's edit_types {cfg.edit_types}.")


def sample_edit(scene: Scene, rng: np.random.Generator, cfg: WorldConfig, edit_type: str | None = None) -> Edit:
    """A valid edit of ``scene`` (of ``edit_type``, or of a random type that applies).

    Raises ValueError naming the type when it cannot apply to this scene or is not among the
    world's ``edit_types``; the caller may retry with another scene or type.
    """
    _check_type(edit_type, cfg)
    types = [edit_type] if edit_type else _shuffled(cfg.edit_types, rng)
    reasons = []
    for kind in types:
        try:
            if scene.style != "normal" and kind != "noop":
                raise Impossible(f"the scene is in style {scene.style!r}; only noop applies to a styled scene")
            target, key, slots, index = _MAKERS[kind](scene, rng, cfg)
        except Impossible as why:
            reasons.append(f"{kind}: {why}")
            continue
        if index >= 0:
            slots["ref"] = scene.objects[index].name
        return make_edit(kind, phrase(key, rng, **slots), scene, target, cfg, obj_index=index)
    raise ValueError(f"sample_edit: edit_type={edit_type or 'any'} is impossible for this scene ("
                     + "; ".join(reasons) + ").")


def sample_edit_of_type(rng: np.random.Generator, cfg: WorldConfig, edit_type: str | None,
                        max_scenes: int = 1000) -> Edit:
    """A valid ``edit_type`` edit (None: any type) of a fresh scene: draws scenes until the type
    applies to one.

    Raises ValueError when no scene out of ``max_scenes`` admits it (the world's settings
    forbid that type, e.g. ``count`` with ``max_objects=1``).
    """

    _check_type(edit_type, cfg)
    for _ in range(max_scenes):
        try:
            return sample_edit(sample_scene(rng, cfg), rng, cfg, edit_type)
        except ValueError:
            continue
    raise ValueError(f"no {edit_type!r} edit applied to any of {max_scenes} scenes; check that the WorldConfig "
                     "(object counts, colours, sizes) allows it.")
