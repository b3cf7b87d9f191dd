"""The ShapesWorld datasets each method trains and is tested on, written in the store format.

* unpaired (NP-Edit): curated instructions on reference scenes, no target images;
* clean paired (the supervised baseline): source, instruction, exact target render;
* noisy paired (Multi-Reward as Condition): targets corrupted by ``world.noisy_target``, with
  the corruption kind and the true following / preservation / quality stored as truth, the way
  InstructPix2Pix triplets are imperfect in ways RewardEdit-20K's judge scores describe;
* multi-turn (MT-EditFlow): chains of edits, one record per turn (``turn``, ``sequence_id``);
  turn t's source is the true result of turn t-1.

Splits are decided per *scene*: a scene's canonical JSON is hashed with ``SPLIT_SEED``
(``schema.assign_split``), and each split draws only scenes that hash into it, so the held-out
test scenes never appear in any training set, whatever its seed or size. The test split is
also drawn with its own fixed seed (``TEST_SEED``), so every run is scored on the same edits.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from nb_edit import world
from nb_edit.core.validation import BadInputError
from nb_edit.data.curation import OracleValidityFilter, Proposer, Reference, TemplateProposer, ValidityFilter, curate
from nb_edit.data.schema import SPLIT_SEED, SPLITS, EditRecord, assign_split
from nb_edit.data.store import EditDataset, read_dataset, write_dataset

TEST_SEED = 20_251_122  # the seed every test split is drawn with, whatever the run's seed
# Scene routing fractions: a tenth of all possible scenes belong to val, a tenth to test.
VAL_FRACTION = 0.1
TEST_FRACTION = 0.1
# Draws per wanted scene before giving up (a world with very few distinct scenes may have
# none that hash into a small split).
MAX_DRAWS_PER_SCENE = 200

Sizes = Mapping[str, int] | int


def scene_json(scene: Any) -> str:
    return json.dumps(scene.to_dict(), sort_keys=True)


def scene_split(scene: Any) -> str:
    """The split a scene belongs to, from its content alone."""
    return assign_split(scene_json(scene), SPLIT_SEED, VAL_FRACTION, TEST_FRACTION)


def split_rng(split: str, seed: int) -> np.random.Generator:
    """Train and val follow the run's seed; test always uses ``TEST_SEED``."""
    return np.random.default_rng(TEST_SEED if split == "test" else [seed, SPLITS.index(split)])


def _sizes(sizes: Sizes) -> dict[str, int]:
    sizes = {"train": sizes} if isinstance(sizes, int) else dict(sizes)
    for split, n in sizes.items():
        if split not in SPLITS:
            raise BadInputError(f"sizes[{split!r}]", "unknown split", f"use {', '.join(SPLITS)}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise BadInputError(f"sizes[{split!r}]={n!r}", "not a non-negative int", "pass e.g. {'train': 512}")
    if not any(sizes.values()):
        raise BadInputError(f"sizes={sizes}", "nothing to build", "ask for at least one sample")
    return sizes


def draw_scene(split: str, rng: np.random.Generator, cfg: Any,
               accept: Callable[[Any], bool] = lambda scene: True) -> Any:
    """A scene that hashes into ``split`` (and passes ``accept``)."""
    for _ in range(MAX_DRAWS_PER_SCENE):
        scene = world.sample_scene(rng, cfg)
        if scene_split(scene) == split and accept(scene):
            return scene
    raise RuntimeError(
        f"no scene of split {split!r} in {MAX_DRAWS_PER_SCENE} draws; the world config has too few "
        "distinct scenes for this split: enlarge the world or lower the split's size."
    )


def _image_name(split: str, key: str) -> str:
    return f"images/{split}-{key}.png"


def _edit_record(edit: Any, record_id: str, source_name: str, split: str, **fields: Any) -> EditRecord:
    return EditRecord(
        id=record_id, source=source_name, instruction=edit.instruction, caption=edit.caption,
        caption_edited=edit.caption_edited, edit_type=edit.edit_type, split=split,
        scene_json=scene_json(edit.source), edit_json=json.dumps(edit.to_dict(), sort_keys=True), **fields,
    )


def _sample_valid_edit(split: str, rng: np.random.Generator, cfg: Any) -> Any:
    for _ in range(MAX_DRAWS_PER_SCENE):
        scene = draw_scene(split, rng, cfg)
        try:
            return world.sample_edit(scene, rng, cfg)
        except ValueError:  # no edit of the drawn type fits this scene: draw another
            continue
    raise RuntimeError(f"no valid edit found in {MAX_DRAWS_PER_SCENE} scenes of split {split!r}.")


def build_unpaired(
    folder: str | PathLike, cfg: Any, sizes: Sizes, seed: int = 0,
    proposer: Proposer | None = None, validity_filter: ValidityFilter | None = None,
    candidates_per_scene: int = 4, overwrite: bool = False,
) -> tuple[EditDataset, dict[str, float]]:
    """NP-Edit's curated set: ``sizes`` counts reference *scenes*; returns the dataset and the
    curation metrics (the oracle filter unless another is given)."""
    proposer = proposer or TemplateProposer(cfg, candidates_per_scene)
    validity_filter = validity_filter or OracleValidityFilter(cfg)
    records, images, metrics = [], {}, {}
    for split, n in _sizes(sizes).items():
        rng = split_rng(split, seed)
        scenes = [draw_scene(split, rng, cfg) for _ in range(n)]
        references = [Reference(id=f"{split}-{i:06d}", image=world.render(s, cfg), caption=world.caption(s),
                                scene=s, split=split) for i, s in enumerate(scenes)]
        result = curate(references, proposer, validity_filter, rng)
        records += result.records
        images.update(result.images)
        metrics.update({f"{split}.{k}": v for k, v in result.metrics.items()})
    if not records:
        raise RuntimeError(f"the filter kept none of the candidates ({metrics}); check the filter.")
    write_dataset(records, images, folder, overwrite=overwrite,
                  description="ShapesWorld unpaired curated instructions (NP-Edit); no targets")
    dataset = read_dataset(folder)
    if dataset.n_paired:  # the point of NP-Edit: a target must never reach its training data
        raise AssertionError(f"{folder}: the unpaired dataset holds {dataset.n_paired} target images")
    return dataset, metrics


def build_paired(folder: str | PathLike, cfg: Any, sizes: Sizes, seed: int = 0,
                 noisy: bool = False, overwrite: bool = False) -> EditDataset:
    """Clean (exact target render) or noisy (``world.noisy_target``) triplets, one per scene."""
    records, images = [], {}
    for split, n in _sizes(sizes).items():
        rng = split_rng(split, seed)
        for i in range(n):
            edit = _sample_valid_edit(split, rng, cfg)
            key = f"{i:06d}"
            source_name, target_name = _image_name(split, key), _image_name(split, key + "-target")
            images[source_name] = world.render(edit.source, cfg)
            truth: dict[str, Any] = {}
            if noisy:
                noisy_target = world.noisy_target(edit, rng, cfg)
                images[target_name] = noisy_target.image
                truth = dict(corruption=noisy_target.corruption, true_followed=bool(noisy_target.followed),
                             true_preserved=bool(noisy_target.preserved), true_quality=float(noisy_target.quality))
            else:
                images[target_name] = world.render(edit.target, cfg)
            records.append(_edit_record(edit, f"{split}-{key}", source_name, split, target=target_name, **truth))
    kind = "noisy" if noisy else "clean"
    write_dataset(records, images, folder, overwrite=overwrite, description=f"ShapesWorld {kind} paired edits")
    return read_dataset(folder)


def build_multiturn(folder: str | PathLike, cfg: Any, sizes: Sizes, seed: int = 0, n_turns: int = 3,
                    overwrite: bool = False) -> EditDataset:
    """``sizes`` sequences of ``n_turns`` edits; records carry ``turn`` and ``sequence_id`` and
    the true target of every turn (RL rollouts use only turn 0's source and the instructions)."""
    if n_turns < 1:
        raise BadInputError(f"n_turns={n_turns!r}", "a sequence needs at least one turn", "pass n_turns >= 1")
    records, images = [], {}
    for split, n in _sizes(sizes).items():
        rng = split_rng(split, seed)
        for i in range(n):
            chain = None
            for _ in range(MAX_DRAWS_PER_SCENE):
                try:
                    chain = world.sample_chain(draw_scene(split, rng, cfg), rng, cfg, n_turns=n_turns)
                    break
                except ValueError:  # this scene cannot take n_turns edits: draw another
                    continue
            if chain is None:
                raise RuntimeError(f"no scene of split {split!r} took a chain of {n_turns} edits.")
            sequence_id = f"{split}-seq{i:06d}"
            # state k is the scene after k turns: turn t goes from state t to state t + 1
            images[_image_name(split, f"seq{i:06d}-s0")] = world.render(chain[0].source, cfg)
            for turn, edit in enumerate(chain):
                target_name = _image_name(split, f"seq{i:06d}-s{turn + 1}")
                images[target_name] = world.render(edit.target, cfg)
                records.append(_edit_record(edit, f"{sequence_id}-t{turn}", _image_name(split, f"seq{i:06d}-s{turn}"),
                                            split, target=target_name, turn=turn, sequence_id=sequence_id))
    write_dataset(records, images, folder, overwrite=overwrite,
                  description=f"ShapesWorld multi-turn edit sequences ({n_turns} turns)")
    return read_dataset(folder)


def build_test_set(folder: str | PathLike, cfg: Any, n: int, overwrite: bool = False) -> EditDataset:
    """The held-out single-turn test set: clean pairs on test scenes, drawn with ``TEST_SEED``."""
    return build_paired(folder, cfg, {"test": n}, overwrite=overwrite)


def build_all(root: str | PathLike, cfg: Any, n_train: int, n_val: int, n_test: int,
              n_sequences: int, n_test_sequences: int, seed: int = 0, overwrite: bool = False) -> dict[str, Any]:
    """Every ShapesWorld dataset under ``root`` (sizes in scenes, or sequences for multi-turn);
    returns the datasets and the curation metrics."""
    root = Path(root)
    train_val = {"train": n_train, "val": n_val}
    unpaired, curation_metrics = build_unpaired(root / "unpaired", cfg, train_val, seed, overwrite=overwrite)
    return {
        "unpaired": unpaired,
        "curation_metrics": curation_metrics,
        "paired": build_paired(root / "paired", cfg, train_val, seed, overwrite=overwrite),
        "noisy": build_paired(root / "noisy", cfg, train_val, seed, noisy=True, overwrite=overwrite),
        "multiturn": build_multiturn(root / "multiturn", cfg, {"train": n_sequences, "test": n_test_sequences},
                                     seed, overwrite=overwrite),
        "test": build_test_set(root / "test", cfg, n_test, overwrite=overwrite),
    }
