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

from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from nb_edit import questions, world
from nb_edit.images import to_uint8
from nb_edit.rewards_math import full_vocab_ce, yesno_loss


def removed_object(instruction: str, edit_type: str | None) -> str | None:
    """The object a remove instruction names (ShapesWorld phrasing), else None."""
    if edit_type != "remove":
        return None
    from nb_edit.data.curation import read_instruction  # the world's instruction reader

    read = read_instruction(instruction, "remove")
    return read[1].get("ref") if read else None


class JudgeReward:
    """NP-Edit's questions and the score questions, asked of a :class:`~nb_edit.models.judge.VLMJudge`."""

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
