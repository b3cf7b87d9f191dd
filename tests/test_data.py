"""Tests for nb_edit.data: schema, on-disk format, converters, splits, curation, synthetic sets
and the real-photo benchmark. All offline and small (a few seconds on 2 cores)."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from nb_edit import world
from nb_edit.core.validation import SkipCounter, TooManyBadSamples
from nb_edit.data.schema import EditRecord, RecordError, assign_split, validate_record
from nb_edit.data.store import convert_paired, read_dataset, write_dataset


def _image(seed: int, size=(8, 8)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def _tiny_dataset(n: int = 6):
    records, images = [], {}
    for i in range(n):
        source, target = f"images/{i}-source.png", f"images/{i}-target.png"
        images[source], images[target] = _image(i), _image(100 + i)
        records.append(EditRecord(
            id=f"r{i}", source=source, instruction=f"make the circle red {i}", caption="a blue circle",
            caption_edited="a red circle", edit_type="color", target=target if i % 2 == 0 else None,
            rewards={"following": float(i % 6), "following_text": "None"} if i % 3 == 0 else None,
            turn=i % 3, sequence_id=f"s{i // 3}", split=("train", "val", "test")[i % 3],
            corruption="blur" if i == 0 else None, true_quality=0.5 if i == 0 else None,
        ))
    return records, images


# ------------------------------------------------------------------------------ schema


@pytest.mark.bad_input
def test_validate_record_names_the_field_and_the_fix(tmp_path):
    Image.fromarray(_image(0)).save(tmp_path / "a.png")
    record = validate_record({"id": "x", "source_file_name": "a.png", "instruction": "  add a square "}, tmp_path)
    assert record.source == "a.png" and record.instruction == "add a square" and record.target is None
    with pytest.raises(RecordError, match="'x'.*'source'.*not found"):
        validate_record({"id": "x", "source": "missing.png", "instruction": "add"}, tmp_path)
    with pytest.raises(RecordError, match="'turn'"):
        validate_record({"id": "x", "source": "a.png", "instruction": "add", "turn": -1}, tmp_path)
    with pytest.raises(RecordError, match="leaves the dataset folder"):
        validate_record({"id": "x", "source": "../a.png", "instruction": "add"})
    with pytest.raises(RecordError, match="unknown field.*'captoin'"):
        validate_record({"id": "x", "source": "a.png", "instruction": "add", "captoin": "typo"})
    with pytest.raises(RecordError, match="rewards.following"):
        validate_record({"id": "x", "source": "a.png", "instruction": "add", "rewards": {"following": math.inf}})
    with pytest.raises(ValueError, match="instruction"):
        validate_record({"id": "x", "source": "a.png", "instruction": "   "})


def test_split_assignment_is_deterministic_and_covers_fractions():
    keys = [f"scene-{i}" for i in range(4000)]
    first = [assign_split(k) for k in keys]
    assert first == [assign_split(k) for k in keys]
    shares = {s: first.count(s) / len(keys) for s in ("train", "val", "test")}
    assert abs(shares["val"] - 0.1) < 0.02 and abs(shares["test"] - 0.1) < 0.02
    assert [assign_split(k, seed=7) for k in keys] != first  # the seed matters
    assert all(assign_split(k, val_fraction=0, test_fraction=0) == "train" for k in keys[:50])


# ------------------------------------------------------------------------------- store


def test_round_trip_write_read(tmp_path):
    records, images = _tiny_dataset()
    write_dataset(records, images, tmp_path / "ds")
    dataset = read_dataset(tmp_path / "ds")
    assert len(dataset) == len(records) and dataset.counter.skipped == 0
    by_id = {r.id: r for r in dataset}
    for record in records:
        assert by_id[record.id] == record  # every field, rewards and truth included
    index = [r.id for r in dataset].index("r0")
    sample = dataset.load(index)
    np.testing.assert_array_equal(sample["source"], images["images/0-source.png"])
    np.testing.assert_array_equal(sample["target"], images["images/0-target.png"])
    assert dataset.load([r.id for r in dataset].index("r1"), size=4)["target"] is None
    assert dataset.load(index, size=(4, 6))["source"].shape == (4, 6, 3)
    assert {r.id for r in read_dataset(tmp_path / "ds", split="val")} == {"r1", "r4"}
    with pytest.raises(FileExistsError):
        write_dataset(records, images, tmp_path / "ds")


@pytest.mark.bad_input
def test_write_rejects_bad_records_before_writing(tmp_path):
    records, images = _tiny_dataset(2)
    with pytest.raises(RecordError, match="duplicated"):
        write_dataset(records + records[:1], images, tmp_path / "dup")
    with pytest.raises(RecordError, match="not in `images`"):
        write_dataset(records, {}, tmp_path / "noimg")
    assert not (tmp_path / "dup").exists() and not (tmp_path / "noimg").exists()


def test_hf_datasets_loads_the_folder_offline(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    records, images = _tiny_dataset()
    write_dataset(records, images, tmp_path / "ds")
    loaded = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "ds"), cache_dir=str(tmp_path / "cache"))
    assert set(loaded) == {"train", "validation", "test"}
    assert isinstance(loaded["train"].features["source"], datasets.Image)
    assert isinstance(loaded["train"].features["target"], datasets.Image)
    row = next(r for r in loaded["train"] if r["id"] == "r0")
    np.testing.assert_array_equal(np.asarray(row["source"]), images["images/0-source.png"])
    assert row["rewards"]["following"] == 0.0 and row["instruction"] == records[0].instruction
    assert next(r for r in loaded["validation"] if r["id"] == "r1")["target"] is None


@pytest.mark.bad_input
def test_bad_samples_are_skipped_and_counted(tmp_path):
    records, images = _tiny_dataset(6)
    write_dataset(records, images, tmp_path / "ds")
    (tmp_path / "ds" / "train" / "images" / "3-source.png").unlink()  # r3: missing file
    (tmp_path / "ds" / "test" / "images" / "2-source.png").write_bytes(b"not a png")  # r2: corrupt
    counter = SkipCounter(threshold_fraction=0.5, min_seen=1)
    dataset = read_dataset(tmp_path / "ds", counter=counter)
    assert "r3" not in {r.id for r in dataset} and len(dataset) == 5
    assert counter.reasons["invalid_record"] == 1
    loaded = list(dataset.iter_samples(size=4))
    assert len(loaded) == 4 and counter.reasons["unreadable_image"] == 1
    assert dataset.metrics("train_data")["train_data.skipped"] == 2.0
    # verify_images catches the corrupt file at read time instead
    early = read_dataset(tmp_path / "ds", counter=SkipCounter(threshold_fraction=0.5, min_seen=1), verify_images=True)
    assert len(early) == 4 and early.counter.reasons["corrupt_image"] == 1
    # a folder that is mostly bad stops the run with the reasons
    for name in ("0-source.png", "0-target.png"):
        (tmp_path / "ds" / "train" / "images" / name).unlink()
    with pytest.raises(TooManyBadSamples, match="invalid_record"):
        read_dataset(tmp_path / "ds", split="train")


@pytest.mark.bad_input
def test_user_jsonl_folder_with_a_broken_line(tmp_path):
    folder = tmp_path / "mine"
    (folder / "imgs").mkdir(parents=True)
    lines = []
    for i in range(30):
        Image.fromarray(_image(i, (10, 14))).save(folder / "imgs" / f"{i}.jpg")
        lines.append(json.dumps({"id": f"m{i}", "file_name": None, "source_file_name": f"imgs/{i}.jpg",
                                 "instruction": "remove the square"}))
    lines[5] = '{"id": "m5", "source_file_name": '  # truncated line
    (folder / "metadata.jsonl").write_text("\n".join(l.replace('"file_name": null, ', "") for l in lines) + "\n")
    dataset = read_dataset(folder)
    assert len(dataset) == 29 and dataset.counter.reasons == {"invalid_json": 1}
    assert all(r.split == "train" for r in dataset)
    assert next(dataset.iter_samples(size=8))["source"].shape == (8, 8, 3)


# --------------------------------------------------------------------------- converters


def _png_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_convert_instructpix2pix_folder(tmp_path):
    src = tmp_path / "ip2p"
    (src / "images").mkdir(parents=True)
    rows = []
    for i in range(12):
        Image.fromarray(_image(i)).save(src / "images" / f"in{i}.png")
        Image.fromarray(_image(50 + i)).save(src / "images" / f"out{i}.png")
        rows.append({"input_image": f"images/in{i}.png", "edit_prompt": f"turn it blue {i}",
                     "edited_image": f"images/out{i}.png", "original_prompt": "a photo", "edited_prompt": "a blue photo"})
    rows[3]["edited_image"] = "images/missing.png"  # skipped and counted, not fatal
    (src / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(TooManyBadSamples, match="bad_row"):  # 1 of 12 is above the default 5%
        convert_paired(src, tmp_path / "strict")
    dataset = convert_paired(src, tmp_path / "out", counter=SkipCounter(threshold_fraction=0.2))
    assert len(dataset) == 11 and dataset.counter.reasons == {"bad_row": 1}
    assert dataset.n_paired == 11
    first = next(i for i, r in enumerate(dataset) if r.id == "instructpix2pix-0000000")
    assert dataset[first].instruction == "turn it blue 0" and dataset[first].caption_edited == "a blue photo"
    np.testing.assert_array_equal(dataset.load(first)["target"], _image(50))
    assert {r.split for r in dataset} <= {"train", "val", "test"}
    again = convert_paired(src, tmp_path / "out2", counter=SkipCounter(threshold_fraction=0.2))
    assert [(r.id, r.split) for r in again] == [(r.id, r.split) for r in dataset]  # deterministic


def test_convert_magicbrush_parquet_with_image_bytes(tmp_path):
    rows = []
    for image_id in ("100", "200"):
        for turn in (1, 2, 3):
            rows.append({"img_id": image_id, "turn_index": turn, "instruction": f"edit {turn}",
                         "source_img": {"bytes": _png_bytes(_image(turn)), "path": None},
                         "target_img": {"bytes": _png_bytes(_image(10 + turn)), "path": None}})
    table = tmp_path / "magicbrush.parquet"
    pq.write_table(pa.Table.from_pylist(rows), table)
    dataset = convert_paired(table, tmp_path / "out", layout="magicbrush")
    assert len(dataset) == 6
    turns = sorted((r.sequence_id, r.turn) for r in dataset)
    assert turns == [("magicbrush-100", t) for t in range(3)] + [("magicbrush-200", t) for t in range(3)]
    for sequence in ("magicbrush-100", "magicbrush-200"):  # a sequence never straddles splits
        assert len({r.split for r in dataset if r.sequence_id == sequence}) == 1
    index = next(i for i, r in enumerate(dataset) if r.id == "magicbrush-200-t1")
    np.testing.assert_array_equal(dataset.load(index)["source"], _image(2))


@pytest.mark.bad_input
def test_convert_rejects_an_unknown_layout(tmp_path):
    (tmp_path / "t.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="InstructPix2Pix"):
        convert_paired(tmp_path / "t.csv", tmp_path / "out")


# ------------------------------------------------------------------------- real photos


def test_real_edit_benchmark_loads_every_category(tmp_path):
    from nb_edit.data.real_photos import REAL_EDIT_CATEGORIES, load_real_edit, read_instructions

    items = read_instructions()
    for category in REAL_EDIT_CATEGORIES:
        assert sum(item["edit_type"] == category for item in items) >= 2
    samples = load_real_edit(resolution=16, folder=tmp_path / "re")
    assert len(samples) == len(items)
    assert all(s["source"].shape == (16, 16, 3) and s["source"].dtype == np.uint8 for s in samples)
    assert all(s["target"] is None and s["caption_edited"] for s in samples)
    padded = load_real_edit(resolution=(12, 20), fit="pad", categories=["remove"], folder=tmp_path / "re")
    assert len(padded) >= 2 and all(s["source"].shape == (12, 20, 3) for s in padded)
    camera = next(s for s in samples if s["id"].startswith("camera"))["source"].astype(int)
    assert np.array_equal(camera[..., 0], camera[..., 1])  # grayscale photo went through the mode path


# ------------------------------------------------------------------- curation (ShapesWorld)

@pytest.fixture(scope="module")
def cfg():
    return world.WorldConfig()


def _references(cfg, n, seed=0):
    from nb_edit.data.curation import Reference
    from nb_edit.data.synthetic import draw_scene

    rng = np.random.default_rng(seed)
    scenes = [draw_scene("train", rng, cfg) for _ in range(n)]
    return [Reference(id=f"s{i}", image=world.render(s, cfg), caption=world.caption(s), scene=s)
            for i, s in enumerate(scenes)]


def test_filter_metrics_against_truth():
    from nb_edit.data.curation import filter_metrics

    truth = [True, True, False, False, True, None]
    kept = [True, False, True, False, True, True]
    reasons = ["", "", "absent object: no red circle", "no change: already red", "", ""]
    metrics = filter_metrics(truth, kept, reasons)
    assert metrics["n_candidates"] == 6 and metrics["n_kept"] == 4 and metrics["n_true_valid"] == 3
    assert metrics["filter_precision"] == pytest.approx(2 / 3)  # unknown truth is left out
    assert metrics["filter_recall"] == pytest.approx(2 / 3)
    assert metrics["invalid_kept.absent_object"] == 1 and metrics["invalid_rejected.no_change"] == 1
    assert math.isnan(filter_metrics([None], [True])["filter_precision"])


def test_curation_oracle_and_judge_filters_against_truth(cfg):
    from nb_edit.data.curation import (
        JudgeValidityFilter,
        OracleValidityFilter,
        TemplateProposer,
        curate,
        read_instruction,
    )

    references = _references(cfg, 12)
    oracle = curate(references, TemplateProposer(cfg, 4), OracleValidityFilter(cfg), np.random.default_rng(1))
    m = oracle.metrics
    assert m["n_candidates"] == 48 and 0 < m["n_kept"] < 48
    assert 0 < m["n_true_valid"] < 48  # the proposer mixes valid and invalid candidates
    assert m["filter_precision"] >= 0.9 and m["filter_recall"] >= 0.9
    assert all(r.target is None and r.caption_edited for r in oracle.records)
    assert set(oracle.images) == {r.source for r in oracle.records}
    # an edit's truth is stored for evaluation, and every instruction reads back to its template
    edit = world.Edit.from_dict(json.loads(oracle.records[0].edit_json), cfg)
    assert edit.instruction == oracle.records[0].instruction and edit.valid
    assert read_instruction("make the red circle blue", "colour") == ("colour", {"ref": "red circle", "colour": "blue"})

    asked = []
    yes_to_all = JudgeValidityFilter(lambda image, question: asked.append(question) or 0.9)
    trusting = curate(references, TemplateProposer(cfg, 4), yes_to_all, np.random.default_rng(1))
    t = trusting.metrics
    assert t["n_kept"] == 48 and t["filter_recall"] == 1.0
    assert t["filter_precision"] == pytest.approx(t["n_true_valid"] / 48)
    assert any(q.startswith("Is there exactly one") for q in asked)
    with pytest.raises(ValueError, match="judge answer"):
        JudgeValidityFilter(lambda image, question: "maybe").keep(references[0].image, _remove_candidate())


def _remove_candidate():
    from nb_edit.data.curation import Candidate

    return Candidate(instruction="remove the red circle", edit_type="remove", subject="red circle")


@pytest.mark.bad_input
def test_callable_proposer_checks_what_it_is_given(cfg):
    from nb_edit.data.curation import CallableProposer, Reference

    reference = Reference(id="p", image=np.zeros((8, 8, 3), np.uint8), caption="a photo")
    proposer = CallableProposer(lambda image, caption: ["add a hat", {"instruction": "remove the cup", "edit_type": "remove"}])
    candidates = proposer.propose(reference, np.random.default_rng(0))
    assert [c.instruction for c in candidates] == ["add a hat", "remove the cup"] and candidates[0].valid is None
    with pytest.raises(ValueError, match="unknown"):
        CallableProposer(lambda image, caption: [{"instruction": "x", "colour": "red"}]).propose(reference, None)


# --------------------------------------------------------------------- synthetic datasets


def test_unpaired_set_has_no_targets(cfg, tmp_path):
    from nb_edit.data.synthetic import build_unpaired

    dataset, metrics = build_unpaired(tmp_path / "unpaired", cfg, {"train": 6, "val": 2})
    assert len(dataset) > 0 and dataset.n_paired == 0 and all(r.target is None for r in dataset)
    assert metrics["train.n_candidates"] == 24 and metrics["train.filter_precision"] >= 0.9
    column = pq.read_table(tmp_path / "unpaired" / "train" / "metadata.parquet").column("target_file_name")
    assert column.null_count == len(column)
    assert not any("target" in p.name for p in (tmp_path / "unpaired").rglob("*.png"))


def test_synthetic_splits_are_deterministic_and_disjoint(cfg, tmp_path):
    from nb_edit.data.synthetic import build_paired, build_test_set, scene_split

    train = build_paired(tmp_path / "train", cfg, {"train": 12, "val": 4}, seed=0)
    test_a = build_test_set(tmp_path / "test_a", cfg, 8)
    test_b = build_test_set(tmp_path / "test_b", cfg, 8)  # another run: the same test edits
    assert [(r.instruction, r.scene_json) for r in test_a] == [(r.instruction, r.scene_json) for r in test_b]
    other_seed = build_paired(tmp_path / "train1", cfg, {"train": 12}, seed=1)
    assert {r.scene_json for r in other_seed}.isdisjoint({r.scene_json for r in test_a})
    assert {r.scene_json for r in train}.isdisjoint({r.scene_json for r in test_a})
    for dataset in (train, test_a, other_seed):
        for record in dataset:
            assert scene_split(world.Scene.from_dict(json.loads(record.scene_json))) == record.split
    again = build_paired(tmp_path / "train_again", cfg, {"train": 12, "val": 4}, seed=0)
    assert [r.to_dict() for r in again] == [r.to_dict() for r in train]
    sample = train.load(0)
    np.testing.assert_array_equal(sample["target"], world.render(world.Edit.from_dict(json.loads(train[0].edit_json), cfg).target, cfg))


def test_noisy_and_multiturn_sets(cfg, tmp_path):
    from nb_edit.data.synthetic import build_multiturn, build_paired

    noisy = build_paired(tmp_path / "noisy", cfg, {"train": 10}, noisy=True)
    assert all(r.corruption in world.CORRUPTIONS and r.true_quality is not None and r.target for r in noisy)
    assert any(not (r.true_followed and r.true_preserved) for r in noisy)  # the point: imperfect targets
    chains = build_multiturn(tmp_path / "mt", cfg, {"train": 3, "test": 2}, n_turns=3)
    assert len(chains) == 15
    by_sequence = {}
    for record in chains:
        by_sequence.setdefault(record.sequence_id, []).append(record)
    for turns in by_sequence.values():
        turns.sort(key=lambda r: r.turn)
        assert [r.turn for r in turns] == [0, 1, 2] and len({r.split for r in turns}) == 1
        for before, after in zip(turns, turns[1:]):
            assert after.source == before.target  # turn t edits turn t-1's result


def test_a_longer_multiturn_test_split_starts_with_the_usual_one(smoke_data, monkeypatch, tmp_path):
    """``multiturn_test(settings, n)`` draws the test split from its fixed seed: its first
    sequences are the run's own test sequences, and it leaves the run's datasets alone."""
    from nb_edit.core.config import RunSettings
    from nb_edit.data.world_datasets import multiturn_test

    monkeypatch.setenv("NB_EDIT_CACHE", str(tmp_path))
    settings = RunSettings.for_profile("smoke")
    usual = smoke_data["multiturn"].split("test")
    longer = multiturn_test(settings, 2 * settings.n_test_sequences)
    assert len(usual) == 3 * settings.n_test_sequences  # three turns per sequence
    assert len(longer) == 2 * len(usual)
    for i in range(len(usual)):
        a, b = usual.load(i), longer.load(i)
        assert a["instruction"] == b["instruction"] and a["sequence_id"] == b["sequence_id"]
        assert np.array_equal(a["source"], b["source"]) and np.array_equal(a["target"], b["target"])
    same = multiturn_test(settings)
    instructions = lambda d: [d.load(i)["instruction"] for i in range(len(d))]  # noqa: E731
    assert instructions(same) == instructions(usual)
    with pytest.raises(ValueError, match="positive integer"):
        multiturn_test(settings, 0)
