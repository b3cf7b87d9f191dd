"""The one record schema every editing dataset in the project uses, and its validation.

A record is one edit: a source image, an instruction, the captions before and after the edit,
an optional target image (absent for NP-Edit's unpaired data, present for paired triplets) and
optional reward annotations (Multi-Reward as Condition: three 0-5 scores plus failure texts).
Multi-turn sequences (MT-EditFlow) share a ``sequence_id`` and count ``turn`` from 0.
Synthetic ShapesWorld records also carry *truth* fields (the scene and edit as JSON, the
corruption applied to a noisy target and its true quality); they exist for evaluation and
diagnostics, never as a training signal.

Bad input ends here: :func:`validate_record` turns a raw dict (a metadata row) into an
:class:`EditRecord` or raises :class:`RecordError` naming the record, the field and the fix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from os import PathLike
from pathlib import Path
from typing import Any

from nb_edit.core.paths import OutsideFolderError, inside, relative_name
from nb_edit.core.validation import BadInputError, check_instruction

SPLITS = ("train", "val", "test")
# Splits are assigned by hashing a key with this seed (see assign_split); changing it reshuffles
# every dataset, so it is fixed here and documented in data/README.md.
SPLIT_SEED = 1234
DEFAULT_VAL_FRACTION = 0.1
DEFAULT_TEST_FRACTION = 0.1

# Record fields holding image files; on disk they are the ``<field>_file_name`` columns that
# HF ``datasets`` (imagefolder) turns into image columns named ``<field>``.
IMAGE_FIELDS = ("source", "target")
FILE_SUFFIX = "_file_name"


class RecordError(BadInputError):
    """A record that does not fit the schema; the message names the record, field and fix."""


class RecordPathError(RecordError, OutsideFolderError):
    """An image field whose file name leaves the dataset folder; readers count it apart
    (``path_outside_dataset``), as a sign of a hostile or mis-exported table."""


@dataclasses.dataclass
class EditRecord:
    """One edit. Image fields hold file paths relative to the folder of the metadata file."""

    id: str
    source: str
    instruction: str
    caption: str = ""
    caption_edited: str = ""
    edit_type: str = ""  # "" when unknown (e.g. converted public data)
    target: str | None = None
    rewards: dict[str, float | str] | None = None
    turn: int = 0
    sequence_id: str | None = None
    split: str = "train"
    # Truth fields, synthetic data only (evaluation and diagnostics).
    scene_json: str | None = None
    edit_json: str | None = None
    corruption: str | None = None
    true_followed: bool | None = None
    true_preserved: bool | None = None
    true_quality: float | None = None

    @property
    def paired(self) -> bool:
        return self.target is not None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_metadata_row(self) -> dict[str, Any]:
        """The row written to ``metadata.*``: image fields renamed to ``<field>_file_name``."""
        row = self.to_dict()
        for field in IMAGE_FIELDS:
            row[field + FILE_SUFFIX] = row.pop(field)
        return row


RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(EditRecord))
REQUIRED_FIELDS = ("id", "source", "instruction")
_TEXT_FIELDS = ("caption", "caption_edited", "edit_type")
_OPTIONAL_TEXT_FIELDS = ("sequence_id", "scene_json", "edit_json", "corruption")


def assign_split(
    key: str,
    seed: int = SPLIT_SEED,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    test_fraction: float = DEFAULT_TEST_FRACTION,
) -> str:
    """Deterministic split of ``key``: sha256(seed, key) -> u in [0, 1) -> test | val | train.

    The same key always lands in the same split, whatever else is in the dataset, so records
    sharing a key (the turns of one sequence, the edits of one scene) never straddle splits.
    """
    if not (val_fraction >= 0 and test_fraction >= 0 and val_fraction + test_fraction <= 1):
        raise ValueError(
            f"val_fraction={val_fraction}, test_fraction={test_fraction}: each must be >= 0 "
            "and their sum <= 1."
        )
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def _fail(record_id: Any, field: str, problem: str, fix: str) -> RecordError:
    return RecordError(f"record {record_id!r}, field {field!r}", problem, fix)


def _check_text(record_id: Any, field: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _fail(record_id, field, f"expected text, got {type(value).__name__}",
                    "write it as a string (or leave optional fields out)")
    return value


def _is_missing(value: Any) -> bool:
    """None, and the NaN that csv/pandas readers put in empty cells."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def check_image_file(record_id: Any, field: str, value: Any, root: Path | None) -> str:
    """A relative POSIX path that stays inside ``root`` and exists there (when ``root`` is given).

    With ``root`` the name is resolved (``paths.inside``), so a symlink in the folder that points
    out of it is refused as an absolute or ``..`` name is; without ``root`` (a record about to be
    written) the name is checked on paper only. Refusals raise :class:`RecordPathError`.
    """
    if not isinstance(value, str) or not value.strip():
        raise _fail(record_id, field, f"expected an image file name, got {value!r}",
                    "give the image's path relative to the metadata file's folder")
    what = f"record {record_id!r}, field {field!r}"
    try:
        posix = relative_name(value, what)
        path = inside(root, value, what) if root is not None else None
    except OutsideFolderError as error:
        raise RecordPathError(error.input_name, error.problem, error.fix) from None
    except BadInputError as error:  # e.g. a NUL character: unusable, but not an escape
        raise RecordError(error.input_name, error.problem, error.fix) from None
    if path is not None and not path.is_file():
        raise _fail(record_id, field, f"image file {value!r} not found under {root}",
                    "add the file or fix the path in the metadata")
    return str(posix)


def _check_rewards(record_id: Any, value: Any) -> dict[str, float | str] | None:
    if _is_missing(value):
        return None
    if isinstance(value, str):  # csv metadata carries the dict as JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise _fail(record_id, "rewards", f"not valid JSON ({error})",
                        'write a JSON object such as {"following": 4, "following_text": "None"}')
    if not isinstance(value, dict):
        raise _fail(record_id, "rewards", f"expected a dict, got {type(value).__name__}",
                    "write a mapping from reward name to a number or a text")
    rewards: dict[str, float | str] = {}
    for name, score in value.items():
        if score is None:  # columnar formats fill keys other records have with null
            continue
        if isinstance(score, bool) or not isinstance(score, (int, float, str)):
            raise _fail(record_id, f"rewards.{name}", f"{score!r} is neither a number nor a text",
                        "store scores as numbers and failure descriptions as strings")
        if isinstance(score, float) and not math.isfinite(score):
            raise _fail(record_id, f"rewards.{name}", f"{score} is not finite",
                        "store a finite score or drop the key")
        rewards[str(name)] = score
    return rewards


def validate_record(raw: dict[str, Any] | EditRecord, root: str | PathLike | None = None) -> EditRecord:
    """Check one raw record (a metadata row or a dict of record fields) -> :class:`EditRecord`.

    ``root`` is the folder image paths are relative to; when given, the image files must exist.
    Accepts both ``source`` and ``source_file_name`` (the on-disk column name) spellings.
    Unknown keys are an error, so a typo does not silently lose a field.
    """
    if isinstance(raw, EditRecord):
        raw = raw.to_dict()
    if not isinstance(raw, dict):
        raise RecordError("record", f"expected a dict of fields, got {type(raw).__name__} ({raw!r:.80})",
                          "write each record as a JSON object / table row")
    data = {k: v for k, v in raw.items() if not _is_missing(v)}
    for field in IMAGE_FIELDS:
        if field + FILE_SUFFIX in data:
            if field in data:
                raise _fail(raw.get("id"), field, f"both {field!r} and {field + FILE_SUFFIX!r} given",
                            "keep only one of them")
            data[field] = data.pop(field + FILE_SUFFIX)
    record_id = data.get("id")
    unknown = sorted(set(data) - set(RECORD_FIELDS))
    if unknown:
        raise _fail(record_id, unknown[0], f"unknown field(s) {unknown}",
                    f"rename to one of {', '.join(RECORD_FIELDS)} or drop them")
    for field in REQUIRED_FIELDS:
        if field not in data:
            raise _fail(record_id, field, "missing", "every record needs id, source and instruction")
    if isinstance(record_id, int) and not isinstance(record_id, bool):
        record_id = data["id"] = str(record_id)
    if not isinstance(record_id, str) or not record_id.strip():
        raise _fail(record_id, "id", "must be a non-empty string", "give every record a unique id")

    root_path = Path(root) if root is not None else None
    values: dict[str, Any] = {"id": record_id}
    values["source"] = check_image_file(record_id, "source", data["source"], root_path)
    if "target" in data:
        values["target"] = check_image_file(record_id, "target", data["target"], root_path)
    try:
        values["instruction"] = check_instruction(data["instruction"],
                                                  name=f"record {record_id!r}, field 'instruction'")
    except BadInputError as error:  # a RecordError, so that readers skip the row instead of stopping
        raise RecordError(error.input_name, error.problem, error.fix) from None
    for field in _TEXT_FIELDS:
        if field in data:
            values[field] = _check_text(record_id, field, data[field]).strip()
    for field in _OPTIONAL_TEXT_FIELDS:
        if field in data:
            values[field] = _check_text(record_id, field, data[field])
    if "rewards" in data:
        values["rewards"] = _check_rewards(record_id, data["rewards"])

    turn = data.get("turn", 0)
    if isinstance(turn, float) and turn.is_integer():
        turn = int(turn)  # csv readers turn integer columns with gaps into floats
    if isinstance(turn, bool) or not isinstance(turn, int) or turn < 0:
        raise _fail(record_id, "turn", f"{turn!r} is not a non-negative integer",
                    "use 0 for single-turn edits and 0, 1, 2, ... along a sequence")
    values["turn"] = turn
    split = data.get("split", "train")
    if split not in SPLITS:
        raise _fail(record_id, "split", f"{split!r} is not a split",
                    f"use one of {', '.join(SPLITS)}")
    values["split"] = split

    for field in ("true_followed", "true_preserved"):
        if field in data:
            if not isinstance(data[field], bool):
                raise _fail(record_id, field, f"{data[field]!r} is not a boolean", "write true or false")
            values[field] = data[field]
    if "true_quality" in data:
        quality = data["true_quality"]
        if isinstance(quality, bool) or not isinstance(quality, (int, float)) or not math.isfinite(quality):
            raise _fail(record_id, "true_quality", f"{quality!r} is not a finite number",
                        "write the corruption's true quality as a number")
        values["true_quality"] = float(quality)
    return EditRecord(**values)
