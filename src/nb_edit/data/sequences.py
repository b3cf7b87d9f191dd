"""Multi-turn instruction sequences read from a dataset: what MT-EditFlow rolls out and the
multi-turn benchmark scores (records sharing a ``sequence_id``, ordered by ``turn``), and
:func:`edit_from_json`, the one reader of a record's ``edit_json`` (the ShapesWorld truth)."""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict

import numpy as np

from nb_edit import world
from nb_edit.core.paths import OutsideFolderError
from nb_edit.core.validation import BadInputError
from nb_edit.data.schema import RecordError


@dataclasses.dataclass
class TurnSequence:
    """One instruction sequence: turn 0's source and, per turn, the instruction, the true edit
    (for the oracle) and the true target render (for checks; never shown to the policy)."""

    sequence_id: str
    source: np.ndarray
    instructions: list[str]
    edits: list[world.Edit] | None
    targets: list[np.ndarray | None]


def edit_from_json(record_id: object, text: object, cfg: world.WorldConfig | None = None) -> world.Edit:
    """The ShapesWorld edit a record's ``edit_json`` holds, or :class:`RecordError` naming the
    record: the field is free text in a user's metadata, so anything may be in it."""
    try:
        data = json.loads(text)  # type: ignore[arg-type]
        if not isinstance(data, dict):
            raise TypeError(f"a JSON {type(data).__name__}, not an object")
        return world.Edit.from_dict(data, cfg)
    except (ValueError, KeyError, TypeError, AttributeError) as error:  # JSONDecodeError is a ValueError
        raise RecordError(f"record {record_id!r}, field 'edit_json'",
                          f"not a ShapesWorld edit ({type(error).__name__}: {str(error)[:200]})",
                          "write it with json.dumps(edit.to_dict()), or drop the field to score without "
                          "the oracle") from None


def sequences_from(dataset, n_turns: int | None = None,
                   world_cfg: world.WorldConfig | None = None) -> list[TurnSequence]:
    """Group a dataset's records into sequences (``sequence_id``, ordered by ``turn``).

    A record without ``sequence_id`` is a one-turn sequence (single-turn data). ``n_turns``
    keeps the first ``n_turns`` turns and drops shorter sequences; ``None`` keeps as many turns
    as the shortest sequence has. A sequence with a turn whose image does not load or whose
    ``edit_json`` does not parse is dropped, its records moved from good to skipped in the
    dataset's counter (which raises once too many are).
    """
    world_cfg = world_cfg or world.WorldConfig()
    grouped: dict[str, list[int]] = defaultdict(list)
    for index, record in enumerate(dataset):
        grouped[record.sequence_id or record.id].append(index)
    lengths = {key: len(rows) for key, rows in grouped.items()}
    if not lengths:
        raise ValueError("sequences_from: the dataset is empty; pass e.g. shapesworld(settings)['multiturn'].")
    want = n_turns if n_turns is not None else min(lengths.values())
    sequences, dropped = [], False
    for key, rows in grouped.items():
        rows = sorted(rows, key=lambda i: dataset[i].turn)
        if [dataset[i].turn for i in rows] != list(range(len(rows))):
            raise ValueError(f"sequence {key!r} has turns {[dataset[i].turn for i in rows]}; expected 0, 1, 2, ...")
        if len(rows) < want:
            continue
        rows = rows[:want]
        try:
            loaded = [dataset.load(i) for i in rows]
            edits = None
            if all(dataset[i].edit_json for i in rows):
                edits = [edit_from_json(dataset[i].id, dataset[i].edit_json, world_cfg) for i in rows]
        except BadInputError as error:
            counter = getattr(dataset, "counter", None)
            if counter is None:  # not an EditDataset: nowhere to count it
                raise
            reason = ("path_outside_dataset" if isinstance(error, OutsideFolderError) else
                      "invalid_edit_json" if isinstance(error, RecordError) else "unreadable_image")
            for i in rows:  # a turn cannot be left out of a sequence: the whole sequence goes
                counter.retract(reason, f"sequence {key!r}, record {dataset[i].id!r}: {error}")
            dropped = True
            continue
        sequences.append(TurnSequence(key, loaded[0]["source"], [s["instruction"] for s in loaded], edits,
                                      [s["target"] for s in loaded]))
    if dropped:  # a mostly broken dataset stops here rather than give a few sequences
        dataset.counter.finish()
    if not sequences:
        raise ValueError(f"no sequence has {want} turns (longest: {max(lengths.values())}); lower n_turns or pass "
                         "the multi-turn dataset shapesworld(settings)['multiturn'].")
    return sequences
