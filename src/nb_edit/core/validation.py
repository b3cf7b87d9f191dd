"""Checks for everything that comes from outside the code: instructions, edit types, notebook
parameters and dataset metadata.

Every check raises :class:`BadInputError`, whose message always has three parts: which input,
what is wrong with it, and how to fix it. A dataset does not stop at its first bad sample:
:class:`SkipCounter` skips and counts bad samples by reason and raises only when their share
passes a threshold, so one broken line does not kill a run but a broken dataset does.
"""

from __future__ import annotations

import difflib
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PROFILES = ("tiny", "full", "smoke")


class BadInputError(ValueError):
    """An input the code cannot use; ``str(error)`` names the input, the problem and the fix."""

    def __init__(self, input_name: object, problem: str, fix: str):
        self.input_name, self.problem, self.fix = str(input_name), problem, fix
        super().__init__(f"{self.input_name}: {problem}. Fix: {fix}")


class TooManyBadSamples(BadInputError):
    """Raised by :class:`SkipCounter` when the share of skipped samples passes its threshold."""


def _closest(value: object, allowed) -> str:
    match = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def check_instruction(text: object, max_words: int = 64, name: str = "instruction",
                      max_chars: int = 1000) -> str:
    """Return the instruction stripped of surrounding blanks, or raise for an unusable one.

    ``max_words`` guards the text encoders, which truncate silently (CLIP at 77 tokens);
    ``max_chars`` guards against text that is one "word" only by count (a 5 MB string without
    spaces), which would otherwise reach the tokenizer, the metadata and every log line.
    """
    if not isinstance(text, str):
        raise BadInputError(name, f"expected a str, got {type(text).__name__} ({text!r:.60})",
                            "pass the edit instruction as text, e.g. 'make the circle red'")
    stripped = text.strip()
    if not stripped:
        raise BadInputError(name, "the instruction is empty",
                            "write what to change, e.g. 'make the circle red'")
    if len(stripped) > max_chars:
        raise BadInputError(f"{name} {stripped[:40]!r}...", f"{len(stripped):,} characters, over the limit of "
                            f"{max_chars:,}", f"shorten it to at most {max_chars:,} characters or raise max_chars")
    n_words = len(stripped.split())
    if n_words > max_words:
        raise BadInputError(f"{name} {stripped[:40]!r}...", f"{n_words} words, over the limit of "
                            f"{max_words} (text encoders truncate longer prompts silently)",
                            f"shorten it to at most {max_words} words or raise max_words")
    return stripped


def check_edit_type(edit_type: object, allowed) -> str:
    """Return ``edit_type`` if it is one of ``allowed``, else raise naming the closest one."""
    allowed = tuple(allowed)
    if edit_type not in allowed:
        raise BadInputError(f"edit_type {edit_type!r}", "unknown edit type" + _closest(edit_type, allowed),
                            f"use one of {', '.join(map(str, allowed))}")
    return edit_type


@dataclass(frozen=True)
class Param:
    """The specification of one notebook (papermill) parameter."""

    type: type
    lo: float | None = None
    hi: float | None = None
    choices: tuple | None = None
    required_for: tuple[str, ...] = ()  # profiles under which an empty value is an error


def check_params(params: dict[str, Any], spec: dict[str, Param]) -> dict[str, Any]:
    """Check papermill parameters against ``spec``; return them with ints widened to floats.

    A ``profile`` parameter must be one of :data:`PROFILES`; a parameter whose spec names a
    profile in ``required_for`` (e.g. a hub model id under ``full``) must then be non-empty.
    """
    checked = dict(params)
    for name, value in params.items():
        where = f"parameter {name!r}"
        if name not in spec:
            raise BadInputError(where, "unknown parameter" + _closest(name, spec),
                                f"use one of {', '.join(spec)} (papermill -p NAME VALUE)")
        rule = spec[name]
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if rule.type is float and is_number:
            checked[name] = value = float(value)
        elif rule.type is int and isinstance(value, float) and value.is_integer():
            checked[name] = value = int(value)
        if value is not None and (not isinstance(value, rule.type)
                                  or (rule.type is int and isinstance(value, bool))):
            raise BadInputError(where, f"got {value!r} of type {type(value).__name__}, "
                                f"expected {rule.type.__name__}",
                                f"pass a value of type {rule.type.__name__}, e.g. papermill -p {name} <value>")
        if rule.lo is not None and value is not None and value < rule.lo:
            raise BadInputError(where, f"{value!r} is below the minimum {rule.lo}",
                                f"pass a value in [{rule.lo}, {rule.hi if rule.hi is not None else 'inf'}]")
        if rule.hi is not None and value is not None and value > rule.hi:
            raise BadInputError(where, f"{value!r} is above the maximum {rule.hi}",
                                f"pass a value in [{rule.lo if rule.lo is not None else '-inf'}, {rule.hi}]")
        choices = PROFILES if name == "profile" else rule.choices
        if choices is not None and value not in choices:
            raise BadInputError(where, f"{value!r} is not allowed" + _closest(value, choices),
                                f"use one of {', '.join(map(str, choices))}")
    profile = checked.get("profile")
    for name, rule in spec.items():
        if profile in rule.required_for and not checked.get(name):
            raise BadInputError(f"parameter {name!r}", f"missing, but profile {profile!r} needs it",
                                f"pass it, e.g. papermill -p {name} <hub id or local folder>, "
                                "or use profile 'tiny'")
    return checked


class SkipCounter:
    """Counts a dataset's good and skipped samples; too many skips raise ``TooManyBadSamples``.

    The check starts once ``min_seen`` samples were seen, so a bad first line does not stop
    a run; :meth:`finish` applies it to whatever was seen at the end.
    """

    def __init__(self, threshold_fraction: float = 0.05, min_seen: int = 50, name: str = "dataset",
                 max_examples: int = 5):
        if not 0.0 <= threshold_fraction <= 1.0:
            raise BadInputError("threshold_fraction", f"{threshold_fraction!r} is outside [0, 1]",
                                "pass a fraction such as 0.05")
        self.threshold_fraction, self.min_seen, self.name = threshold_fraction, min_seen, name
        self.max_examples = max_examples
        self.good = 0
        self.reasons: Counter[str] = Counter()
        self.examples: list[str] = []

    @property
    def skipped(self) -> int:
        return sum(self.reasons.values())

    @property
    def seen(self) -> int:
        return self.good + self.skipped

    def ok(self) -> None:
        self.good += 1

    def skip(self, reason: str, detail: str = "") -> None:
        """Count one bad sample (``detail`` names where it is, e.g. ``file:line``)."""
        self.reasons[reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(f"{reason}: {detail}" if detail else reason)
            log.warning("%s: skipped a sample (%s) %s", self.name, reason, detail)
        if self.seen >= self.min_seen:
            self._check()

    def retract(self, reason: str, detail: str = "") -> None:
        """Move one sample already counted good to skipped: a later stage (loading its image,
        parsing a field the reader does not look at) found it bad. Counting it as a new skip
        instead would count it twice and understate the share of bad samples."""
        self.good = max(0, self.good - 1)
        self.skip(reason, detail)

    def finish(self) -> None:
        if self.seen:
            self._check()

    def _check(self) -> None:
        fraction = self.skipped / self.seen
        if fraction > self.threshold_fraction:
            raise TooManyBadSamples(
                self.name,
                f"{self.skipped} of {self.seen} samples were bad ({fraction:.1%}, above the "
                f"{self.threshold_fraction:.1%} limit); by reason {dict(self.reasons)}; "
                f"first ones: {'; '.join(self.examples)}",
                "repair or remove the listed samples, or raise threshold_fraction if they are expected")

    def as_metrics(self, prefix: str) -> dict[str, float]:
        """Flat entries for a run's ``metrics.json``."""
        metrics = {f"{prefix}.seen": float(self.seen), f"{prefix}.skipped": float(self.skipped),
                   f"{prefix}.skip_fraction": self.skipped / self.seen if self.seen else 0.0}
        metrics.update({f"{prefix}.skipped.{reason}": float(n) for reason, n in self.reasons.items()})
        return metrics


def read_jsonl(path: str | Path, counter: SkipCounter | None = None,
               required_keys: tuple[str, ...] = ()) -> list[dict]:
    """Read a JSON-lines metadata file; undecodable, invalid or incomplete lines are skipped and
    counted in ``counter`` (named ``file:line``); blank lines are ignored."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(path, "metadata file does not exist",
                            "check the path, or create it (one JSON object per line)")
    counter = counter if counter is not None else SkipCounter(name=str(path))
    records = []
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            where = f"{path}:{line_number}"
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as error:
                counter.skip("not_utf8", f"{where} ({error.reason} at byte {error.start})")
                continue
            except json.JSONDecodeError as error:
                counter.skip("invalid_json", f"{where} ({error.msg})")
                continue
            if not isinstance(record, dict):
                counter.skip("not_an_object", where)
                continue
            missing = [key for key in required_keys if key not in record]
            if missing:
                counter.skip("missing_keys", f"{where} (missing {', '.join(missing)})")
                continue
            counter.ok()
            records.append(record)
    counter.finish()
    return records
