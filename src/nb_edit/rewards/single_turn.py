"""One reward interface over the VLM judge (and over the oracle, for "perfect judge" runs).

``reward(sources, instructions, outputs, **meta) -> dict of tensors [B]`` serves every
consumer: NP-Edit's differentiable loss, Multi-Reward's scores, MT-EditFlow's per-turn IF/CC
and the evaluation. Images are float tensors (B, 3, H, W) in [-1, 1]; with
``differentiable=True`` the graph to ``outputs`` is kept.

* NP-Edit Sec. 3.1: two yes/no questions per sample, one teacher-forced forward each (no
  generation): edit verification (target "yes") and identity preservation (target "yes"); for
  *remove* edits verification asks whether the output still contains the object (target "no")
  and identity ignores it. ``L_vlm = -sum_j log sigmoid(l_target_j - l_other_j)``.
* Scores (Multi-Reward Sec. 3.1, MT-EditFlow Sec. 3.2) are expected values over the digit
  tokens; judge failures (NaN) are counted under ``n_failures``, never turned into zeros.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from nb_edit import world
from nb_edit.core.images import to_tensor, to_uint8
from nb_edit.data.curation import read_instruction
from nb_edit.data.store import read_dataset, write_dataset
from nb_edit.models.vlm import questions
from nb_edit.rewards.formulas import full_vocab_ce, yesno_loss
from nb_edit.world.config import OBJECT_COLOURS, SHAPES
from nb_edit.world.scene import plural


def removed_object(instruction: str, edit_type: str | None) -> str | None:
    """The object a remove instruction names (ShapesWorld phrasing), else None."""
    if edit_type != "remove":
        return None

    read = read_instruction(instruction, "remove")
    return read[1].get("ref") if read else None


class JudgeReward:
    """NP-Edit's questions and the score questions, asked of a :class:`~nb_edit.models.vlm.judge.VLMJudge`."""

    def __init__(self, judge, differentiable: bool = False):
        self.judge, self.differentiable = judge, differentiable

    def _context(self):
        return torch.enable_grad() if self.differentiable else torch.no_grad()

    def question_logits(self, sources: Tensor, outputs: Tensor, instructions: Sequence[str],
                        edit_types: Sequence[str] | None = None,
                        removed: Sequence[str | None] | None = None) -> dict[str, Tensor]:
        """(target, other) logits of the verification and identity questions, ``[B]`` each.

        ``target`` is the logit of the answer a good edit gets ("yes", or "no" for the remove
        variant of verification), ``other`` the opposite one.
        """
        edit_types = list(edit_types or [None] * len(instructions))
        removed = list(removed or [removed_object(i, t) for i, t in zip(instructions, edit_types)])
        verify = [questions.present(obj) if obj else questions.followed(ins) for ins, obj in zip(instructions, removed)]
        keep = [questions.preserved_remove(obj) if obj else questions.preserved(ins)
                for ins, obj in zip(instructions, removed)]
        images = [sources.detach(), outputs]  # source features need no gradient
        with self._context():
            yes_v, no_v = self.judge.yes_no_logits(images, verify)
            yes_p, no_p = self.judge.yes_no_logits(images, keep)
        flip = torch.tensor([obj is not None for obj in removed], device=yes_v.device)
        return {"verify_target": torch.where(flip, no_v, yes_v), "verify_other": torch.where(flip, yes_v, no_v),
                "identity_target": yes_p, "identity_other": no_p}

    def npedit_loss(self, sources: Tensor, outputs: Tensor, instructions: Sequence[str],
                    edit_types: Sequence[str] | None = None, identity: bool = True,
                    full_vocab: bool = False, temperature: float = 1.0) -> tuple[Tensor, dict[str, float]]:
        """NP-Edit eq. (VLM loss): ``-sum_j log sigmoid((l_target_j - l_other_j) / T)``, batch mean.

        ``identity=False`` drops the preservation question and ``full_vocab=True`` uses the
        full-vocabulary cross-entropy instead of the two-way softmax (the paper's ablations).
        """
        if full_vocab:
            return self._full_vocab_loss(sources, outputs, instructions, edit_types, identity)
        logits = self.question_logits(sources, outputs, instructions, edit_types)
        target = [logits["verify_target"]] + ([logits["identity_target"]] if identity else [])
        other = [logits["verify_other"]] + ([logits["identity_other"]] if identity else [])
        loss = yesno_loss(torch.stack(target, 1), torch.stack(other, 1), temperature)
        stats = {"p_verify": torch.sigmoid(logits["verify_target"] - logits["verify_other"]).mean().item(),
                 "p_identity": torch.sigmoid(logits["identity_target"] - logits["identity_other"]).mean().item()}
        return loss, stats

    def _full_vocab_loss(self, sources, outputs, instructions, edit_types, identity):
        edit_types = list(edit_types or [None] * len(instructions))
        removed = [removed_object(i, t) for i, t in zip(instructions, edit_types)]
        verify = [questions.present(o) if o else questions.followed(i) for i, o in zip(instructions, removed)]
        keep = [questions.preserved_remove(o) if o else questions.preserved(i) for i, o in zip(instructions, removed)]
        images = [sources.detach(), outputs]
        yes_id, no_id = self.judge.yes_id, self.judge.no_id
        verify_logits = self.judge.answer_logits(images, verify)[:, 0]
        targets = torch.tensor([no_id if o else yes_id for o in removed], device=verify_logits.device)
        losses = [torch.nn.functional.cross_entropy(verify_logits.float(), targets)]
        if identity:
            keep_logits = self.judge.answer_logits(images, keep)[:, 0]
            losses.append(full_vocab_ce(keep_logits, yes_id))
        return sum(losses), {}

    def score(self, sources: Tensor, outputs: Tensor, question_list: Sequence[str],
              values: Sequence[int] = range(0, 6)) -> Tensor:
        with self._context():
            return self.judge.expected_score([sources.detach(), outputs], list(question_list), values)

    def __call__(self, sources: Tensor, instructions: Sequence[str], outputs: Tensor, **meta: Any) -> dict[str, Tensor]:
        """P(yes) of verification and identity, and the 0-5 quality score mapped to [0, 1]."""
        logits = self.question_logits(sources, outputs, instructions, meta.get("edit_types"))
        quality = self.score(sources, outputs, [questions.QUALITY] * len(instructions)) / 5.0
        followed = torch.sigmoid(logits["verify_target"] - logits["verify_other"])
        preserved = torch.sigmoid(logits["identity_target"] - logits["identity_other"])
        failures = (~torch.isfinite(followed) | ~torch.isfinite(preserved) | ~torch.isfinite(quality)).sum()
        return {"followed": followed, "preserved": preserved, "quality": quality, "n_failures": failures}


class OracleReward:
    """The same interface answered by the world's oracle: what a perfect judge would say.

    Needs the edits themselves (``meta["edits"]``): the oracle knows the truth.
    """

    def __init__(self, cfg: world.WorldConfig | None = None):
        self.cfg = cfg or world.WorldConfig()

    def __call__(self, sources: Tensor, instructions: Sequence[str], outputs: Tensor, **meta: Any) -> dict[str, Tensor]:
        edits: Sequence[world.Edit] = meta["edits"]
        src, out = to_uint8(sources), to_uint8(outputs)
        verdicts = [world.judge(s, e, o, self.cfg) for s, e, o in zip(src, edits, out)]
        as_tensor = lambda xs: torch.tensor(np.asarray(xs, dtype=np.float32))  # noqa: E731
        return {"followed": as_tensor([v.followed for v in verdicts]),
                "preserved": as_tensor([v.preserved for v in verdicts]),
                "quality": as_tensor([v.quality for v in verdicts]), "n_failures": torch.tensor(0)}


# ----------------------------------------------------- Multi-Reward as Condition (seed 003, Sec. 3)
#
# RewardEdit-style annotations: per triplet three 0-5 scores (expected values over the digit
# tokens) and per perspective a failure text that NAMES what failed. In ShapesWorld the text is
# assembled from targeted yes/no questions about the objects the captions and the instruction
# name ("does image 2 contain a red circle?"); a full-profile VLM can write it instead through
# ``failure_text_fn``. The tiny text encoder's vocabulary holds the world's words and every word
# of these texts (``failure_text_words``), so "not" and "None" reach the editor as words.

PERSPECTIVES = ("following", "preserving", "quality")
NO_FAILURE = "None"
UNKNOWN_TEXT = "unknown"  # the failure text of a dropped condition (Multi-Reward's "unknown" reward)
QUALITY_FAILURE = "the picture is noisy or blurred"
PRESERVING_FALLBACK = "the rest of the image changed"
FAILURE_JOINER = "; "  # Concat[T_f, T_p, T_q] of Multi-Reward eq. 5
# What a following failure says, per edit type (placeholders: the instruction's slots, ``ref`` the
# object it names, ``new`` the object it adds); ``FOLLOWING_FALLBACK`` when the instruction is not read.
FOLLOWING_FAILURES = {
    "colour": "the {ref} is not {colour}",
    "replace": "the {ref} is not a {shape}",
    "add": "there is no {new}",
    "remove": "the {ref} is still there",
    "texture": "the {ref} is not {texture}",
    "resize:bigger": "the {ref} is not bigger",
    "resize:smaller": "the {ref} is not smaller",
    "move": "the {ref} did not move {direction}",
    "background": "the background is not {bg}",
    "style:grayscale": "the picture is not grayscale",
    "style:invert": "the colours are not inverted",
    "count": "there is no second {ref}",
    "noop": "the image changed",
}
FOLLOWING_FALLBACK = "the edit was not carried out"
QUALITY_THRESHOLD = 3.5  # a quality score below this gets the quality failure text

# (sources [N], outputs [N], questions [N]) -> bool [N]: did the judge answer "yes"?
YesFn = Callable[[Tensor, Tensor, Sequence[str]], Tensor]
FailureTextFn = Callable[..., list[dict[str, str]]]


def caption_objects(caption: str | None) -> set[str]:
    """The "<colour> <shape>" names a ShapesWorld caption mentions ("two red circles" -> red circle)."""

    shape_of = {**{s: s for s in SHAPES}, **{plural(s): s for s in SHAPES}}
    tokens = world.words(caption or "")
    return {f"{a} {shape_of[b]}" for a, b in zip(tokens, tokens[1:]) if a in OBJECT_COLOURS and b in shape_of}


def _object_name(phrase: str | None) -> str | None:
    """"red circle" from a reference or an added thing ("a striped red circle"); None if generic."""
    names = caption_objects(phrase)
    return next(iter(names)) if len(names) == 1 else None


@dataclass
class InstructionReading:
    """What a ShapesWorld instruction asks, in object names: ``gone`` must vanish, ``new`` appear."""

    key: str | None
    slots: dict[str, str]
    ref: str | None
    gone: set[str]
    new: set[str]


def read_edit(instruction: str, edit_type: str | None = None) -> InstructionReading:

    read = read_instruction(instruction, edit_type or "") or read_instruction(instruction)
    key, slots = read if read else (None, {})
    ref = _object_name(slots.get("ref"))
    gone: set[str] = set()
    new: set[str] = set()
    if ref and key in ("colour", "replace", "remove"):
        gone.add(ref)
    if ref and key == "colour":
        new.add(f"{slots['colour']} {ref.split()[1]}")
    elif ref and key == "replace":
        new.add(f"{ref.split()[0]} {slots['shape']}")
    elif key == "add" and _object_name(slots.get("thing")):
        new.add(_object_name(slots["thing"]))
    return InstructionReading(key, slots, ref, gone, new)


def not_followed_text(instruction: str, edit_type: str | None = None) -> str:
    """The following failure when the requested change is absent, naming object and attribute."""
    r = read_edit(instruction, edit_type)
    if r.key not in FOLLOWING_FAILURES:
        return FOLLOWING_FALLBACK
    return FOLLOWING_FAILURES[r.key].format(**{**r.slots, "ref": r.ref or "object",
                                               "new": next(iter(r.new), "new object")})


def failure_text_words() -> list[str]:
    """Every word the failure texts add to a world's (object, attribute and direction names come from
    the world's vocabulary), for the word-level tokenizer of the editor that reads them."""
    texts = [NO_FAILURE, UNKNOWN_TEXT, QUALITY_FAILURE, PRESERVING_FALLBACK, FAILURE_JOINER, FOLLOWING_FALLBACK,
             "object new", "the and is still there changed", *FOLLOWING_FAILURES.values()]  # + the judge's own
    return sorted({w for text in texts for w in text.replace("{", " {").split() if not w.startswith("{")})


def judge_yes(reward_judge: JudgeReward, chunk: int = 64) -> YesFn:
    """A :data:`YesFn` from the judge's yes/no logits (``logit_yes > logit_no``), in chunks."""
    def ask(sources: Tensor, outputs: Tensor, question_list: Sequence[str]) -> Tensor:
        answers = []
        with torch.no_grad():
            for lo in range(0, len(question_list), chunk):
                part = slice(lo, lo + chunk)
                yes, no = reward_judge.judge.yes_no_logits([sources[part], outputs[part]], list(question_list[part]))
                answers.append(yes > no)
        return torch.cat(answers) if answers else torch.zeros(0, dtype=torch.bool)
    return ask


def world_failure_texts(ask: YesFn, sources: Tensor, instructions: Sequence[str], outputs: Tensor,
                        edit_types: Sequence[str | None], captions: Sequence[str | None],
                        captions_edited: Sequence[str | None], quality: Tensor,
                        quality_threshold: float = QUALITY_THRESHOLD) -> list[dict[str, str]]:
    """Failure texts per perspective from targeted yes/no questions on the output image.

    Presence of every object named in the source caption, the edited caption and the instruction
    is asked; what the instruction wanted gone or new decides following ("the red circle is not
    blue", "the yellow square is still there"), a missing object it did not touch decides
    preserving ("the green triangle changed"). Edits that presence cannot check (texture, size,
    position, background, style, count, no-op) ask the instruction's own yes/no question
    instead, and so does preserving when every named object is in place.
    """
    readings = [read_edit(i, t) for i, t in zip(instructions, edit_types)]
    plans = []  # per sample: the objects that must be present / absent
    for r, cap, cap_edit in zip(readings, captions, captions_edited):
        if r.key and r.key.startswith("style"):  # colours change under a style: presence says nothing
            plans.append((set(), set()))
            continue
        before = caption_objects(cap) | r.gone | ({r.ref} if r.ref else set())
        after = caption_objects(cap_edit) if cap_edit else (before - r.gone) | r.new
        plans.append((after | r.new, before - after - r.new))
    # first round: presence questions, plus the instruction's own question where presence is blind
    rows, asked = [], []
    for b, (r, (must, must_not), instruction) in enumerate(zip(readings, plans, instructions)):
        for name in sorted(must | must_not):
            rows.append(b)
            asked.append(questions.present(name))
        if not (r.gone or r.new):
            rows.append(b)
            asked.append(questions.followed(instruction))
    index = torch.tensor(rows, dtype=torch.long)
    yes = ask(sources[index], outputs[index], asked).tolist() if rows else []
    answer = {(b, q): y for b, q, y in zip(rows, asked, yes)}
    texts, fallback = [], []
    for b, (r, (must, must_not), instruction) in enumerate(zip(readings, plans, instructions)):
        has = lambda name: answer[(b, questions.present(name))]  # noqa: E731
        if r.gone or r.new:
            if any(not has(n) for n in r.new):
                following = not_followed_text(instruction, edit_types[b])
            elif any(has(n) for n in r.gone):
                following = f"the {' and the '.join(sorted(n for n in r.gone if has(n)))} is still there"
            else:
                following = NO_FAILURE
        else:
            following = NO_FAILURE if answer[(b, questions.followed(instruction))] else \
                not_followed_text(instruction, edit_types[b])
        changed = sorted(n for n in must - r.new if not has(n))
        preserving = f"the {' and the '.join(changed)} changed" if changed else NO_FAILURE
        if not changed:
            fallback.append(b)
        bad_quality = bool(torch.isfinite(quality[b])) and float(quality[b]) < quality_threshold
        texts.append({"following": following, "preserving": preserving,
                      "quality": QUALITY_FAILURE if bad_quality else NO_FAILURE})
    if fallback:  # second round: nothing named is missing; did anything else change?
        keep = [questions.preserved_remove(readings[b].ref) if readings[b].key == "remove" and readings[b].ref
                else questions.preserved(instructions[b]) for b in fallback]
        index = torch.tensor(fallback, dtype=torch.long)
        for b, same in zip(fallback, ask(sources[index], outputs[index], keep).tolist()):
            if not same:
                texts[b]["preserving"] = PRESERVING_FALLBACK
    return texts


def multi_perspective(reward_judge: JudgeReward, sources: Tensor, instructions: Sequence[str], outputs: Tensor,
                      edit_types: Sequence[str | None] | None = None, *,
                      captions: Sequence[str | None] | None = None,
                      captions_edited: Sequence[str | None] | None = None,
                      failure_text_fn: FailureTextFn | None = None, ask: YesFn | None = None,
                      quality_threshold: float = QUALITY_THRESHOLD) -> dict[str, Any]:
    """Multi-Reward Sec. 3: three 0-5 scores per sample and a failure text per perspective.

    Returns ``{"following", "preserving", "quality"}`` as tensors [B] (expected values over the
    digit tokens; NaN = judge failure, counted in ``n_failures``) and ``<perspective>_text`` as
    lists of strings ("None" when nothing failed). ``failure_text_fn(sources=, instructions=,
    outputs=, edit_types=, captions=, captions_edited=, scores=)`` replaces the ShapesWorld
    question recipe (e.g. a hub VLM writing the texts); ``ask`` replaces the judge's yes/no
    answers inside it (default :func:`judge_yes`).
    """
    batch = len(instructions)
    if sources.shape[0] != batch or outputs.shape[0] != batch:
        raise ValueError(f"multi_perspective: {batch} instructions but {sources.shape[0]} sources and "
                         f"{outputs.shape[0]} outputs; pass one of each per sample.")
    per_sample = lambda xs: list(xs) if xs is not None else [None] * batch  # noqa: E731
    edit_types, captions, captions_edited = per_sample(edit_types), per_sample(captions), per_sample(captions_edited)
    scores = {
        "following": reward_judge.score(sources, outputs, [questions.FOLLOWING_SCORE.format(instruction=i)
                                                          for i in instructions]),
        "preserving": reward_judge.score(sources, outputs, [questions.PRESERVING_SCORE.format(instruction=i)
                                                           for i in instructions]),
        "quality": reward_judge.score(sources, outputs, [questions.QUALITY] * batch),
    }
    scores = {k: v.detach().float().cpu() for k, v in scores.items()}
    if failure_text_fn is not None:
        texts = failure_text_fn(sources=sources, instructions=list(instructions), outputs=outputs,
                                edit_types=edit_types, captions=captions, captions_edited=captions_edited,
                                scores=scores)
    else:
        texts = world_failure_texts(ask or judge_yes(reward_judge), sources, instructions, outputs, edit_types,
                                    captions, captions_edited, scores["quality"], quality_threshold)
    if len(texts) != batch:
        raise ValueError(f"failure_text_fn returned {len(texts)} entries for {batch} samples.")
    failures = sum((~torch.isfinite(v)).sum() for v in scores.values())
    return {**scores, **{f"{p}_text": [t.get(p) or NO_FAILURE for t in texts] for p in PERSPECTIVES},
            "n_failures": failures}


def annotate_rewards(dataset, reward_judge: JudgeReward, out_folder, batch_size: int = 32,
                     overwrite: bool = False, **multi_perspective_kwargs: Any):
    """A RewardEdit-style copy of a paired ``dataset`` (``data.store.EditDataset``) in ``out_folder``.

    Each record's ``rewards`` becomes ``{"following": s, "preserving": s, "quality": s,
    "following_text": ..., "preserving_text": ..., "quality_text": ...}`` for (source,
    instruction, target); a score the judge failed on is left out (read back as unknown).
    Images are copied. Returns the new dataset as ``data.store.read_dataset`` reads it.
    """

    if len(dataset) == 0:
        raise ValueError("annotate_rewards: the dataset is empty; pass the noisy paired set.")
    unpaired = [r.id for r in dataset if not r.paired]
    if unpaired:
        raise ValueError(f"annotate_rewards: {len(unpaired)} records have no target (first {unpaired[0]!r}); "
                         "rewards judge (source, instruction, target) triplets, so pass a paired dataset.")
    records, images = [], {}
    for lo in range(0, len(dataset), batch_size):
        idx = list(range(lo, min(lo + batch_size, len(dataset))))
        samples = [dataset.load(i) for i in idx]
        recs = [dataset[i] for i in idx]
        out = multi_perspective(reward_judge, to_tensor(np.stack([s["source"] for s in samples])),
                                [r.instruction for r in recs], to_tensor(np.stack([s["target"] for s in samples])),
                                [r.edit_type or None for r in recs], captions=[r.caption or None for r in recs],
                                captions_edited=[r.caption_edited or None for r in recs], **multi_perspective_kwargs)
        for k, (i, rec) in enumerate(zip(idx, recs)):
            rewards: dict[str, float | str] = {f"{p}_text": out[f"{p}_text"][k] for p in PERSPECTIVES}
            rewards.update({p: round(float(out[p][k]), 4) for p in PERSPECTIVES if math.isfinite(float(out[p][k]))})
            records.append(dataclasses.replace(rec, rewards=rewards))
            for field in ("source", "target"):
                images[getattr(rec, field)] = dataset.image_path(i, field)
    write_dataset(records, images, out_folder, description="RewardEdit-style annotations (Multi-Reward Sec. 3)",
                  overwrite=overwrite)
    return read_dataset(out_folder)
