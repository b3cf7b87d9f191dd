"""MT-EditFlow's per-turn rewards (Sec. 3.2): instruction following (IF) and
content consistency (CC), each a 1-5 score, for every turn of a multi-turn edit.

Two readings of the judge (the paper's "reasoning modes", a bias / variance trade-off):

* ``expected``: the expected score under the softmax over the digit tokens "1".."5" at the
  answer position (UniWorld-V2's implicit reward): one forward, deterministic, low variance;
* ``sampled``: one score drawn from that same digit distribution with a ``torch.Generator``
  (what a judge that answers by sampling would say): unbiased for the judge's own belief,
  noisier;
* ``generate``: the judge writes its answer and it is parsed (``VLMJudge.generate_score``),
  the path of a hub VLM that thinks before it scores. An unparseable answer is a failure: NaN,
  counted in ``n_failures``, never turned into a score.

Two ways of scoring a sequence:

* ``single``: each turn is judged as a single-turn edit, against the image it edited;
* ``multi``: IF of turn t against the image turn t edited (did *this* instruction happen?), CC
  of turn t against the ORIGINAL source of the sequence, with the instructions of turns 1..t
  (is everything that none of them touch still as it was at the start?). Drift that piles up
  over turns, small in each turn, is visible only this way.

The interface follows :class:`nb_edit.rewards.single_turn.JudgeReward`: ``reward(sources, instructions,
outputs, **meta)`` scores one turn, ``reward.score_turns(...)`` a batch of sequences. The
oracle-backed :class:`MultiTurnOracleReward` answers the same calls with the world's truth, for
"perfect judge" runs.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from nb_edit import world
from nb_edit.core.images import to_uint8
from nb_edit.models.vlm import questions
from nb_edit.models.vlm.judge import single_token_id
from nb_edit.rewards.formulas import expected_score

SCORE_RANGE = (1, 5)
MODES = ("expected", "sampled", "generate")
SCORINGS = ("single", "multi")
# Instructions of several turns in one CC question; " . " is the sentence break the judge's
# templates already use, so a word-level tokenizer knows it.


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is unknown; use one of {', '.join(allowed)}.")


def if_questions(instructions: Sequence[str]) -> list[str]:
    return [questions.IF_SCORE.format(instruction=i) for i in instructions]


def cc_questions(instructions: Sequence[str]) -> list[str]:
    return [questions.CC_SCORE.format(instruction=i) for i in instructions]


def _check_turns(turn_sources: Sequence[Tensor], instructions: Sequence[Sequence[str]],
                 outputs: Sequence[Tensor]) -> None:
    if not len(turn_sources) == len(instructions) == len(outputs) or not outputs:
        raise ValueError(f"turn_sources ({len(turn_sources)}), instructions ({len(instructions)}) and outputs "
                         f"({len(outputs)}) must each hold one entry per turn (at least one).")
    batch = outputs[0].shape[0]
    for turn, (src, ins, out) in enumerate(zip(turn_sources, instructions, outputs)):
        if src.shape != out.shape or len(ins) != batch or out.shape[0] != batch:
            raise ValueError(f"turn {turn}: sources {tuple(src.shape)}, {len(ins)} instructions and outputs "
                             f"{tuple(out.shape)} must agree on a batch of {batch}.")


def cumulative_instructions(instructions: Sequence[Sequence[str]]) -> list[list[str]]:
    """Per turn t and sample, the instructions of turns 1..t joined: what CC against the
    original source must allow to have changed."""
    joined, so_far = [], None
    for turn in instructions:
        so_far = list(turn) if so_far is None else [a + questions.TURN_JOINER + b for a, b in zip(so_far, turn)]
        joined.append(list(so_far))
    return joined


class MultiTurnJudgeReward:
    """IF and CC on 1-5 from a :class:`~nb_edit.models.vlm.judge.VLMJudge` (no gradient: RL rewards)."""

    def __init__(self, judge, mode: str = "expected", scoring: str = "multi", generator: torch.Generator | None = None):
        _check_choice("mode", mode, MODES)
        _check_choice("scoring", scoring, SCORINGS)
        self.judge, self.mode, self.scoring = judge, mode, scoring
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.values = list(range(SCORE_RANGE[0], SCORE_RANGE[1] + 1))

    @torch.no_grad()
    def _scores(self, sources: Tensor, outputs: Tensor, question_list: list[str]) -> tuple[Tensor, int]:
        """One score per sample in the configured mode: ``([B] float32 with NaN for failures, n_failures)``."""
        images = [sources, outputs]
        if self.mode == "generate":
            scores, _, failures = self.judge.generate_score(images, question_list, lo=SCORE_RANGE[0], hi=SCORE_RANGE[1])
            return scores.float().cpu(), int(failures)

        digit_ids = [single_token_id(self.judge.tokenizer, str(v)) for v in self.values]
        digit_logits = self.judge.answer_logits(images, question_list)[:, 0, digit_ids].float().cpu()
        broken = ~torch.isfinite(digit_logits).all(dim=1)  # a judge that returns NaN logits failed
        safe = torch.where(broken[:, None], torch.zeros_like(digit_logits), digit_logits)
        if self.mode == "expected":
            scores = expected_score(safe, self.values)  # sum_k softmax(l)_k * k over the digits 1..5
        else:
            draw = torch.multinomial(safe.softmax(dim=-1), 1, generator=self.generator)[:, 0]
            scores = torch.tensor(self.values, dtype=torch.float32)[draw]  # one sampled answer token
        return torch.where(broken, torch.full_like(scores, math.nan), scores), int(broken.sum())

    def __call__(self, sources: Tensor, instructions: Sequence[str], outputs: Tensor, **meta: Any) -> dict[str, Tensor]:
        """Single-turn scores ``{"if": [B], "cc": [B], "n_failures": tensor}`` on the 1-5 scale."""
        instructions = list(instructions)
        if_scores, if_fail = self._scores(sources, outputs, if_questions(instructions))
        cc_scores, cc_fail = self._scores(sources, outputs, cc_questions(instructions))
        return {"if": if_scores, "cc": cc_scores, "n_failures": torch.tensor(if_fail + cc_fail)}

    def score_turns(self, original: Tensor, turn_sources: Sequence[Tensor], instructions: Sequence[Sequence[str]],
                    outputs: Sequence[Tensor], **meta: Any) -> dict[str, Tensor]:
        """Scores of B sequences of T turns: ``{"if": [B, T], "cc": [B, T], "n_failures": tensor}``.

        ``turn_sources[t]`` is the image turn t edited (turn 0: ``original``), ``outputs[t]`` its
        result. All turns are scored in one batched call per question kind.
        """
        _check_turns(turn_sources, instructions, outputs)
        n_turns, batch = len(outputs), outputs[0].shape[0]
        flat = lambda rows: [x for row in rows for x in row]  # noqa: E731  turn-major, like torch.cat
        all_outputs, all_sources = torch.cat(list(outputs)), torch.cat(list(turn_sources))
        if_scores, if_fail = self._scores(all_sources, all_outputs, if_questions(flat(instructions)))
        if self.scoring == "multi":  # MT-EditFlow multi-turn scoring: CC against the original
            cc_sources = original.expand(n_turns, *original.shape).reshape(all_sources.shape)
            cc_texts = flat(cumulative_instructions(instructions))
        else:
            cc_sources, cc_texts = all_sources, flat(instructions)
        cc_scores, cc_fail = self._scores(cc_sources, all_outputs, cc_questions(cc_texts))
        as_turns = lambda s: s.reshape(n_turns, batch).T.contiguous()  # noqa: E731  [T*B] -> [B, T]
        return {"if": as_turns(if_scores), "cc": as_turns(cc_scores), "n_failures": torch.tensor(if_fail + cc_fail)}


class MultiTurnOracleReward:
    """The same calls answered by the world's oracle (``world.judge``): a perfect judge.

    Scores on 1-5: ``world.graded_score`` = ``1 + 3 * verdict + quality`` (``quality`` in [0, 1] is how well a clean
    render explains the output), so a success scores 4-5, a failure 1-2, and within a group of
    failures the cleaner output still ranks higher. IF reads ``followed``, CC ``preserved``, each
    turn judged against the image it edited. With ``scoring="multi"`` CC of turn t is the lowest
    CC of turns 1..t: the oracle judges one edit at a time, and everything untouched by turns
    1..t is as it was at the start exactly when every turn so far preserved its input (up to the
    oracle's position and size tolerances, which can add up over turns).

    Needs the edits (``meta["edits"]``: B edits for ``__call__``, T lists of B for ``score_turns``).
    """

    def __init__(self, cfg: world.WorldConfig | None = None, scoring: str = "multi"):
        _check_choice("scoring", scoring, SCORINGS)
        self.cfg, self.scoring = cfg or world.WorldConfig(), scoring

    def _verdicts(self, sources: Tensor, outputs: Tensor, edits: Sequence[world.Edit]) -> tuple[Tensor, Tensor]:
        if len(edits) != outputs.shape[0]:
            raise ValueError(f"meta['edits'] holds {len(edits)} edits for {outputs.shape[0]} outputs; "
                             "pass one per sample.")
        verdicts = [world.judge(s, e, o, self.cfg) for s, e, o in zip(to_uint8(sources), edits, to_uint8(outputs))]
        quality = np.array([v.quality for v in verdicts], dtype=np.float32)
        score = lambda flags: torch.from_numpy(world.graded_score(flags, quality, *SCORE_RANGE).astype(np.float32))  # noqa: E731
        return score([v.followed for v in verdicts]), score([v.preserved for v in verdicts])

    def __call__(self, sources: Tensor, instructions: Sequence[str], outputs: Tensor, **meta: Any) -> dict[str, Tensor]:
        if "edits" not in meta:
            raise KeyError("MultiTurnOracleReward needs edits=[world.Edit, ...]: the oracle judges against the truth.")
        if_scores, cc_scores = self._verdicts(sources, outputs, meta["edits"])
        return {"if": if_scores, "cc": cc_scores, "n_failures": torch.tensor(0)}

    def score_turns(self, original: Tensor, turn_sources: Sequence[Tensor], instructions: Sequence[Sequence[str]],
                    outputs: Sequence[Tensor], **meta: Any) -> dict[str, Tensor]:
        _check_turns(turn_sources, instructions, outputs)
        edits = meta.get("edits")
        if edits is None or len(edits) != len(outputs):
            raise KeyError("MultiTurnOracleReward.score_turns needs edits=[[world.Edit] * B for each turn].")
        per_turn = [self._verdicts(s, o, e) for s, o, e in zip(turn_sources, outputs, edits)]
        if_scores = torch.stack([f for f, _ in per_turn], dim=1)
        cc_scores = torch.stack([c for _, c in per_turn], dim=1)
        if self.scoring == "multi":
            cc_scores = torch.cummin(cc_scores, dim=1).values  # consistent with the original = every turn so far was
        return {"if": if_scores, "cc": cc_scores, "n_failures": torch.tensor(0)}
