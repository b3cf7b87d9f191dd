"""Hostile inputs to the dataset readers, the converter and the folder benchmark: a file name that
leaves the dataset folder, an image that does not decode, a bad instruction, a malformed
``edit_json``, a mostly broken folder, bytes that are not UTF-8. Each must be skipped and counted
(reason and place named) or refused with a clear error; none may crash a read or copy a file from
outside the dataset. Counted by conftest.py."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from nb_edit import world
from nb_edit.core import paths
from nb_edit.core.validation import BadInputError, SkipCounter, TooManyBadSamples, check_instruction
from nb_edit.data.schema import RecordError, validate_record
from nb_edit.data.store import convert_paired, read_dataset
from nb_edit.evaluation import harness

HUGE_WORD = "x" * 5_000_000  # one "word" of 5 MB: passes a word count, not a character limit


def _png(value: int, size=(8, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((*size, 3), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels, with almost no data behind it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def lenient() -> SkipCounter:
    """A counter that lets one bad row of a handful through, so the test sees the count (judged
    at the end only: a converter reads its whole table, bad lines included, before any row is good)."""
    return SkipCounter(threshold_fraction=0.5, min_seen=1_000)


@pytest.fixture
def secret(tmp_path) -> Path:
    """A valid image outside every dataset folder: nothing may copy or read it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(_png(7))
    (outside / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    return outside / "secret.png"


def _escape(kind: str, folder: Path, secret: Path):
    """A name, as a table or metadata would hold it, that reaches ``secret`` from ``folder``."""
    if kind == "absolute":
        return str(secret)
    if kind == "absolute_text":  # /etc/passwd, but hermetic
        return str(secret.parent / "passwd")
    if kind == "dotdot":
        return "../outside/secret.png"
    if kind == "backslash_dotdot":
        return "..\\outside\\secret.png"
    if kind == "url":
        return secret.as_uri()
    if kind == "symlink_file":
        (folder / "images").mkdir(exist_ok=True)
        (folder / "images" / "link.png").symlink_to(secret)
        return "images/link.png"
    if kind == "symlink_dir":
        (folder / "linked").symlink_to(secret.parent, target_is_directory=True)
        return "linked/secret.png"
    if kind == "hf_dict_path":
        return {"bytes": None, "path": "../outside/secret.png"}
    raise AssertionError(kind)


def _no_outside_bytes(folder: Path, secret: Path) -> None:
    leaked = {secret.read_bytes(), (secret.parent / "passwd").read_bytes()}
    for path in folder.rglob("*"):
        if path.is_file():
            assert path.read_bytes() not in leaked, f"{path} is a copy of a file outside the dataset"


# ------------------------------------------------------------------------ the converter


def _ip2p(folder: Path, n_good: int, bad: dict | None = None) -> Path:
    """An InstructPix2Pix table with ``n_good`` good rows and, last, one row updated by ``bad``."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_good + (bad is not None)):
        (folder / "images" / f"in{i}.png").write_bytes(_png(10 + i))
        (folder / "images" / f"out{i}.png").write_bytes(_png(100 + i))
        rows.append({"input_image": f"images/in{i}.png", "edit_prompt": f"make it red {i}",
                     "edited_image": f"images/out{i}.png"})
    if bad is not None:
        rows[-1].update(bad)
    table = folder / "metadata.jsonl"
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return table


@pytest.mark.bad_input
@pytest.mark.parametrize("kind", ["absolute", "absolute_text", "dotdot", "symlink_file", "symlink_dir", "url",
                                  "hf_dict_path"])
def test_convert_never_copies_a_file_from_outside_the_table_folder(tmp_path, secret, kind):
    src = tmp_path / "ip2p"
    src.mkdir()
    _ip2p(src, 4, {"input_image": _escape(kind, src, secret)})
    counter = lenient()
    dataset = convert_paired(src, tmp_path / "out", counter=counter)
    assert len(dataset) == 4 and counter.reasons == {"path_outside_dataset": 1}, counter.reasons
    assert "row 4" in counter.examples[0] and "leaves the dataset folder" in counter.examples[0], counter.examples
    _no_outside_bytes(tmp_path / "out", secret)


@pytest.mark.bad_input
@pytest.mark.parametrize("kind", ["empty", "text", "truncated", "bomb", "over_cap"])
def test_convert_skips_images_that_do_not_decode(tmp_path, kind):
    src = tmp_path / "ip2p"
    src.mkdir()
    _ip2p(src, 4, {"edited_image": "images/bad.png"})
    content = {"empty": b"", "text": b"root:x:0:0:root:/root:/bin/bash\n", "truncated": _png(1, (32, 32))[:60],
               "bomb": _png_header(20_000, 20_000), "over_cap": _png_header(7_000, 7_000)}[kind]
    (src / "images" / "bad.png").write_bytes(content)
    counter = lenient()
    dataset = convert_paired(src, tmp_path / "out", counter=counter)
    assert len(dataset) == 4 and counter.reasons == {"unreadable_image": 1}, counter.reasons
    assert "bad.png" in counter.examples[0]
    if kind in ("bomb", "over_cap"):  # the cap is named, so the user knows what to raise
        assert "max_pixels" in counter.examples[0], counter.examples
    if content:
        assert not any(p.read_bytes() == content for p in (tmp_path / "out").rglob("*") if p.is_file())


@pytest.mark.bad_input
def test_convert_skips_image_bytes_that_do_not_decode(tmp_path):
    rows = [{"input_image": {"bytes": _png(i), "path": None}, "edit_prompt": f"make it red {i}",
             "edited_image": {"bytes": _png(50 + i), "path": None}} for i in range(5)]
    rows[4]["edited_image"]["bytes"] = _png(3, (32, 32))[:70]  # a Hub export cut short
    table = tmp_path / "hf.parquet"
    pq.write_table(pa.Table.from_pylist(rows), table)
    counter = lenient()
    dataset = convert_paired(table, tmp_path / "out", counter=counter)
    assert len(dataset) == 4 and counter.reasons == {"unreadable_image": 1}, counter.reasons


@pytest.mark.bad_input
def test_convert_skips_a_huge_instruction(tmp_path):
    src = tmp_path / "ip2p"
    _ip2p(src, 4, {"edit_prompt": HUGE_WORD})
    counter = lenient()
    dataset = convert_paired(src, tmp_path / "out", counter=counter)
    assert len(dataset) == 4 and counter.skipped == 1 and "characters" in counter.examples[0]


@pytest.mark.bad_input
def test_convert_skips_a_repeated_turn_instead_of_failing_the_write(tmp_path):
    rows = [{"img_id": "100", "turn_index": turn, "instruction": f"edit {turn}",
             "source_img": {"bytes": _png(turn), "path": None}, "target_img": {"bytes": _png(50 + turn), "path": None}}
            for turn in (1, 2, 3, 2)]  # turn 2 twice: the same record id
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "mb.parquet")
    counter = lenient()
    dataset = convert_paired(tmp_path / "mb.parquet", tmp_path / "out", counter=counter)
    assert len(dataset) == 3 and counter.reasons == {"duplicate_id": 1}, counter.reasons
    assert "magicbrush-100-t1" in counter.examples[0]


@pytest.mark.bad_input
@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_convert_skips_lines_that_are_not_utf8(tmp_path, suffix):
    src = tmp_path / "ip2p"
    (src / "images").mkdir(parents=True)
    lines = []
    for i in range(5):
        (src / "images" / f"in{i}.png").write_bytes(_png(i))
        (src / "images" / f"out{i}.png").write_bytes(_png(50 + i))
        prompt = "make it caf\xe9 coloured" if i == 2 else f"make it red {i}"
        if suffix == ".jsonl":
            line = ('{"input_image": "images/in%d.png", "edit_prompt": "%s", "edited_image": "images/out%d.png"}'
                    % (i, prompt, i))
        else:
            line = f"images/in{i}.png,{prompt},images/out{i}.png"
        lines.append(line.encode("utf-8") if i != 2 else line.encode("latin-1"))
    header = [b"input_image,edit_prompt,edited_image"] if suffix == ".csv" else []
    table = src / f"metadata{suffix}"
    table.write_bytes(b"\n".join(header + lines) + b"\n")
    counter = lenient()
    dataset = convert_paired(src, tmp_path / "out", counter=counter)
    assert len(dataset) == 4 and counter.reasons == {"not_utf8": 1}, counter.reasons
    line_number = 3 + (suffix == ".csv")
    assert f"{table}:{line_number}" in counter.examples[0], counter.examples


@pytest.mark.bad_input
def test_convert_names_a_table_that_is_not_utf8_at_all(tmp_path):
    src = tmp_path / "ip2p"
    src.mkdir()
    (src / "metadata.csv").write_bytes("input_image,edit_prompt,edited_image\na.png,café,b.png\n".encode("utf-16"))
    with pytest.raises(BadInputError) as caught:
        convert_paired(src, tmp_path / "out")
    message = str(caught.value)
    assert str(src / "metadata.csv") in message and "UTF-8" in message and "Fix:" in message, message


# -------------------------------------------------------------------- reading a dataset


def _user_folder(folder: Path, n_good: int, bad_row: dict | None = None, fmt: str = "jsonl") -> Path:
    """A user's folder (metadata at its root) with ``n_good`` good rows and one bad row last."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_good):
        (folder / "images" / f"ok{i}.png").write_bytes(_png(20 + i))
        rows.append({"id": f"r{i}", "source_file_name": f"images/ok{i}.png", "instruction": f"make it red {i}"})
    if bad_row is not None:
        (folder / "images" / "bad.png").write_bytes(_png(99))
        rows.append({"id": "bad", "source_file_name": "images/bad.png", "instruction": "make it blue", **bad_row})
    if fmt == "jsonl":
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        text = ",".join(keys) + "\n" + "".join(",".join(str(r.get(k, "")) for k in keys) + "\n" for r in rows)
        (folder / "metadata.csv").write_text(text)
    return folder


@pytest.mark.bad_input
@pytest.mark.parametrize("kind", ["absolute", "dotdot", "backslash_dotdot", "url", "symlink_file", "symlink_dir"])
def test_read_dataset_refuses_names_that_leave_the_folder(tmp_path, secret, kind):
    folder = tmp_path / "mine"
    folder.mkdir()
    _user_folder(folder, 3, {"source_file_name": _escape(kind, folder, secret)})
    dataset = read_dataset(folder, counter=lenient())
    assert [r.id for r in dataset] == ["r0", "r1", "r2"]
    assert dataset.counter.reasons == {"path_outside_dataset": 1}, dataset.counter.reasons
    assert "'bad'" in dataset.counter.examples[0]
    outside = np.asarray(Image.open(secret))
    assert not any(np.array_equal(s["source"], outside) for s in dataset.iter_samples())


@pytest.mark.bad_input
@pytest.mark.parametrize("link", ["file", "folder"])
def test_validate_record_refuses_a_symlink_out_of_its_root(tmp_path, secret, link):
    root = tmp_path / "root"
    root.mkdir()
    name = _escape("symlink_file" if link == "file" else "symlink_dir", root, secret)
    with pytest.raises(RecordError) as caught:
        validate_record({"id": "x", "source_file_name": name, "instruction": "add a hat"}, root)
    message = str(caught.value)
    assert "'x'" in message and "outside" in message and "Fix:" in message, message


@pytest.mark.bad_input
def test_a_symlink_swapped_in_after_the_read_is_not_loaded(tmp_path, secret):
    folder = _user_folder(tmp_path / "mine", 3)
    dataset = read_dataset(folder, counter=lenient())
    (folder / "images" / "ok1.png").unlink()
    (folder / "images" / "ok1.png").symlink_to(secret)
    with pytest.raises(BadInputError, match="'r1'.*outside"):
        dataset.load(1)
    with pytest.raises(BadInputError, match="outside"):
        dataset.image_path(1)
    assert [s["id"] for s in dataset.iter_samples()] == ["r0", "r2"]
    assert dataset.counter.reasons == {"path_outside_dataset": 1}


@pytest.mark.bad_input
@pytest.mark.parametrize("fmt, bad, reason", [
    ("jsonl", {"instruction": 42}, "invalid_record"),
    ("jsonl", {"instruction": "   "}, "invalid_record"),
    ("jsonl", {"instruction": ["make it red"]}, "invalid_record"),
    ("jsonl", {"instruction": "word " * 70}, "invalid_record"),
    ("jsonl", {"instruction": HUGE_WORD}, "invalid_record"),
    ("csv", {"instruction": "word " * 70}, "invalid_record"),
    ("csv", {"instruction": HUGE_WORD}, "invalid_csv"),  # past the csv module's field limit
    ("csv", {"turn": "\u00b2"}, "invalid_record"),  # a superscript two: a digit to str.isdigit, not to int()
], ids=["number", "blank", "list", "70_words", "5MB_word", "csv_70_words", "csv_5MB_word", "csv_superscript_turn"])
def test_one_bad_row_is_skipped_not_fatal(tmp_path, fmt, bad, reason):
    folder = _user_folder(tmp_path / "mine", 3, bad, fmt=fmt)
    dataset = read_dataset(folder, counter=lenient())
    assert [r.id for r in dataset] == ["r0", "r1", "r2"]
    assert dataset.counter.reasons == {reason: 1}, dataset.counter.reasons
    where = "'bad'" if reason == "invalid_record" else f"metadata.{fmt}:5"
    assert where in dataset.counter.examples[0], dataset.counter.examples


@pytest.mark.bad_input
def test_dataset_csv_line_that_is_not_utf8_is_skipped_and_named(tmp_path):
    folder = _user_folder(tmp_path / "mine", 4, fmt="csv")
    lines = (folder / "metadata.csv").read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b"make it red", "café au lait".encode("latin-1"))
    (folder / "metadata.csv").write_bytes(b"\n".join(lines))
    dataset = read_dataset(folder, counter=lenient())
    assert [r.id for r in dataset] == ["r0", "r2", "r3"]
    assert dataset.counter.reasons == {"not_utf8": 1}
    assert f"{folder / 'metadata.csv'}:3" in dataset.counter.examples[0], dataset.counter.examples


@pytest.mark.bad_input
def test_dataset_csv_that_is_not_utf8_at_all_names_the_file_and_the_fix(tmp_path):
    folder = _user_folder(tmp_path / "mine", 2, fmt="csv")
    (folder / "metadata.csv").write_bytes((folder / "metadata.csv").read_text().encode("utf-16"))
    with pytest.raises(BadInputError) as caught:
        read_dataset(folder)
    message = str(caught.value)
    assert str(folder / "metadata.csv") in message and "UTF-8" in message and "Fix:" in message, message


@pytest.mark.bad_input
def test_verify_images_counts_a_decompression_bomb(tmp_path):
    folder = _user_folder(tmp_path / "mine", 3, {})
    (folder / "images" / "bad.png").write_bytes(_png_header(20_000, 20_000))
    dataset = read_dataset(folder, counter=lenient(), verify_images=True)
    assert [r.id for r in dataset] == ["r0", "r1", "r2"] and dataset.counter.reasons == {"corrupt_image": 1}


# ------------------------------------------------------------------------ instructions


@pytest.mark.bad_input
def test_a_5mb_single_word_instruction_is_refused():
    with pytest.raises(BadInputError) as caught:
        check_instruction(HUGE_WORD)
    message = str(caught.value)
    assert "5,000,000 characters" in message and "1,000" in message and "max_chars" in message, message[:300]
    assert len(message) < 500  # the message quotes the start of the text, not all of it


@pytest.mark.bad_input
def test_the_character_limit_is_a_keyword():
    assert check_instruction("a" * 10, max_chars=10) == "a" * 10
    with pytest.raises(BadInputError, match="11 characters"):
        check_instruction("a" * 11, max_chars=10)


@pytest.mark.bad_input
@pytest.mark.parametrize("text", ["   ", "make it red " * 100], ids=["blank", "1200_characters"])
def test_a_proposer_skips_and_counts_an_unusable_instruction(text):
    from nb_edit.data.curation import CallableProposer, Reference

    proposer = CallableProposer(lambda image, caption: ["add a hat", text, "remove the cup"],
                                counter=lenient())
    reference = Reference(id="p", image=np.zeros((8, 8, 3), np.uint8), caption="a photo")
    candidates = proposer.propose(reference, np.random.default_rng(0))
    assert [c.instruction for c in candidates] == ["add a hat", "remove the cup"]
    assert proposer.counter.reasons == {"invalid_instruction": 1} and "'p'" in proposer.counter.examples[0]


@pytest.mark.bad_input
@pytest.mark.parametrize("line, reason", [
    (b'{"id": "broken", "photo": ', "invalid_json"),
    (b'{"id": "n1", "photo": "camera", "edit_type": "style", "instruction": 7, "caption": "a", '
     b'"caption_edited": "b"}', "invalid_record"),
    ('{"id": "l1", "photo": "camera", "edit_type": "style", "instruction": "caf\xe9", "caption": "a", '
     '"caption_edited": "b"}'.encode("latin-1"), "not_utf8"),
    (b'{"id": "u1", "photo": "nowhere", "edit_type": "style", "instruction": "make it red", "caption": "a", '
     b'"caption_edited": "b"}', "unknown_photo"),
], ids=["invalid_json", "number_instruction", "latin1", "unknown_photo"])
def test_real_edit_instructions_skip_a_bad_line(tmp_path, line, reason):
    from nb_edit.data.real_photos import instructions_path, read_instructions

    good = [raw for raw in instructions_path().read_bytes().split(b"\n") if raw.strip()]
    path = tmp_path / "instructions.jsonl"
    path.write_bytes(b"\n".join(good[:3] + [line] + good[3:]) + b"\n")
    counter = lenient()
    items = read_instructions(path, counter=counter)
    assert len(items) == len(good) and counter.reasons == {reason: 1}, counter.reasons


# ------------------------------------------------------------------- the folder benchmark


def _shapes_folder(folder: Path, n: int, cfg: world.WorldConfig) -> list[dict]:
    """``n`` ShapesWorld records with their true edit, written as a user's folder (split test)."""
    (folder / "imgs").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        edit = world.sample_edit(world.sample_scene(rng, cfg), rng, cfg)
        Image.fromarray(world.render(edit.source, cfg)).save(folder / "imgs" / f"{i}.png")
        rows.append({"id": f"s{i}", "source_file_name": f"imgs/{i}.png", "instruction": edit.instruction,
                     "edit_type": edit.edit_type, "split": "test", "edit_json": json.dumps(edit.to_dict())})
    return rows


@pytest.mark.bad_input
@pytest.mark.parametrize("edit_json", ["{not json", '{"edit_type": "colour"}', "[]"],
                         ids=["invalid_json", "missing_keys", "not_an_object"])
def test_folder_benchmark_skips_a_malformed_edit_json(tmp_path, edit_json):
    cfg = world.WorldConfig(resolution=16)
    rows = _shapes_folder(tmp_path, 4, cfg)
    rows[2]["edit_json"] = edit_json
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    counter = lenient()
    bench = harness.folder_benchmark(tmp_path, resolution=16, counter=counter)
    assert bench.ids == ["s0", "s1", "s3"] and bench.skipped == 1 and bench.edits is not None
    assert counter.reasons == {"invalid_edit_json": 1} and "'s2'" in counter.examples[0], counter.examples


@pytest.mark.bad_input
@pytest.mark.parametrize("broken", ["empty", "truncated"])
def test_a_mostly_broken_folder_stops_the_benchmark(tmp_path, broken):
    (tmp_path / "imgs").mkdir()
    rows = []
    for i in range(25):
        content = _png(i) if i == 0 else (b"" if broken == "empty" else _png(i, (16, 16))[:50])
        (tmp_path / "imgs" / f"{i}.png").write_bytes(content)
        rows.append({"id": f"p{i}", "source_file_name": f"imgs/{i}.png", "instruction": "make it red"})
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(TooManyBadSamples) as caught:
        harness.folder_benchmark(tmp_path, resolution=16)
    message = str(caught.value)
    assert str(tmp_path) in message and "24 of 25" in message and "unreadable_image" in message, message


@pytest.mark.bad_input
def test_a_sequence_with_a_malformed_edit_json_is_dropped_and_counted(tmp_path):
    from nb_edit.data.sequences import sequences_from

    cfg = world.WorldConfig(resolution=16)
    rows = _shapes_folder(tmp_path, 6, cfg)
    for i, row in enumerate(rows):  # three sequences of two turns
        row.update(sequence_id=f"q{i // 2}", turn=i % 2)
    rows[3]["edit_json"] = "{not json"
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset = read_dataset(tmp_path, counter=lenient())
    sequences = sequences_from(dataset, world_cfg=cfg)
    assert [s.sequence_id for s in sequences] == ["q0", "q2"] and all(s.edits for s in sequences)
    assert dataset.counter.reasons == {"invalid_edit_json": 2} and dataset.counter.good == 4
    assert "'q1'" in dataset.counter.examples[0] and "'s3'" in " ".join(dataset.counter.examples)


# ---------------------------------------------------------------------- the helper itself


def test_inside_returns_the_resolved_path_and_allows_links_within_the_folder(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(_png(1))
    (tmp_path / "alias.png").symlink_to(tmp_path / "images" / "a.png")
    assert paths.inside(tmp_path, "images/a.png") == (tmp_path / "images" / "a.png").resolve()
    assert paths.inside(tmp_path, "alias.png") == (tmp_path / "images" / "a.png").resolve()
    assert paths.inside(tmp_path, "images/new.png") == (tmp_path / "images" / "new.png").resolve()


@pytest.mark.bad_input
@pytest.mark.parametrize("name", ["/etc/passwd", "../x.png", "a/../../x.png", "https://example.com/x.png",
                                  "C:\\x.png", "a\0.png", ""])
def test_inside_refuses_and_names_the_input(tmp_path, name):
    with pytest.raises(BadInputError) as caught:
        paths.inside(tmp_path, name, what="row 3, column 'image'")
    message = str(caught.value)
    assert "row 3, column 'image'" in message and "Fix:" in message, message
