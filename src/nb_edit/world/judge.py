"""The oracle's verdict on (source image, edit, output image): the ground truth every learned
judge (NP-Edit's yes/no VLM, MT-EditFlow's IF/CC scores, Multi-Reward's three perspectives)
is measured against.

- ``followed``: the parsed output matches the edit's target in the edited attributes
  (discrete ones exactly; a move or resize must cover at least half the intended change);
- ``preserved``: everything the edit does not touch is unchanged against the parsed source
  image (positions within ``cfg.pos_tol``, sizes within ``cfg.size_tol``), and no object
  appeared or vanished other than by the edit;
- ``quality``: how well a clean re-render of the parsed output explains it (1 = clean render);
- ``success = followed and preserved``.

:func:`graded_score` turns a verdict into the graded score a perfect judge would give on a
``lo..hi`` scale (Multi-Reward's 0-5 perspectives, MT-EditFlow's 1-5 IF and CC).
Parsing the actual source image (not the ideal scene) keeps multi-turn judging fair when a
turn edits an imperfect output of the previous turn. An invalid candidate is followed only
by leaving the image unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment

from .config import WorldConfig
from .edits import Edit
from .oracle import parse
from .scene import Obj

MAX_MATCH_COST = 0.6
EDITED_ATTRIBUTE = {"replace": "shape", "colour": "colour", "texture": "texture", "resize": "size", "move": "position"}


@dataclass(frozen=True)
class Verdict:
    followed: bool
    preserved: bool
    quality: float
    success: bool
    details: dict = field(default_factory=dict)


def graded_score(flag, quality, lo: int = 0, hi: int = 5):
    """The oracle's score on ``lo..hi``: ``lo + (hi - lo) * (0.75 * flag + 0.25 * quality)``.

    ``flag`` (followed or preserved) decides the upper or the lower part of the scale and
    ``quality`` in [0, 1] ranks within it, so a success scores at least ``lo + 0.75 (hi - lo)``,
    a failure at most ``lo + 0.25 (hi - lo)``, and among failures a cleaner output ranks higher.
    On 1-5 this is ``1 + 3 * flag + quality``. Works on floats and numpy arrays alike.
    """
    return lo + (hi - lo) * (0.75 * np.asarray(flag, dtype=np.float32) + 0.25 * np.clip(np.asarray(quality, dtype=np.float32), 0.0, 1.0))


def _cost(a: Obj, b: Obj) -> float:
    return (float(np.hypot(a.x - b.x, a.y - b.y)) + 0.25 * (a.shape != b.shape) + 0.25 * (a.colour != b.colour)
            + 0.1 * (a.texture != b.texture) + 0.5 * abs(float(np.log(a.size / b.size))))


def match(reference: list[Obj], parsed: tuple[Obj, ...]) -> dict[int, int]:
    """Reference index -> parsed index, by least total cost (position first, then attributes)."""
    if not reference or not parsed:
        return {}
    costs = np.array([[_cost(r, p) for p in parsed] for r in reference])
    rows, cols = linear_sum_assignment(costs)
    return {int(r): int(c) for r, c in zip(rows, cols) if costs[r, c] <= MAX_MATCH_COST}


def differences(a: Obj, b: Obj, cfg: WorldConfig, skip: str = "") -> list[str]:
    """Attributes in which ``b`` differs from ``a`` beyond the tolerances (``skip`` ignored)."""
    found = [k for k in ("shape", "colour", "texture") if k != skip and getattr(a, k) != getattr(b, k)]
    if skip != "size" and abs(np.log(b.size / a.size)) > np.log1p(cfg.size_tol):
        found.append("size")
    if skip != "position" and np.hypot(b.x - a.x, b.y - a.y) > cfg.pos_tol:
        found.append("position")
    return found


def _remnant(obj: Obj, gone: Obj) -> bool:
    """Whether ``obj`` could be what is left of the removed ``gone``: the same name, or its place."""
    return (obj.colour, obj.shape) == (gone.colour, gone.shape) or np.hypot(obj.x - gone.x, obj.y - gone.y) < gone.radius


def _index_in_target(edit: Edit, i: int) -> int | None:
    k = edit.obj_index
    if edit.edit_type == "remove" and edit.valid:
        return None if i == k else (i - 1 if i > k else i)
    return i


def judge(source_image: np.ndarray, edit: Edit, output_image: np.ndarray, cfg: WorldConfig) -> Verdict:
    """Judge whether ``output_image`` carries out ``edit`` on ``source_image``; see the module doc."""
    src, out = parse(source_image, cfg), parse(output_image, cfg)
    ps, po = src.scene, out.scene
    kind = edit.edit_type if edit.valid else "noop"
    es, et = edit.source, edit.target
    persisting = [i for i in range(len(es.objects)) if _index_in_target(edit, i) is not None]
    src_match = match(list(es.objects), ps.objects)
    out_match = match([et.objects[_index_in_target(edit, i)] for i in persisting], po.objects)
    out_of = {i: out_match.get(n) for n, i in enumerate(persisting)}  # source index -> output index
    failures: list[str] = []

    def source_obj(i):  # the object as the source image shows it (the ideal one if unparsed)
        return ps.objects[src_match[i]] if i in src_match else es.objects[i]

    # preserved: untouched global attributes, untouched objects, nothing unexplained
    if kind != "style" and po.style != ps.style:
        failures.append(f"style changed {ps.style} -> {po.style}")
    if kind != "background" and po.background != ps.background:
        failures.append(f"background changed {ps.background} -> {po.background}")
    if po.bg_texture != ps.bg_texture:
        failures.append(f"background texture changed {ps.bg_texture} -> {po.bg_texture}")
    edited = edit.obj_index if kind in EDITED_ATTRIBUTE else -1
    for i in persisting:
        if out_of[i] is None:
            if i != edited:
                failures.append(f"the {es.objects[i].name} is missing")
            continue
        skip = EDITED_ATTRIBUTE[kind] if i == edited else ""
        for attr in differences(source_obj(i), po.objects[out_of[i]], cfg, skip=skip):
            failures.append(f"the {es.objects[i].name} changed its {attr}")
    extras = [po.objects[j] for j in range(len(po.objects)) if j not in out_match.values()]
    if kind in ("add", "count") and extras:
        expected = et.objects[-1]
        same = [o for o in extras if (o.colour, o.shape) == (expected.colour, expected.shape)]
        explained = same[:1] if same else extras[:1]  # one extra object is the edit's to judge
        extras = [o for o in extras if o is not explained[0]]
    if kind == "remove":  # what is left of the removed object is the edit's to judge
        extras = [o for o in extras if not _remnant(o, es.objects[edit.obj_index])]
    failures += [f"an unexpected {o.name} appeared" for o in extras]
    preserved = not failures

    # followed: the edited attribute matches the target
    followed = _followed(kind, edit, ps, po, out_of, source_obj, preserved, cfg)
    quality = out.quality
    details = dict(failures=failures, parsed_source=ps.to_dict(), parsed_output=po.to_dict(),
                   source_confidence=src.confidence, output_confidence=out.confidence)
    return Verdict(bool(followed), bool(preserved), float(quality), bool(followed and preserved), details)


def _followed(kind, edit, ps, po, out_of, source_obj, preserved, cfg) -> bool:
    et = edit.target
    if kind == "noop":
        return preserved
    if kind in ("background", "style"):
        return getattr(po, kind) == getattr(et, kind)
    if kind in ("add", "count"):
        new = et.objects[-1]
        keys = ("colour", "shape", "texture") if kind == "add" else ("colour", "shape")
        count = lambda scene: sum(all(getattr(o, k) == getattr(new, k) for k in keys) for o in scene.objects)
        return count(po) == count(ps) + 1
    k = edit.obj_index
    ref = edit.source.objects[k]
    if kind == "remove":
        return not any(_remnant(o, ref) for o in po.objects)
    if out_of.get(k) is None:
        return False
    got, wanted, was = po.objects[out_of[k]], et.objects[k], source_obj(k)
    if kind in ("replace", "colour", "texture"):
        return getattr(got, EDITED_ATTRIBUTE[kind]) == getattr(wanted, EDITED_ATTRIBUTE[kind])
    if kind == "resize":
        intended = np.log(wanted.size / ref.size)
        return np.log(got.size / was.size) * np.sign(intended) >= 0.5 * abs(intended)
    # move: at least half the intended way along its direction, little drift across it
    intended = np.array([wanted.x - ref.x, wanted.y - ref.y])
    unit = intended / np.linalg.norm(intended)
    moved = np.array([got.x - was.x, got.y - was.y])
    across = abs(moved[0] * unit[1] - moved[1] * unit[0])
    return moved @ unit >= 0.5 * np.linalg.norm(intended) and across <= cfg.pos_tol
