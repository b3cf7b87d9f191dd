"""A real-photo mini benchmark in the manner of Real-Edit (Multi-Reward as Condition, sec. 5).

Real-Edit pairs real photographs with one instruction per edit category: local, remove, add,
texture, background, global and style. Here the photographs are the ones that ship inside
scikit-image (``skimage.data``, no download), and ``data/real_edit/instructions.jsonl`` holds
one instruction per photo and category, with the photo's caption and the caption after the
edit (what NP-Edit's DMD term conditions on). There are no target images: the benchmark is
scored by a judge (yes/no and 0-5 per perspective), as Real-Edit is.

The photos differ in size, aspect ratio, colour mode and file format on purpose, so the
benchmark exercises the whole real-image path end to end: :func:`write_real_edit` stores them
at their native size and mode (one grayscale PNG, one JPEG, RGB PNGs) in the project's dataset
format, and :func:`load_real_edit` reads them back through ``read_dataset`` and
``images.load_image`` (mode conversion, aspect-preserving crop or pad to the resolution).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import skimage.data

from nb_edit.core.images import ImageConversionWarning
from nb_edit.core.paths import cache_dir, data_dir
from nb_edit.core.validation import BadInputError, SkipCounter, check_edit_type, read_jsonl
from nb_edit.data.schema import EditRecord, RecordError, validate_record
from nb_edit.data.store import INFO_FILE, read_dataset, write_dataset

REAL_EDIT_CATEGORIES = ("local", "remove", "add", "texture", "background", "global", "style")


def _motorcycle() -> np.ndarray:
    return skimage.data.stereo_motorcycle()[0]  # the left image of the stereo pair


# name -> (loader, file name in the benchmark folder). The file name's extension picks the
# format, so the folder holds a grayscale PNG, a JPEG and RGB PNGs, square and landscape.
PHOTOS: dict[str, tuple[Callable[[], np.ndarray], str]] = {
    "astronaut": (skimage.data.astronaut, "astronaut.png"),  # 512 x 512 RGB
    "coffee": (skimage.data.coffee, "coffee.png"),  # 400 x 600 RGB
    "chelsea": (skimage.data.chelsea, "chelsea.jpg"),  # 300 x 451 RGB, stored as JPEG
    "rocket": (skimage.data.rocket, "rocket.png"),  # 427 x 640 RGB
    "motorcycle": (_motorcycle, "motorcycle.png"),  # 500 x 741 RGB
    "camera": (skimage.data.camera, "camera.png"),  # 512 x 512 grayscale
}


def instructions_path() -> Path:
    return data_dir() / "real_edit" / "instructions.jsonl"


def load_photo(name: str) -> np.ndarray:
    """The photo as scikit-image ships it (uint8; (H, W) for grayscale, (H, W, 3) for colour)."""
    if name not in PHOTOS:
        raise BadInputError(f"photo {name!r}", "not in the benchmark", f"use one of {', '.join(PHOTOS)}")
    return PHOTOS[name][0]()


INSTRUCTION_KEYS = ("id", "photo", "edit_type", "instruction", "caption", "caption_edited")


def read_instructions(path: str | PathLike | None = None, counter: SkipCounter | None = None) -> list[dict[str, Any]]:
    """The benchmark's instructions, checked: known photo, Real-Edit category, a usable instruction
    and captions (``schema.validate_record``), unique ids.

    A bad line is skipped and counted in ``counter`` (default: ``SkipCounter``'s limits, named
    after the file), never read half-way: ``not_utf8`` / ``invalid_json`` / ``missing_keys``
    (named ``file:line``), ``unknown_photo``, ``unknown_edit_type``, ``invalid_record`` and
    ``duplicate_id`` (named by id). The counter raises once bad lines pass its threshold, since
    a benchmark with many lines gone measures something else.
    """
    path = Path(path) if path is not None else instructions_path()
    if not path.is_file():
        raise BadInputError(path, "benchmark instructions not found",
                            "restore data/real_edit/instructions.jsonl from the repository")
    counter = counter if counter is not None else SkipCounter(name=str(path))
    items, seen = [], set()
    for item in read_jsonl(path, counter, required_keys=INSTRUCTION_KEYS):
        where = f"{path}, id {item['id']!r}"
        photo = item["photo"]
        if not isinstance(photo, str) or photo not in PHOTOS:
            counter.retract("unknown_photo", f"{where}: photo {photo!r} is not one of {', '.join(PHOTOS)}")
            continue
        try:
            check_edit_type(item["edit_type"], REAL_EDIT_CATEGORIES)
            record = validate_record({"id": item["id"], "source": f"images/{PHOTOS[photo][1]}",
                                      "instruction": item["instruction"], "caption": item["caption"],
                                      "caption_edited": item["caption_edited"], "edit_type": item["edit_type"],
                                      "split": "test"})
        except RecordError as error:
            counter.retract("invalid_record", f"{where}: {error}")
            continue
        except BadInputError as error:
            counter.retract("unknown_edit_type", f"{where}: {error}")
            continue
        if record.id in seen:
            counter.retract("duplicate_id", f"{where}: the id is used by an earlier line")
            continue
        seen.add(record.id)
        items.append({**item, "id": record.id, "instruction": record.instruction, "caption": record.caption,
                      "caption_edited": record.caption_edited})
    counter.finish()
    return items


def write_real_edit(folder: str | PathLike, overwrite: bool = False) -> Path:
    """Write the benchmark as a dataset (split ``test``, unpaired), photos at native size and mode."""
    items = read_instructions()
    records = [
        EditRecord(id=item["id"], source=f"images/{PHOTOS[item['photo']][1]}", instruction=item["instruction"],
                   caption=item["caption"], caption_edited=item["caption_edited"], edit_type=item["edit_type"],
                   split="test")
        for item in items
    ]
    images = {f"images/{file}": load() for load, file in PHOTOS.values()}
    return write_dataset(records, images, folder, overwrite=overwrite,
                         description="Real-Edit-style benchmark on scikit-image photographs")


def load_real_edit(
    resolution: int | tuple[int, int] = 32,
    fit: str = "crop",
    categories: Sequence[str] | None = None,
    folder: str | PathLike | None = None,
) -> list[dict[str, Any]]:
    """Benchmark samples with ``source`` as uint8 (resolution, resolution, 3), ready for an editor.

    ``fit`` "crop" keeps the centre of wide photos, "pad" keeps all of it with white borders.
    The dataset is written once to ``folder`` (default: the artifact cache) and read back with
    the same loader a user's folder goes through. ``categories`` selects Real-Edit categories.
    """
    for category in categories or ():
        check_edit_type(category, REAL_EDIT_CATEGORIES)
    folder = Path(folder) if folder is not None else cache_dir() / "real_edit"
    if not (folder / INFO_FILE).is_file():
        write_real_edit(folder, overwrite=folder.exists())
    dataset = read_dataset(folder, split="test")
    if categories:
        dataset = dataset.filter(lambda record: record.edit_type in categories)
    with warnings.catch_warnings():
        # the grayscale photo is there to take the conversion path; its warning is expected
        warnings.simplefilter("ignore", ImageConversionWarning)
        samples = list(dataset.iter_samples(size=resolution, fit=fit))
    if len(samples) != len(dataset):
        raise BadInputError(folder, f"{len(dataset) - len(samples)} benchmark images could not be read "
                            f"({dataset.metrics('real_edit')})", "delete the folder so that it is rewritten")
    return samples
