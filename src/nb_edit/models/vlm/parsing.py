"""Reading scores and yes/no verdicts out of a judge's generated text.

Judges asked to "generate and parse" answer in many shapes: ``Score: 4``, ``4/5``, a bare
``4``, MT-EditFlow's multi-turn tags ``<Turn1Score>3</Turn1Score>`` (seed 001, appendix), often
after a reasoning block. These parsers never raise: an answer they cannot read, or a score out
of range, gives ``None``, so the caller counts judge failures instead of training on a guess.

Rules, in order: closed reasoning blocks (``<Thought>...</Thought>``, ``<think>...</think>``)
are dropped; a ``<...Score>`` tag wins; then the last ``score: N`` / ``rating: N``; then the last
``N/hi`` or ``N out of hi`` whose denominator is the scale's top; then a text that is only a
number; then a text with exactly one number. Anything else is ``None``.
"""

from __future__ import annotations

import math
import re

NUMBER = r"([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)"
_REASONING = re.compile(r"<(thought|think|thinking|reasoning)>.*?</\1>", re.IGNORECASE | re.DOTALL)
_TAG = re.compile(r"<(\w*score\w*)>\s*" + NUMBER + r"\s*</\1>", re.IGNORECASE)
_LABELLED = re.compile(r"\b(?:score|rating|rated)\s*(?:is|of|:|=|-)?\s*" + NUMBER + r"(?![\w.])",
                       re.IGNORECASE)
_FRACTION = re.compile(NUMBER + r"\s*(?:/|out\s+of)\s*" + NUMBER, re.IGNORECASE)
_ONLY_NUMBER = re.compile(r"^\W*?" + NUMBER + r"[\s.!)\]*]*$")
_ANY_NUMBER = re.compile(r"(?<![\w.])" + NUMBER + r"(?![\w])")
_ANSWER = re.compile(r"\banswer\s*(?:is|:|=|-)?\s*\W*\b(yes|no)\b", re.IGNORECASE)
_LEADING = re.compile(r"^\W*(yes|no)\b", re.IGNORECASE)
_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


def _drop_reasoning(text: str) -> str:
    return _REASONING.sub(" ", text)


def _in_range(value: str, lo: float, hi: float) -> float | None:
    try:
        number = float(value)
    except (OverflowError, ValueError):
        return None
    return number if math.isfinite(number) and lo <= number <= hi else None


def parse_score(text: object, lo: float = 0, hi: float = 5) -> float | None:
    """The score in a judge's answer, if one in ``[lo, hi]`` can be read; else ``None``."""
    if not isinstance(text, str):
        return None
    answer = _drop_reasoning(text)
    tag = _TAG.search(answer)
    if tag:
        return _in_range(tag.group(2), lo, hi)
    labelled = _LABELLED.findall(answer)
    if labelled:
        return _in_range(labelled[-1], lo, hi)
    for numerator, denominator in reversed(_FRACTION.findall(answer)):
        if _in_range(denominator, hi, hi) is not None:
            return _in_range(numerator, lo, hi)
    only = _ONLY_NUMBER.match(answer.strip())
    if only:
        return _in_range(only.group(1), lo, hi)
    numbers = _ANY_NUMBER.findall(answer)
    return _in_range(numbers[0], lo, hi) if len(numbers) == 1 else None


def parse_turn_scores(text: object, n_turns: int, lo: float = 0, hi: float = 5) -> list[float | None]:
    """Per-turn scores from a multi-turn answer (``<TurnKScore>N</TurnKScore>`` or
    ``Turn K score: N`` / ``Turn K: N``); a missing or out-of-range turn gives ``None``."""
    scores: list[float | None] = [None] * max(int(n_turns), 0)
    if not isinstance(text, str):
        return scores
    answer = _drop_reasoning(text)
    for turn in range(1, len(scores) + 1):
        tagged = re.findall(rf"<turn\s*{turn}\s*score>\s*{NUMBER}\s*</turn\s*{turn}\s*score>",
                            answer, re.IGNORECASE)
        plain = re.findall(rf"\bturn\s*{turn}\b\s*(?:score)?\s*[:=-]\s*{NUMBER}(?![\w.])",
                           answer, re.IGNORECASE)
        found = tagged or plain
        if found:
            scores[turn - 1] = _in_range(found[-1], lo, hi)
    return scores


def parse_yes_no(text: object) -> bool | None:
    """A judge's verdict: an ``Answer: yes/no``, else a leading yes/no, else the only one of the
    two words present. No verdict, or both words without a leading one, gives ``None``."""
    if not isinstance(text, str):
        return None
    answer = _drop_reasoning(text).strip()
    found = _ANSWER.findall(answer)
    if found:
        return found[-1].lower() == "yes"
    leading = _LEADING.match(answer)
    if leading:
        return leading.group(1).lower() == "yes"
    words = {word.lower() for word in _YES_NO.findall(answer)}
    return (words.pop() == "yes") if len(words) == 1 else None
