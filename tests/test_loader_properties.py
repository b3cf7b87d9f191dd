"""Property-based tests of the dataset loader: whatever a metadata file holds, every row is
either read or skipped and counted, and the loader never fails with anything but its own
clear errors."""

import json

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from nb_edit.core.validation import BadInputError, SkipCounter, TooManyBadSamples
from nb_edit.data.store import read_dataset

FIELDS = ("id", "source_file_name", "instruction", "caption", "caption_edited", "edit_type", "turn")
values = st.one_of(st.none(), st.text(max_size=30), st.integers(-5, 5), st.floats(allow_nan=True),
                   st.just("images/ok.png"), st.just("images/missing.png"), st.lists(st.integers(), max_size=2))
rows = st.lists(st.dictionaries(st.sampled_from(FIELDS), values, max_size=len(FIELDS)), max_size=12)
lines = st.lists(st.one_of(rows.map(lambda r: [json.dumps(x) for x in r]),
                           st.lists(st.binary(max_size=40).map(lambda b: b.decode("latin-1")), max_size=3)),
                 max_size=3)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunks=lines)
def test_any_metadata_is_read_or_counted(tmp_path_factory, chunks):
    folder = tmp_path_factory.mktemp("ds")
    (folder / "images").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "images" / "ok.png")
    data = "\n".join(line for chunk in chunks for line in chunk).encode("utf-8", errors="surrogateescape")
    (folder / "metadata.jsonl").write_bytes(data)
    counter = SkipCounter(threshold_fraction=1.0, min_seen=1)
    try:
        dataset = read_dataset(folder, counter=counter)
    except (TooManyBadSamples, BadInputError, FileNotFoundError):
        return  # a clear, typed refusal is an acceptable answer to garbage
    n_lines = sum(1 for line in data.split(b"\n") if line.strip())
    assert len(dataset) == counter.good
    assert counter.good + counter.skipped == n_lines  # every non-blank line: read, or skipped and counted
    for record in dataset:
        assert isinstance(record.instruction, str) and record.instruction.strip()
        assert (folder / record.source).exists()


@settings(max_examples=40, deadline=None)
@given(n_good=st.integers(0, 6), n_bad=st.integers(0, 6))
def test_good_rows_survive_bad_neighbours(tmp_path_factory, n_good, n_bad):
    folder = tmp_path_factory.mktemp("mix")
    (folder / "images").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "images" / "ok.png")
    good = [json.dumps({"id": f"g{i}", "source_file_name": "images/ok.png", "instruction": "make it red",
                        "caption": "a thing", "caption_edited": "a red thing", "edit_type": "colour"})
            for i in range(n_good)]
    bad = [json.dumps({"id": f"b{i}", "source_file_name": "images/missing.png", "instruction": "x"})
           for i in range(n_bad)]
    (folder / "metadata.jsonl").write_text("\n".join(good + bad))
    counter = SkipCounter(threshold_fraction=1.0, min_seen=1)
    if n_good + n_bad == 0:
        return
    dataset = read_dataset(folder, counter=counter)
    assert [r.id for r in dataset] == [f"g{i}" for i in range(n_good)]
    assert counter.skipped == n_bad
