"""Editing datasets on disk, in a layout that HF ``datasets`` loads as it is.

Layout (an *imagefolder* with one metadata file per split)::

    <folder>/
      dataset.json                 format version, counts per split, split seed, description
      train/metadata.parquet       one row per record (schema.EditRecord)
      train/images/<name>.png      source and target images, paths relative to train/
      val/...   test/...

Image fields are stored as the columns ``source_file_name`` and ``target_file_name``: the
imagefolder builder turns every ``*_file_name`` string column into an image column named
without the suffix, so ``datasets.load_dataset("imagefolder", data_dir=folder)`` returns a
``DatasetDict`` (train / validation / test) with ``source`` and ``target`` images and every
other field as is. Metadata is Parquet rather than JSON Lines because the builder requires
every split to have the same column types, and a JSON reader types an all-empty column (the
targets of an unpaired split) as null but a filled one as string; Parquet keeps the declared
type. :func:`read_dataset` also reads ``metadata.jsonl`` / ``metadata.csv`` folders written by
hand, so a user's own data in that format loads through the same path.

Bad rows and unreadable images are skipped and counted with ``validation.SkipCounter``: the
counts by reason show up in ``EditDataset.metrics()``, and the counter raises
``TooManyBadSamples`` once their share passes its threshold (default 5% after 50 samples, and
at the end of a read).
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from os import PathLike
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from nb_edit.core.images import load_image
from nb_edit.core.validation import BadInputError, SkipCounter, read_jsonl
from nb_edit.data.schema import (
    FILE_SUFFIX,
    IMAGE_FIELDS,
    SPLIT_SEED,
    SPLITS,
    EditRecord,
    RecordError,
    assign_split,
    validate_record,
)

FORMAT_VERSION = 1
INFO_FILE = "dataset.json"
METADATA_FILES = ("metadata.parquet", "metadata.jsonl", "metadata.csv")


# ----------------------------------------------------------------------------------- writing


def _write_image(value: Any, destination: Path, name: str) -> None:
    """Write an array (any uint8 mode PIL knows: (H,W), (H,W,3), (H,W,4)), copy a file, or
    write encoded bytes. The format follows the file name's extension."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(value, np.ndarray):
        if value.dtype != np.uint8 or value.ndim not in (2, 3) or (value.ndim == 3 and value.shape[2] not in (1, 3, 4)):
            raise BadInputError(f"image {name!r}", f"expected a uint8 array (H, W), (H, W, 3) or (H, W, 4), "
                                f"got {value.dtype} {value.shape}", "convert it with nb_edit.core.images.to_uint8")
        Image.fromarray(value[..., 0] if value.ndim == 3 and value.shape[2] == 1 else value).save(destination)
    elif isinstance(value, (bytes, bytearray)):
        destination.write_bytes(value)
    elif isinstance(value, (str, PathLike)):
        if not Path(value).is_file():
            raise BadInputError(f"image {name!r}", f"file {value} does not exist", "fix the path")
        shutil.copyfile(value, destination)
    else:
        raise BadInputError(f"image {name!r}", f"got a {type(value).__name__}",
                            "pass a uint8 array, a file path or encoded image bytes")


def _arrow_schema(rows: list[dict[str, Any]]) -> pa.Schema:
    """One schema for every split: inferred over all rows, declared fields kept typed."""
    declared = {
        "id": pa.string(), "source_file_name": pa.string(), "target_file_name": pa.string(),
        "instruction": pa.string(), "caption": pa.string(), "caption_edited": pa.string(),
        "edit_type": pa.string(), "turn": pa.int64(), "sequence_id": pa.string(), "split": pa.string(),
        "scene_json": pa.string(), "edit_json": pa.string(), "corruption": pa.string(),
        "true_followed": pa.bool_(), "true_preserved": pa.bool_(), "true_quality": pa.float64(),
    }
    reward_types: dict[str, pa.DataType] = {}
    for row in rows:
        for name, value in (row.get("rewards") or {}).items():
            kind = pa.string() if isinstance(value, str) else pa.float64()
            if reward_types.setdefault(name, kind) != kind:
                raise RecordError(f"record {row['id']!r}, field 'rewards.{name}'",
                                  "a number in some records and a text in others",
                                  "keep each reward key to one kind (scores as numbers, failure texts as strings)")
    fields = [pa.field(name, kind) for name, kind in declared.items()]
    fields.insert(fields.index(pa.field("split", pa.string())),
                  pa.field("rewards", pa.struct(sorted(reward_types.items())) if reward_types else pa.null()))
    return pa.schema(fields)


def write_dataset(
    records: Iterable[EditRecord | dict[str, Any]],
    images: Mapping[str, Any],
    folder: str | PathLike,
    description: str = "",
    overwrite: bool = False,
) -> Path:
    """Write ``records`` and the ``images`` they reference to ``folder`` (layout above).

    ``images`` maps each image path named by a record's ``source`` / ``target`` (relative, e.g.
    ``images/scene_0001.png``) to its content: a uint8 array, a file path to copy, or encoded
    bytes. An image shared by several records (the curated instructions of one scene) is
    written once per split. Every record is validated before anything is written.
    """
    folder = Path(folder)
    checked = [validate_record(r) for r in records]
    if not checked:
        raise ValueError(f"write_dataset({folder}): no records to write; pass at least one record.")
    seen: set[str] = set()
    for record in checked:
        if record.id in seen:
            raise RecordError(f"record {record.id!r}, field 'id'", "duplicated", "make ids unique in a dataset")
        seen.add(record.id)
        for field in IMAGE_FIELDS:
            name = getattr(record, field)
            if name is not None and name not in images:
                raise RecordError(f"record {record.id!r}, field {field!r}", f"image {name!r} is not in `images`",
                                  "pass its content under that key")
    if folder.exists() and any(folder.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{folder} is not empty; pass overwrite=True or choose another folder.")
        if not (folder / INFO_FILE).is_file():
            raise FileExistsError(
                f"{folder} holds files that are not an nb_edit dataset; refusing to overwrite it."
            )
        shutil.rmtree(folder)

    rows = [r.to_metadata_row() for r in checked]
    schema = _arrow_schema(rows)
    counts: dict[str, int] = {}
    for split in SPLITS:
        split_rows = [row for row, rec in zip(rows, checked) if rec.split == split]
        if not split_rows:
            continue
        split_dir = folder / split
        written: set[str] = set()
        for row in split_rows:
            for field in IMAGE_FIELDS:
                name = row[field + FILE_SUFFIX]
                if name is not None and name not in written:
                    _write_image(images[name], split_dir / PurePosixPath(name), name)
                    written.add(name)
        pq.write_table(pa.Table.from_pylist(split_rows, schema=schema), split_dir / "metadata.parquet")
        counts[split] = len(split_rows)
    info = {
        "format": "nb_edit imagefolder",
        "format_version": FORMAT_VERSION,
        "description": description,
        "counts": counts,
        "paired": sum(r.paired for r in checked),
        "split_seed": SPLIT_SEED,
    }
    (folder / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return folder


# ----------------------------------------------------------------------------------- reading


class EditDataset(Sequence[EditRecord]):
    """A torch-free list of :class:`EditRecord` whose images load on demand.

    ``ds[i]`` is a record (image fields are paths relative to ``ds.directory(i)``);
    ``ds.load(i, size)`` returns the record with its images as uint8 (H, W, 3) arrays;
    ``ds.iter_samples(size)`` loads them all, skipping (and counting) unreadable images.
    """

    def __init__(self, records: Sequence[EditRecord], directories: Sequence[Path], counter: SkipCounter):
        if len(records) != len(directories):
            raise ValueError("EditDataset: one directory per record is needed.")
        self._records = list(records)
        self._directories = list(directories)
        self.counter = counter

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return EditDataset(self._records[index], self._directories[index], self.counter)
        return self._records[index]

    def __repr__(self) -> str:
        splits = {s: n for s in SPLITS if (n := sum(r.split == s for r in self._records))}
        return f"EditDataset({len(self)} records, splits={splits}, paired={self.n_paired})"

    @property
    def n_paired(self) -> int:
        return sum(r.paired for r in self._records)

    def directory(self, index: int) -> Path:
        return self._directories[index]

    def image_path(self, index: int, field: str = "source") -> Path | None:
        if field not in IMAGE_FIELDS:
            raise ValueError(f"field={field!r} is not an image field; use one of {IMAGE_FIELDS}.")
        name = getattr(self._records[index], field)
        return None if name is None else self._directories[index] / name

    def filter(self, keep) -> EditDataset:
        """The records for which ``keep(record)`` is true (same counter)."""
        chosen = [i for i, r in enumerate(self._records) if keep(r)]
        return EditDataset([self._records[i] for i in chosen], [self._directories[i] for i in chosen], self.counter)

    def split(self, name: str) -> EditDataset:
        if name not in SPLITS:
            raise ValueError(f"split={name!r} is unknown; use one of {', '.join(SPLITS)}.")
        return self.filter(lambda r: r.split == name)

    def load(self, index: int, size: int | tuple[int, int] | None = None, fit: str = "crop") -> dict[str, Any]:
        """The record as a dict with ``source`` / ``target`` replaced by uint8 (H, W, 3) arrays
        (``target`` None when unpaired), resized to ``size`` with ``fit`` ("crop" or "pad",
        see ``nb_edit.core.images.load_image``). Raises ``BadInputError`` for an unreadable image."""
        sample = self._records[index].to_dict()
        for field in IMAGE_FIELDS:
            path = self.image_path(index, field)
            sample[field] = None if path is None else load_image(path, size=size, fit=fit)
        return sample

    def iter_samples(self, size: int | tuple[int, int] | None = None, fit: str = "crop") -> Iterator[dict[str, Any]]:
        """Every loadable sample; an unreadable image is skipped and counted, never dropped silently."""
        if fit not in ("crop", "pad"):  # checked here, or every sample would be skipped for it
            raise BadInputError(f"fit={fit!r}", "unknown resize mode", "use fit='crop' or fit='pad'")
        for index in range(len(self)):
            try:
                sample = self.load(index, size=size, fit=fit)
            except BadInputError as error:
                self.counter.skip("unreadable_image", f"{self._records[index].id}: {error}")
                continue
            yield sample

    def metrics(self, prefix: str = "data") -> dict[str, Any]:
        return self.counter.as_metrics(prefix)


def _metadata_file(directory: Path) -> Path | None:
    for name in METADATA_FILES:
        if (directory / name).is_file():
            return directory / name
    return None


def _iter_rows(path: Path, counter: SkipCounter) -> Iterator[dict[str, Any]]:
    if path.suffix == ".jsonl":
        # read_jsonl counts every parsed line as good; rows are counted here after validation,
        # so parse with a counter of its own and carry its skips over.
        parse = SkipCounter(threshold_fraction=1.0, name=str(path))
        rows = read_jsonl(path, parse)
        counter.reasons.update(parse.reasons)
        counter.examples.extend(parse.examples[: max(0, counter.max_examples - len(counter.examples))])
        yield from rows
    elif path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                yield {k: (None if v == "" else v) for k, v in row.items()}
    else:
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as error:
            raise BadInputError(path, f"not a readable Parquet file ({error})", "rewrite it with write_dataset")
        yield from table.to_pylist()


def _coerce_csv(row: dict[str, Any]) -> dict[str, Any]:
    """csv cells are text: turn the numeric and boolean columns back into numbers."""
    out = dict(row)
    for field in ("turn",):
        if isinstance(out.get(field), str) and out[field].strip().lstrip("-").isdigit():
            out[field] = int(out[field])
    if isinstance(out.get("true_quality"), str):
        try:
            out["true_quality"] = float(out["true_quality"])
        except ValueError:
            pass
    for field in ("true_followed", "true_preserved"):
        if isinstance(out.get(field), str) and out[field].lower() in ("true", "false"):
            out[field] = out[field].lower() == "true"
    return out


def _read_split_dir(directory: Path, split: str | None, counter: SkipCounter, verify_images: bool,
                    records: list[EditRecord], directories: list[Path]) -> None:
    metadata = _metadata_file(directory)
    if metadata is None:
        return
    for row in _iter_rows(metadata, counter):
        if metadata.suffix == ".csv":
            row = _coerce_csv(row)
        if isinstance(row, dict) and (split is not None or row.get("split") is None):
            # a split folder decides the split (as datasets does); a root file defaults to train
            row = {**row, "split": split or "train"}
        try:
            record = validate_record(row, root=directory)
            if verify_images:
                for field in IMAGE_FIELDS:
                    name = getattr(record, field)
                    if name is not None:
                        with Image.open(directory / name) as image:
                            image.verify()
        except RecordError as error:
            counter.skip("invalid_record", f"{metadata}: {error}")
            continue
        except (OSError, SyntaxError) as error:
            counter.skip("corrupt_image", f"{metadata}: record {row.get('id')!r}: {error}")
            continue
        counter.ok()
        records.append(record)
        directories.append(directory)


def read_dataset(
    folder: str | PathLike,
    split: str | None = None,
    counter: SkipCounter | None = None,
    verify_images: bool = False,
) -> EditDataset:
    """Read a dataset written by :func:`write_dataset`, or a user's folder in that format.

    ``folder`` holds either split folders (``train/``, ``val/``, ``test/``, each with a
    ``metadata.parquet|jsonl|csv``) or one metadata file at its root (records keep their own
    ``split`` field, default ``train``). ``split`` selects one split. Rows that fail validation
    (missing fields, missing image files) are skipped and counted in ``counter``;
    ``verify_images=True`` also opens every image header at read time (slower, catches corrupt files
    before training).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"dataset folder {folder} does not exist; write it first or fix the path.")
    if split is not None and split not in SPLITS:
        raise ValueError(f"split={split!r} is unknown; use one of {', '.join(SPLITS)} or None for all.")
    counter = counter if counter is not None else SkipCounter(name=str(folder))
    records: list[EditRecord] = []
    directories: list[Path] = []
    split_dirs = [s for s in SPLITS if _metadata_file(folder / s) is not None]
    if split_dirs:
        for name in split_dirs:
            if split is None or name == split:
                _read_split_dir(folder / name, name, counter, verify_images, records, directories)
    elif _metadata_file(folder) is not None:
        _read_split_dir(folder, None, counter, verify_images, records, directories)
        if split is not None:
            kept = [i for i, r in enumerate(records) if r.split == split]
            records, directories = [records[i] for i in kept], [directories[i] for i in kept]
    else:
        raise FileNotFoundError(
            f"{folder} has no {' / '.join(METADATA_FILES)} at its root nor in train/, val/, test/; "
            "see data/README.md for the layout."
        )
    counter.finish()
    return EditDataset(records, directories, counter)


# ------------------------------------------------------------------------------- conversion

# Column names of the common public paired layouts, and the record field each one fills.
LAYOUTS: dict[str, dict[str, tuple[str, ...]]] = {
    # InstructPix2Pix as the diffusers training script reads it; the original release spells
    # the images original_image / edited_image and adds the two captions.
    "instructpix2pix": {
        "source": ("input_image", "original_image"),
        "instruction": ("edit_prompt",),
        "target": ("edited_image",),
        "caption": ("original_prompt", "input"),
        "caption_edited": ("edited_prompt", "output"),
    },
    # MagicBrush: multi-turn, one row per turn (turn_index from 1), grouped by img_id.
    "magicbrush": {
        "source": ("source_img",),
        "instruction": ("instruction",),
        "target": ("target_img",),
        "sequence_id": ("img_id",),
        "turn": ("turn_index",),
    },
}


def detect_layout(columns: Iterable[str]) -> str:
    """The layout whose source, instruction and target columns are all present."""
    columns = set(columns)
    for name, spec in LAYOUTS.items():
        if all(any(c in columns for c in spec[f]) for f in ("source", "instruction", "target")):
            return name
    raise BadInputError(f"columns {sorted(columns)}", "match no known paired layout",
                        "provide InstructPix2Pix (input_image, edit_prompt, edited_image) or MagicBrush "
                        "(source_img, instruction, target_img) columns, or write the records yourself")


def _read_table(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as handle:
            rows = []
            for number, line in enumerate(handle, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as error:
                        rows.append({"__error__": f"line {number}: {error}"})
            return rows
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    raise BadInputError(path, f"unsupported table format {path.suffix!r}", "use .jsonl, .csv or .parquet")


def _image_value(value: Any, base: Path) -> Any:
    """A path (relative to the table's folder) or an HF image cell ``{"bytes", "path"}``."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
    if not isinstance(value, str) or not value:
        raise BadInputError(f"image cell {value!r:.60}", "neither a file path nor image bytes",
                            "give a path relative to the table or an HF image dict")
    path = Path(value) if Path(value).is_absolute() else base / value
    if not path.is_file():
        raise BadInputError(f"image file {path}", "not found", "fix the path in the table")
    return path


def _image_suffix(value: Any) -> str:
    if isinstance(value, Path):
        return value.suffix.lower() or ".png"
    kind = Image.open(io.BytesIO(value)).format or "PNG"
    return {"JPEG": ".jpg"}.get(kind, "." + kind.lower())


def convert_paired(
    src: str | PathLike,
    dst: str | PathLike,
    layout: str = "auto",
    id_prefix: str | None = None,
    split_seed: int = SPLIT_SEED,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    overwrite: bool = False,
    counter: SkipCounter | None = None,
) -> EditDataset:
    """Convert a public paired dataset (InstructPix2Pix or MagicBrush layout) to this format.

    ``src`` is a ``.jsonl`` / ``.csv`` / ``.parquet`` table, or a folder holding one (a
    ``metadata.*`` file or the only table in it); image cells are paths relative to the table's
    folder or HF image dicts with bytes. Rows whose images are missing or unreadable are skipped
    and counted in ``counter`` (default: ``SkipCounter``'s limits). Splits come from :func:`schema.assign_split` on the sequence id (MagicBrush: all
    turns of an image stay together) or the record id, with ``split_seed``.
    """
    src = Path(src)
    if src.is_dir():
        tables = [src / n for n in METADATA_FILES if (src / n).is_file()] or sorted(
            p for p in src.iterdir() if p.suffix in (".jsonl", ".csv", ".parquet"))
        if len(tables) != 1:
            raise BadInputError(src, f"expected one table (.jsonl/.csv/.parquet), found {len(tables)}",
                                "pass the table file itself")
        table_path = tables[0]
    elif src.is_file():
        table_path = src
    else:
        raise FileNotFoundError(f"converter source {src} does not exist.")
    rows = _read_table(table_path)
    columns = {k for row in rows for k in row if k != "__error__"}
    layout = detect_layout(columns) if layout == "auto" else layout
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is unknown; use 'auto' or one of {', '.join(LAYOUTS)}.")
    spec = LAYOUTS[layout]
    prefix = id_prefix or layout
    counter = counter if counter is not None else SkipCounter(name=f"convert {table_path}")
    records: list[EditRecord] = []
    images: dict[str, Any] = {}
    base = table_path.parent
    for index, row in enumerate(rows):
        if "__error__" in row:
            counter.skip("unparseable_row", f"{table_path} {row['__error__']}")
            continue
        values = {field: next((row[c] for c in names if row.get(c) not in (None, "")), None)
                  for field, names in spec.items()}
        turn_index = values.pop("turn", None)
        sequence = values.pop("sequence_id", None)
        record_id = f"{prefix}-{index:07d}"
        try:
            turn = int(turn_index) - 1 if turn_index is not None else 0  # MagicBrush counts from 1
            if sequence is not None:
                record_id = f"{prefix}-{sequence}-t{turn}"
            for field in IMAGE_FIELDS:
                content = _image_value(values[field], base)
                name = f"images/{record_id}_{field}{_image_suffix(content)}"
                images[name] = content
                values[field] = name
            record = validate_record({
                **{k: v for k, v in values.items() if v is not None},
                "id": record_id, "turn": turn,
                "sequence_id": None if sequence is None else f"{prefix}-{sequence}",
                "split": assign_split(f"{prefix}-{sequence}" if sequence is not None else record_id,
                                      split_seed, val_fraction, test_fraction),
            })
        except (BadInputError, OSError, ValueError) as error:  # RecordError is a BadInputError
            counter.skip("bad_row", f"{table_path} row {index}: {error}")
            continue
        counter.ok()
        records.append(record)
    counter.finish()
    if not records:
        raise BadInputError(table_path, "no row could be converted", "check the column names and image paths")
    write_dataset(records, images, dst, description=f"converted from {table_path.name} ({layout})",
                  overwrite=overwrite)
    dataset = read_dataset(dst)
    dataset.counter = counter  # the conversion's skips are what the caller needs to see
    return dataset
