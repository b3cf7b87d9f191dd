"""NP-Edit's data curation (sec. 3.3): reference images -> candidate instructions -> validity
filter -> kept instructions with edited captions -> an *unpaired* dataset (no target images).

Each stage is a small interface, so the tiny and full profiles differ only in what plugs in:

* a :class:`Proposer` writes candidate instructions for a reference image. In ShapesWorld the
  :class:`TemplateProposer` wraps ``world.propose_candidates``, which also returns invalid
  candidates (absent object, no-op, ambiguous reference) with their true validity, so the
  filter can be scored; :class:`CallableProposer` plugs in an LLM or VLM (full profile);
* a :class:`ValidityFilter` answers ``keep(source_image, candidate)``. NP-Edit asks a VLM to
  reject instructions whose object is absent, that change nothing, or that are too hard;
  :class:`JudgeValidityFilter` adapts any callable that answers yes/no questions about an image
  (the project's VLM judge, a hub VLM, a person), and :class:`OracleValidityFilter` uses the
  world's oracle parser on the source image as the upper bound.

:func:`curate` returns the kept records (no ``target``, asserted) and the filter's precision
and recall against the candidates' true validity.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from nb_edit import world
from nb_edit.core.validation import BadInputError, SkipCounter, check_instruction
from nb_edit.data.schema import EditRecord
from nb_edit.world.config import BACKGROUND_COLOURS, OBJECT_COLOURS, SHAPES, TEXTURES
from nb_edit.world.phrasing import DIRECTIONS, GENERIC_NOUNS, TEMPLATES


@dataclasses.dataclass
class Reference:
    """A reference image to propose edits for; ``scene`` is the ShapesWorld truth when known."""

    id: str
    image: np.ndarray  # uint8 (H, W, 3)
    caption: str
    scene: Any = None
    split: str = "train"


@dataclasses.dataclass
class Candidate:
    """A proposed instruction. ``valid`` / ``reason`` are the truth when the proposer knows it
    (ShapesWorld); a real proposer leaves ``valid`` None and the filter alone decides."""

    instruction: str
    edit_type: str = ""
    caption_edited: str = ""
    subject: str | None = None  # the phrase naming the object the instruction refers to
    valid: bool | None = None
    reason: str = ""
    edit: Any = None  # the world.Edit behind a ShapesWorld candidate


@runtime_checkable
class Proposer(Protocol):
    def propose(self, reference: Reference, rng: np.random.Generator) -> list[Candidate]: ...


@runtime_checkable
class ValidityFilter(Protocol):
    def keep(self, source_image: np.ndarray, candidate: Candidate) -> bool: ...


# ------------------------------------------------------------- reading ShapesWorld instructions

_SLOT_PATTERNS = {
    "colour": "|".join(OBJECT_COLOURS), "shape": "|".join(SHAPES), "texture": "|".join(TEXTURES),
    "bg": "|".join(BACKGROUND_COLOURS), "bg_article": "a|an", "direction": "|".join(w for _, w in DIRECTIONS.values()),
    "ref": "[a-z ]+?", "thing": "[a-z ]+",
}


@functools.lru_cache(maxsize=None)
def _template_patterns() -> list[tuple[str, re.Pattern]]:
    patterns = []
    for key, templates in TEMPLATES.items():
        for template in templates:
            regex = re.sub(r"\\\{([a-z_]+)\\\}", lambda m: f"(?P<{m.group(1)}>{_SLOT_PATTERNS[m.group(1)]})",
                           re.escape(template))
            patterns.append((key, re.compile(f"^{regex}$")))
    return patterns


def read_instruction(instruction: str, edit_type: str = "") -> tuple[str, dict[str, str]] | None:
    """(template key, slots) of a ShapesWorld instruction, e.g. ('colour', {'ref': 'red circle',
    'colour': 'blue'}), or None when no template of ``edit_type`` (any, if empty) matches."""
    for key, pattern in _template_patterns():
        if edit_type and key.split(":")[0] != edit_type:
            continue
        match = pattern.match(instruction)
        if match:
            return key, match.groupdict()
    return None


def resolve_reference(scene: Any, ref: str) -> list[int]:
    """Indices of the objects of ``scene`` that 'the <ref>' can mean (colour and/or shape words;
    'shape' / 'object' name any)."""
    words = ref.split()
    colour = next((w for w in words if w in OBJECT_COLOURS), None)
    shape = next((w for w in words if w in SHAPES), None)
    if any(w not in OBJECT_COLOURS and w not in SHAPES and w not in GENERIC_NOUNS for w in words):
        return []  # a word the world does not know refers to nothing here
    return scene.matching(colour=colour, shape=shape)


def candidate_from_edit(edit: Any) -> Candidate:
    read = read_instruction(edit.instruction, edit.edit_type)
    subject = read[1].get("ref") if read else None
    return Candidate(instruction=edit.instruction, edit_type=edit.edit_type, caption_edited=edit.caption_edited,
                     subject=subject, valid=bool(edit.valid), reason=edit.reason, edit=edit)


class TemplateProposer:
    """ShapesWorld's proposer: ``n`` candidates per scene from ``world.propose_candidates``."""

    def __init__(self, cfg: Any, n: int = 4):
        if n < 1:
            raise BadInputError(f"n={n!r}", "a proposer must propose at least one candidate", "pass n >= 1")
        self.cfg, self.n = cfg, n

    def propose(self, reference: Reference, rng: np.random.Generator) -> list[Candidate]:
        if reference.scene is None:
            raise BadInputError(f"reference {reference.id!r}", "has no scene",
                                "TemplateProposer needs ShapesWorld references; use CallableProposer for photos")
        return [candidate_from_edit(e) for e in world.propose_candidates(reference.scene, rng, self.cfg, self.n)]


class CallableProposer:
    """Wraps ``fn(source_image, caption) -> iterable of str or dict`` (an LLM / VLM prompt).

    A dict may carry ``instruction`` (required), ``edit_type``, ``caption_edited`` and
    ``subject``; a plain string is an instruction alone. A proposal whose instruction is unusable
    (blank, not text, too long: ``check_instruction``) is what a language model writes now and
    then: it is skipped and counted in ``counter`` (``invalid_instruction``), which raises only
    when such proposals pass its threshold. A proposal of the wrong shape is a bug in ``fn`` and raises.
    """

    FIELDS = ("instruction", "edit_type", "caption_edited", "subject")

    def __init__(self, fn: Callable[[np.ndarray, str], Iterable[str | dict[str, Any]]],
                 counter: SkipCounter | None = None):
        if not callable(fn):
            raise BadInputError("proposer fn", f"got a {type(fn).__name__}", "pass a function (image, caption) -> proposals")
        self.fn = fn
        self.counter = counter if counter is not None else SkipCounter(name="proposed instructions")

    def propose(self, reference: Reference, rng: np.random.Generator) -> list[Candidate]:
        candidates = []
        for proposal in self.fn(reference.image, reference.caption):
            if isinstance(proposal, str):
                proposal = {"instruction": proposal}
            if not isinstance(proposal, dict):
                raise BadInputError(f"proposal {proposal!r:.60}", "neither a string nor a dict",
                                    "return instructions as strings or dicts with an 'instruction' key")
            unknown = set(proposal) - set(self.FIELDS)
            if unknown:
                raise BadInputError(f"proposal keys {sorted(unknown)}", "unknown", f"use {', '.join(self.FIELDS)}")
            try:
                text = check_instruction(proposal.get("instruction"),
                                         name=f"instruction proposed for reference {reference.id!r}")
            except BadInputError as error:
                self.counter.skip("invalid_instruction", str(error))
                continue
            self.counter.ok()
            candidates.append(Candidate(**{**proposal, "instruction": text}))
        return candidates


class OracleValidityFilter:
    """The upper bound: read the instruction against its templates, parse the source image with
    the world's oracle (``world.parse``), and keep the candidate only if the object it refers to
    is present and unique there and the requested change is not already true (a no-op).
    Uses the image, never the candidate's truth: its errors are the oracle parser's."""

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self._last: tuple[bytes, Any] | None = None  # candidates come grouped by image: parse once

    def _parse(self, image: np.ndarray) -> Any:
        key = np.ascontiguousarray(image).tobytes()
        if self._last is None or self._last[0] != key:
            self._last = (key, world.parse(image, self.cfg).scene)
        return self._last[1]

    def keep(self, source_image: np.ndarray, candidate: Candidate) -> bool:
        read = read_instruction(candidate.instruction, candidate.edit_type)
        if read is None:
            raise BadInputError(f"candidate {candidate.instruction!r}", "matches no ShapesWorld template",
                                "the oracle filter reads ShapesWorld instructions only; use JudgeValidityFilter")
        key, slots = read
        scene = self._parse(source_image)
        if "ref" in slots:
            matches = resolve_reference(scene, slots["ref"])
            if len(matches) != 1:
                return False  # absent (0) or ambiguous (> 1)
            obj = scene.objects[matches[0]]
            unchanged = {"colour": obj.colour == slots.get("colour"), "texture": obj.texture == slots.get("texture"),
                         "replace": obj.shape == slots.get("shape")}
            return not unchanged.get(key, False)
        if key == "background":
            return scene.background != slots["bg"]
        if key.startswith("style:"):
            return scene.style != key.split(":")[1]
        return True  # add, and "do nothing", which NP-Edit keeps on purpose


# Questions a judge answers for each candidate; NP-Edit's filter rejects absent objects and
# instructions that would change nothing. ``{subject}`` questions are asked only when the
# candidate names its object.
DEFAULT_VALIDITY_QUESTIONS = (
    "Is there exactly one {subject} in the image?",
    "Can the instruction '{instruction}' be carried out on this image, and would it visibly change it?",
)


class JudgeValidityFilter:
    """Adapter for any judge: ``judge_fn(image, question) -> bool or P(yes)``.

    A candidate is kept when every question's answer is yes (probability >= ``threshold``).
    """

    def __init__(self, judge_fn: Callable[[np.ndarray, str], bool | float],
                 questions: Sequence[str] = DEFAULT_VALIDITY_QUESTIONS, threshold: float = 0.5):
        if not callable(judge_fn):
            raise BadInputError("judge_fn", f"got a {type(judge_fn).__name__}",
                                "pass a function (image, question) -> bool or probability of yes")
        if not questions:
            raise BadInputError("questions", "empty", "give at least one yes/no question template")
        self.judge_fn, self.questions, self.threshold = judge_fn, tuple(questions), threshold

    def questions_for(self, candidate: Candidate) -> list[str]:
        fields = {"instruction": candidate.instruction, "edit_type": candidate.edit_type, "subject": candidate.subject}
        return [q.format(**fields) for q in self.questions if "{subject}" not in q or candidate.subject]

    def keep(self, source_image: np.ndarray, candidate: Candidate) -> bool:
        for question in self.questions_for(candidate):
            answer = self.judge_fn(source_image, question)
            if isinstance(answer, (bool, np.bool_)):
                yes = bool(answer)
            elif isinstance(answer, (int, float, np.floating)) and math.isfinite(answer) and 0 <= answer <= 1:
                yes = float(answer) >= self.threshold
            else:
                raise BadInputError(f"judge answer {answer!r} to {question!r}", "not a bool or a probability",
                                    "make judge_fn return True/False or P(yes) in [0, 1]")
            if not yes:
                return False
        return True


@dataclasses.dataclass
class CurationResult:
    records: list[EditRecord]
    images: dict[str, np.ndarray]
    metrics: dict[str, float]


def filter_metrics(truth: Sequence[bool | None], kept: Sequence[bool], reasons: Sequence[str] = ()) -> dict[str, float]:
    """n_candidates, n_kept and, where the truth is known, the filter's precision and recall
    (NaN when undefined or unknown), plus how many invalid candidates of each kind (the reason's
    text before its first ':', e.g. 'absent object') were kept and rejected."""
    reasons = [r.split(":")[0].strip().replace(" ", "_") for r in reasons] or [""] * len(truth)
    n_known = sum(t is not None for t in truth)
    true_positive = sum(bool(t) and k for t, k in zip(truth, kept))
    n_valid = sum(bool(t) for t in truth)
    n_kept_known = sum(k for t, k in zip(truth, kept) if t is not None)
    metrics = {
        "n_candidates": float(len(truth)),
        "n_kept": float(sum(kept)),
        "n_true_valid": float(n_valid) if n_known else math.nan,
        "filter_precision": true_positive / n_kept_known if n_known and n_kept_known else math.nan,
        "filter_recall": true_positive / n_valid if n_known and n_valid else math.nan,
    }
    passed = Counter(r for t, k, r in zip(truth, kept, reasons) if t is False and k)
    rejected = Counter(r for t, k, r in zip(truth, kept, reasons) if t is False and not k)
    for reason in sorted(set(passed) | set(rejected)):
        metrics[f"invalid_kept.{reason or 'unknown'}"] = float(passed[reason])
        metrics[f"invalid_rejected.{reason or 'unknown'}"] = float(rejected[reason])
    return metrics


def curate(
    references: Iterable[Reference],
    proposer: Proposer,
    validity_filter: ValidityFilter,
    rng: np.random.Generator,
) -> CurationResult:
    """Propose, filter and keep; the kept records reference each source image once, no targets."""
    records: list[EditRecord] = []
    images: dict[str, np.ndarray] = {}
    truth: list[bool | None] = []
    kept: list[bool] = []
    reasons: list[str] = []
    for reference in references:
        image_name = f"images/{reference.id}.png"
        scene_json = json.dumps(reference.scene.to_dict(), sort_keys=True) if reference.scene is not None else None
        for index, candidate in enumerate(proposer.propose(reference, rng)):
            keep = bool(validity_filter.keep(reference.image, candidate))
            truth.append(candidate.valid)
            kept.append(keep)
            reasons.append(candidate.reason)
            if not keep:
                continue
            images[image_name] = reference.image
            records.append(EditRecord(
                id=f"{reference.id}-c{index}", source=image_name, instruction=candidate.instruction,
                caption=reference.caption, caption_edited=candidate.caption_edited, edit_type=candidate.edit_type,
                split=reference.split, scene_json=scene_json,
                edit_json=json.dumps(candidate.edit.to_dict(), sort_keys=True) if candidate.edit is not None else None,
            ))
    if any(r.target is not None for r in records):  # NP-Edit trains without pairs: never store one
        raise AssertionError("curation produced a record with a target image; unpaired data must have none")
    return CurationResult(records, images, filter_metrics(truth, kept, reasons))
