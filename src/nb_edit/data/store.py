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
at the end of a read). Every file name read from a table or metadata goes through
``paths.inside``: a name that leaves the dataset's folder (absolute, ``..``, a URL, a symlink
pointing out) is skipped as ``path_outside_dataset`` and its file is never read or copied.
Lines that are not UTF-8 are skipped as ``not_utf8``, named ``file:line``.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from os import PathLike
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from nb_edit.core.images import DEFAULT_MAX_PIXELS, SUPPORTED_FORMATS, load_image
from nb_edit.core.paths import OutsideFolderError, inside
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
    ``ds.iter_samples(size)`` loads them all, skipping (and counting) unreadable images and
    names that leave the record's folder.
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
        """The resolved path of a record's image (None without one). Checked again at every call,
        not only at read time: a symlink swapped in later that points out of the record's folder
        raises ``paths.OutsideFolderError`` instead of being followed."""
        if field not in IMAGE_FIELDS:
            raise ValueError(f"field={field!r} is not an image field; use one of {IMAGE_FIELDS}.")
        record = self._records[index]
        name = getattr(record, field)
        if name is None:
            return None
        return inside(self._directories[index], name, what=f"record {record.id!r}, field {field!r}")

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
        see ``nb_edit.core.images.load_image``). Raises ``BadInputError`` for an unreadable image,
        and its subclass ``paths.OutsideFolderError`` for a name that leaves the record's folder."""
        sample = self._records[index].to_dict()
        for field in IMAGE_FIELDS:
            path = self.image_path(index, field)
            sample[field] = None if path is None else load_image(path, size=size, fit=fit)
        return sample

    def iter_samples(self, size: int | tuple[int, int] | None = None, fit: str = "crop") -> Iterator[dict[str, Any]]:
        """Every loadable sample; an unreadable image (``unreadable_image``) or one whose name leaves
        the record's folder (``path_outside_dataset``) is skipped and counted, never dropped silently."""
        if fit not in ("crop", "pad"):  # checked here, or every sample would be skipped for it
            raise BadInputError(f"fit={fit!r}", "unknown resize mode", "use fit='crop' or fit='pad'")
        for index in range(len(self)):
            try:
                sample = self.load(index, size=size, fit=fit)
            except OutsideFolderError as error:
                self.counter.skip("path_outside_dataset", f"{self._records[index].id}: {error}")
                continue
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


def _jsonl_rows(path: Path, counter: SkipCounter) -> list[dict[str, Any]]:
    """The objects of a JSON-lines file; lines that are not UTF-8, not JSON or not an object are
    skipped into ``counter`` as ``file:line``."""
    # read_jsonl counts every parsed line as good; rows are counted by the caller once they
    # validate, so parse with a counter of its own and carry its skips over.
    parse = SkipCounter(threshold_fraction=1.0, name=str(path))
    rows = read_jsonl(path, parse)
    counter.reasons.update(parse.reasons)
    counter.examples.extend(parse.examples[: max(0, counter.max_examples - len(counter.examples))])
    return rows


def _csv_rows(path: Path, counter: SkipCounter) -> Iterator[dict[str, Any]]:
    """The rows of a csv file, decoded line by line so that one line in another encoding costs
    that line only: it is skipped as ``not_utf8``, and a row the csv module refuses (a cell past
    its field-size limit, more cells than the header) as ``invalid_csv``, both named ``file:line``.
    A header that is not UTF-8 raises: then the whole file is in another encoding."""
    line = [0]  # physical line last handed to the csv reader: where its error is

    def decoded(handle) -> Iterator[str]:
        for number, raw in enumerate(handle, 1):
            line[0] = number
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # -sig: drop a BOM
            except UnicodeDecodeError as error:
                if number == 1:
                    raise BadInputError(path, f"the header line is not UTF-8 ({error.reason} at byte {error.start}); "
                                        "the file is in another encoding (UTF-16, Latin-1, ...)",
                                        "save it as UTF-8 (e.g. `iconv -f LATIN1 -t UTF-8`, or 'CSV UTF-8' "
                                        "in a spreadsheet)") from None
                counter.skip("not_utf8", f"{path}:{number} ({error.reason} at byte {error.start})")
                continue
            yield text

    with open(path, "rb") as handle:
        reader = csv.DictReader(decoded(handle))
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as error:  # the reader drops the offending line and goes on
                counter.skip("invalid_csv", f"{path}:{line[0]} ({error})")
                continue
            if None in row:  # DictReader files surplus cells under the key None
                counter.skip("invalid_csv", f"{path}:{line[0]} (more cells than the header's "
                             f"{len(reader.fieldnames or ())} columns)")
                continue
            yield row


def _iter_rows(path: Path, counter: SkipCounter) -> Iterator[dict[str, Any]]:
    if path.suffix == ".jsonl":
        yield from _jsonl_rows(path, counter)
    elif path.suffix == ".csv":
        for row in _csv_rows(path, counter):
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
    if isinstance(out.get("turn"), str):
        try:  # not str.isdigit: it passes digits int() refuses, such as a superscript two
            out["turn"] = int(out["turn"])
        except ValueError:
            pass  # validate_record names the bad value
    if isinstance(out.get("true_quality"), str):
        try:
            out["true_quality"] = float(out["true_quality"])
        except ValueError:
            pass
    for field in ("true_followed", "true_preserved"):
        if isinstance(out.get(field), str) and out[field].lower() in ("true", "false"):
            out[field] = out[field].lower() == "true"
    return out


def _unverified_image(record: EditRecord, directory: Path) -> str | None:
    """What is wrong with the first of the record's images that fails Pillow's header check, or None."""
    for field in IMAGE_FIELDS:
        name = getattr(record, field)
        if name is None:
            continue
        try:
            with Image.open(inside(directory, name, f"record {record.id!r}, field {field!r}")) as image:
                image.verify()
        except Exception as error:  # Pillow raises OSError, SyntaxError, DecompressionBombError... on bad files
            return f"{field}: {type(error).__name__}: {error}"
    return None


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
        except OutsideFolderError as error:
            counter.skip("path_outside_dataset", f"{metadata}: {error}")
            continue
        except BadInputError as error:  # RecordError: one bad row, not a bad dataset
            counter.skip("invalid_record", f"{metadata}: {error}")
            continue
        problem = _unverified_image(record, directory) if verify_images else None
        if problem:
            counter.skip("corrupt_image", f"{metadata}: record {record.id!r}: {problem}")
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
    (missing fields, a bad instruction, missing image files) are skipped and counted in
    ``counter`` as ``invalid_record``, image names that leave the folder as
    ``path_outside_dataset``, lines that are not UTF-8 as ``not_utf8``; ``verify_images=True``
    also opens every image header at read time (slower, catches corrupt files before training).
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


def _read_table(path: Path, counter: SkipCounter) -> list[dict[str, Any]]:
    """The rows of a converter's source table; unreadable lines are skipped into ``counter``."""
    if path.suffix == ".jsonl":
        return _jsonl_rows(path, counter)
    if path.suffix == ".csv":
        return list(_csv_rows(path, counter))
    if path.suffix == ".parquet":
        try:
            return pq.read_table(path).to_pylist()
        except (pa.ArrowException, OSError) as error:
            raise BadInputError(path, f"not a readable Parquet file ({error})",
                                "re-export the table, or convert it to .jsonl") from None
    raise BadInputError(path, f"unsupported table format {path.suffix!r}", "use .jsonl, .csv or .parquet")


class UnreadableImageError(BadInputError):
    """An image cell whose content does not decode: empty, not an image, truncated, too large."""


def _image_value(value: Any, base: Path, what: str) -> bytes | Path:
    """The content of an image cell: encoded bytes (an HF image dict ``{"bytes", "path"}``) or the
    resolved path of a file inside ``base``, the table's folder (``paths.inside``: a name that
    leaves it raises ``OutsideFolderError`` and is never opened)."""
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            if not isinstance(value["bytes"], (bytes, bytearray, memoryview)):
                raise BadInputError(what, f"the image bytes are a {type(value['bytes']).__name__}, not binary",
                                    "store the encoded image file (PNG, JPEG...) as binary")
            return bytes(value["bytes"])
        value = value.get("path")
    if not isinstance(value, str) or not value:
        raise BadInputError(f"{what} {value!r:.60}", "neither a file path nor image bytes",
                            "give a path relative to the table or an HF image dict")
    path = inside(base, value, what)
    if not path.is_file():
        raise BadInputError(f"{what} {value!r}", f"image file {path} not found", "fix the path in the table")
    return path


def _decoded_format(content: bytes | Path, where: str, max_pixels: int) -> str:
    """Decode ``content`` in full and return its format (``PNG``, ``JPEG``...), or raise
    :class:`UnreadableImageError` naming ``where`` and, for a huge image, the ``max_pixels`` cap.

    The converter copies files as they are, so this is the one moment a broken one can be caught
    before it lands in a dataset that looks whole (a header check alone passes truncated files).
    """
    size = len(content) if isinstance(content, bytes) else content.stat().st_size
    if size == 0:
        raise UnreadableImageError(where, "the image file is empty (0 bytes)", "re-export or re-download it")
    too_large = "downscale it, or pass convert_paired(max_pixels=...) above the cap if the file is trusted"
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its own limit and twice that; the cap below decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            source = io.BytesIO(content) if isinstance(content, bytes) else content
            with Image.open(source, formats=SUPPORTED_FORMATS) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise UnreadableImageError(where, f"the image is {width}x{height} = {width * height:,} pixels, "
                                               f"over the cap max_pixels={max_pixels:,}", too_large)
                image.load()
                return image.format or "PNG"
    except UnreadableImageError:
        raise
    except Image.DecompressionBombError as error:
        raise UnreadableImageError(where, f"a decompression bomb ({error}), far over the cap "
                                   f"max_pixels={max_pixels:,}", too_large) from None
    except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError, struct.error... on bad data
        raise UnreadableImageError(where, f"does not decode as a {'/'.join(SUPPORTED_FORMATS)} image "
                                   f"({type(error).__name__}: {error})",
                                   "re-export or re-download the image, or drop the row") from None


_SUFFIXES = {"JPEG": ".jpg"}  # file name suffix per Pillow format, where it is not the format's name
_SAFE_STEM = re.compile(r"[A-Za-z0-9._-]+")


def _file_stem(record_id: str, index: int) -> str:
    """A file name for a record's images: its id where that is safe as a name, else a cleaned id
    made unique by the row index (an id such as ``a/b`` or ``x://y`` must not pick the folder)."""
    if _SAFE_STEM.fullmatch(record_id) and record_id not in (".", ".."):
        return record_id
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '_', record_id)[:80]}-row{index}"


def _pick(row: dict[str, Any], names: tuple[str, ...]) -> tuple[str, Any]:
    """(column, value) of the first of ``names`` that is filled in ``row``; (first name, None) if none is."""
    for column in names:
        if row.get(column) not in (None, ""):
            return column, row[column]
    return names[0], None


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
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> EditDataset:
    """Convert a public paired dataset (InstructPix2Pix or MagicBrush layout) to this format.

    ``src`` is a ``.jsonl`` / ``.csv`` / ``.parquet`` table, or a folder holding one (a
    ``metadata.*`` file or the only table in it); image cells are paths relative to the table's
    folder or HF image dicts with bytes. Splits come from :func:`schema.assign_split` on the
    sequence id (MagicBrush: all turns of an image stay together) or the record id, with
    ``split_seed``.

    Nothing unchecked reaches the output. Skipped and counted in ``counter`` (default:
    ``SkipCounter``'s limits), by reason: ``path_outside_dataset`` (an image name that leaves the
    table's folder: absolute, ``..``, a URL, a symlink out; never opened), ``unreadable_image``
    (every image is decoded in full first: empty, not an image, truncated, or over ``max_pixels``),
    ``not_utf8`` / ``invalid_json`` / ``invalid_csv`` (a table line, named ``file:line``),
    ``duplicate_id`` (the same MagicBrush image and turn twice) and ``bad_row`` (anything else,
    e.g. a missing file or a bad instruction).
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
    counter = counter if counter is not None else SkipCounter(name=f"convert {table_path}")
    rows = _read_table(table_path, counter)
    columns = {k for row in rows for k in row}
    layout = detect_layout(columns) if layout == "auto" else layout
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is unknown; use 'auto' or one of {', '.join(LAYOUTS)}.")
    spec = LAYOUTS[layout]
    prefix = id_prefix or layout
    records: list[EditRecord] = []
    images: dict[str, Any] = {}
    first_row: dict[str, int] = {}  # record id -> the row that made it
    base = table_path.parent
    for index, row in enumerate(rows):
        where = f"{table_path} row {index}"
        picked = {field: _pick(row, names) for field, names in spec.items()}
        values = {field: value for field, (_, value) in picked.items()}
        turn_index = values.pop("turn", None)
        sequence = values.pop("sequence_id", None)
        try:
            turn = int(turn_index) - 1 if turn_index is not None else 0  # MagicBrush counts from 1
        except (TypeError, ValueError, OverflowError) as error:  # a list, "two", NaN, infinity
            counter.skip("bad_row", f"{where}: turn {turn_index!r} is not an integer ({error})")
            continue
        record_id = f"{prefix}-{sequence}-t{turn}" if sequence is not None else f"{prefix}-{index:07d}"
        if record_id in first_row:  # write_dataset would refuse the whole dataset for it
            counter.skip("duplicate_id", f"{where}: record id {record_id!r} was already made by row "
                         f"{first_row[record_id]}; keeping the first")
            continue
        # counter.skip stays out of this try: the TooManyBadSamples it may raise is a BadInputError
        try:
            contents: dict[str, bytes | Path] = {}
            for field in IMAGE_FIELDS:
                column, cell = picked[field]
                content = _image_value(cell, base, f"{where}, column {column!r}")
                kind = _decoded_format(content, f"{where}, column {column!r}" + (
                    f" ({content})" if isinstance(content, Path) else " (image bytes)"), max_pixels)
                name = f"images/{_file_stem(record_id, index)}_{field}{_SUFFIXES.get(kind, '.' + kind.lower())}"
                contents[name] = content
                values[field] = name
            record = validate_record({
                **{k: v for k, v in values.items() if v is not None},
                "id": record_id, "turn": turn,
                "sequence_id": None if sequence is None else f"{prefix}-{sequence}",
                "split": assign_split(f"{prefix}-{sequence}" if sequence is not None else record_id,
                                      split_seed, val_fraction, test_fraction),
            })
        except OutsideFolderError as error:
            counter.skip("path_outside_dataset", str(error))
            continue
        except UnreadableImageError as error:
            counter.skip("unreadable_image", str(error))
            continue
        except (BadInputError, OSError, ValueError) as error:  # RecordError is a BadInputError
            counter.skip("bad_row", f"{where}: {error}")
            continue
        first_row[record_id] = index
        images.update(contents)
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
