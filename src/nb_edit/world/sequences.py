"""Multi-turn chains (MT-EditFlow) and candidate proposals with known validity (NP-Edit curation).

A chain's turn t edits turn t-1's target. Turns use distinct edit types, never "do nothing",
and a global style only as the last turn (object edits on a grayscale or negative picture
would name colours that cannot be seen).

``propose_candidates`` plays the proposer of NP-Edit's data curation: it returns valid edits
mixed with invalid instructions of the kinds a validity filter must reject (the object is
absent, the edit changes nothing, the reference is ambiguous), each flagged by construction,
so a filter's precision and recall can be measured.
"""

from __future__ import annotations

import numpy as np

from .config import WorldConfig
from .edits import OBJECT_EDITS, Edit, make_edit, referable, sample_edit
from .phrasing import DIRECTIONS, GENERIC_NOUNS, phrase
from .scene import Scene

INVALID_KINDS = ("absent", "no_change", "ambiguous")


def sample_chain(scene: Scene, rng: np.random.Generator, cfg: WorldConfig, n_turns: int = 3) -> list[Edit]:
    """``n_turns`` compatible valid edits; ``chain[t].source == chain[t-1].target``."""
    if n_turns < 1:
        raise ValueError(f"sample_chain: n_turns={n_turns} must be at least 1.")
    for _ in range(50):
        chain, current, used = [], scene, set()
        for turn in range(n_turns):
            banned = used | {"noop"} | ({"style"} if turn < n_turns - 1 else set())
            options = [t for t in rng.permutation(cfg.edit_types) if t not in banned]
            edit = None
            for kind in options:
                try:
                    edit = sample_edit(current, rng, cfg, str(kind))
                    break
                except ValueError:
                    continue
            if edit is None:
                break
            chain.append(edit)
            used.add(edit.edit_type)
            current = edit.target
        if len(chain) == n_turns:
            return chain
    raise ValueError(f"sample_chain: found no chain of {n_turns} compatible edits for this scene.")


def _object_slots(kind, rng, cfg, current=None):
    """Slots for an object edit's template (values random, or equal to ``current`` for no-ops)."""
    if kind == "replace":
        shape = current.shape if current else str(rng.choice(cfg.shapes))
        return "replace", dict(shape=shape, colour=current.colour if current else str(rng.choice(cfg.colours)))
    if kind == "colour":
        return "colour", dict(colour=current.colour if current else str(rng.choice(cfg.colours)))
    if kind == "texture":
        return "texture", dict(texture=current.texture if current else str(rng.choice(cfg.textures)))
    if kind == "resize":
        return f"resize:{rng.choice(['bigger', 'smaller'])}", {}
    if kind == "move":
        return "move", dict(direction=DIRECTIONS[str(rng.choice(list(DIRECTIONS)))][1])
    return kind, {}


def _absent(scene, rng, cfg):
    pairs = [(c, s) for c in cfg.colours for s in cfg.shapes if not scene.matching(c, s)]
    if not pairs:
        return None
    colour, shape = pairs[int(rng.integers(len(pairs)))]
    kind = str(rng.choice(OBJECT_EDITS))
    key, slots = _object_slots(kind, rng, cfg)
    return kind, phrase(key, rng, ref=f"{colour} {shape}", **slots), f"absent object: no {colour} {shape} in the scene"


def _no_change(scene, rng, cfg):
    options = ["background"] + (["colour", "texture", "replace"] if referable(scene) else [])
    kind = str(rng.choice(options))
    if kind == "background":
        return kind, phrase("background", rng, bg=scene.background), f"no change: the background is already {scene.background}"
    obj = scene.objects[int(rng.choice(referable(scene)))]
    key, slots = _object_slots(kind, rng, cfg, current=obj)
    said = {"colour": obj.colour, "texture": obj.texture, "replace": f"a {obj.shape}"}[kind]
    return kind, phrase(key, rng, ref=obj.name, **slots), f"no change: the {obj.name} is already {said}"


def _ambiguous(scene, rng, cfg):
    refs = []
    for obj in scene.objects:
        if len(scene.matching(obj.colour, obj.shape)) > 1:
            refs.append((obj.name, len(scene.matching(obj.colour, obj.shape))))
        if len(scene.matching(shape=obj.shape)) > 1:
            refs.append((obj.shape, len(scene.matching(shape=obj.shape))))
        if len(scene.matching(colour=obj.colour)) > 1:
            refs.append((f"{obj.colour} {rng.choice(GENERIC_NOUNS)}", len(scene.matching(colour=obj.colour))))
    if len(scene.objects) > 1:
        refs.append((str(rng.choice(GENERIC_NOUNS)), len(scene.objects)))
    if not refs:
        return None
    ref, count = refs[int(rng.integers(len(refs)))]
    kind = str(rng.choice(OBJECT_EDITS))
    key, slots = _object_slots(kind, rng, cfg)
    return kind, phrase(key, rng, ref=ref, **slots), f"ambiguous reference: {count} objects match 'the {ref}'"


def propose_candidates(scene: Scene, rng: np.random.Generator, cfg: WorldConfig, n: int) -> list[Edit]:
    """``n`` candidate edits, about half valid, the rest invalid of the kinds in INVALID_KINDS.

    An invalid candidate keeps ``target == source`` (nothing should be done) and says why in
    ``reason``, which starts with the kind ('absent object', 'no change', 'ambiguous reference').
    """
    makers = {"absent": _absent, "no_change": _no_change, "ambiguous": _ambiguous}
    candidates = []
    while len(candidates) < n:
        if rng.random() < 0.5:
            try:
                candidates.append(sample_edit(scene, rng, cfg))
                continue
            except ValueError:
                pass  # nothing valid here: propose an invalid one instead
        made = makers[str(rng.choice(INVALID_KINDS))](scene, rng, cfg)
        if made is not None:
            kind, instruction, reason = made
            candidates.append(make_edit(kind, instruction, scene, scene, cfg, valid=False, reason=reason))
    return candidates

