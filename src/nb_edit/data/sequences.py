"""Multi-turn instruction sequences read from a dataset: what MT-EditFlow rolls out and the
multi-turn benchmark scores (records sharing a ``sequence_id``, ordered by ``turn``)."""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict

import numpy as np

from nb_edit import world


@dataclasses.dataclass
class TurnSequence:
    """One instruction sequence: turn 0's source and, per turn, the instruction, the true edit
    (for the oracle) and the true target render (for checks; never shown to the policy)."""

    sequence_id: str
    source: np.ndarray
    instructions: list[str]
    edits: list[world.Edit] | None
    targets: list[np.ndarray | None]


def sequences_from(dataset, n_turns: int | None = None,
                   world_cfg: world.WorldConfig | None = None) -> list[TurnSequence]:
    """Group a dataset's records into sequences (``sequence_id``, ordered by ``turn``).

    A record without ``sequence_id`` is a one-turn sequence (single-turn data). ``n_turns``
    keeps the first ``n_turns`` turns and drops shorter sequences; ``None`` keeps as many turns
    as the shortest sequence has.
    """
    world_cfg = world_cfg or world.WorldConfig()
    grouped: dict[str, list[int]] = defaultdict(list)
    for index, record in enumerate(dataset):
        grouped[record.sequence_id or record.id].append(index)
    lengths = {key: len(rows) for key, rows in grouped.items()}
    if not lengths:
        raise ValueError("sequences_from: the dataset is empty; pass e.g. shapesworld(settings)['multiturn'].")
    want = n_turns if n_turns is not None else min(lengths.values())
    sequences = []
    for key, rows in grouped.items():
        rows = sorted(rows, key=lambda i: dataset[i].turn)
        if [dataset[i].turn for i in rows] != list(range(len(rows))):
            raise ValueError(f"sequence {key!r} has turns {[dataset[i].turn for i in rows]}; expected 0, 1, 2, ...")
        if len(rows) < want:
            continue
        rows = rows[:want]
        loaded = [dataset.load(i) for i in rows]
        edits = None
        if all(dataset[i].edit_json for i in rows):
            edits = [world.Edit.from_dict(json.loads(dataset[i].edit_json), world_cfg) for i in rows]
        sequences.append(TurnSequence(key, loaded[0]["source"], [s["instruction"] for s in loaded], edits,
                                      [s["target"] for s in loaded]))
    if not sequences:
        raise ValueError(f"no sequence has {want} turns (longest: {max(lengths.values())}); lower n_turns or pass "
                         "the multi-turn dataset shapesworld(settings)['multiturn'].")
    return sequences
