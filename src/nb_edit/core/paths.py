"""Where things live. Every path in the project goes through these helpers.

papermill runs in the folder it is launched from and nbval in the notebook's folder, so no
path may depend on the working directory: everything is anchored at the repository root,
found from this file (an editable install keeps ``src/nb_edit`` inside the checkout). Set
``NB_EDIT_ROOT`` to point a non-editable install at a checkout or a data folder.

File names read from data (a metadata row, a converter's table) go through :func:`inside`, the
one check that such a name stays in its dataset's folder: a table that names ``/etc/passwd``,
``../../secrets.png``, a URL or a symlink pointing out of the folder must never get that file
read or copied into a dataset.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

from nb_edit.core.validation import BadInputError

# "https:", "file:", "data:" and Windows drives ("C:"): a name that is not a relative path at all
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def repo_root() -> Path:
    """The repository root (the folder holding ``pyproject.toml``)."""
    env = os.environ.get("NB_EDIT_ROOT")
    if env:
        return Path(env).resolve()
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "pyproject.toml").exists() and (parent / "notebooks").is_dir():
            return parent
    raise RuntimeError(
        f"nb_edit is installed outside a checkout ({here}); set NB_EDIT_ROOT to the "
        "repository folder that holds notebooks/ and data/."
    )


def data_dir() -> Path:
    """Small shipped data: pretrained stand-ins, the benchmark instructions, formats."""
    return repo_root() / "data"


def pretrained_dir() -> Path:
    """The tiny stand-ins for hub models that ``make pretrain`` writes and the repo ships."""
    return data_dir() / "pretrained"


def cache_dir() -> Path:
    """The artifact cache (ignored by git): anything a notebook trains or generates."""
    path = Path(os.environ.get("NB_EDIT_CACHE", data_dir() / "cache"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def runs_dir() -> Path:
    """Run folders: ``papermill_runs/<run_id>/``, or ``$NB_EDIT_RUNS/<run_id>/`` (a scratch disk)."""
    return Path(os.environ.get("NB_EDIT_RUNS", repo_root() / "papermill_runs"))


def notebooks_dir() -> Path:
    return repo_root() / "notebooks"


class OutsideFolderError(BadInputError):
    """A file name from data that leaves the folder it must stay in (absolute, ``..``, a URL or
    drive, a symlink pointing out); readers skip such a row as ``path_outside_dataset``."""


def relative_name(name: object, what: str = "file name") -> PurePosixPath:
    """``name`` as a relative POSIX path that cannot leave its folder on paper; raises as :func:`inside` does.

    Backslashes count as separators (Windows tools write them), so ``..\\x`` is refused like
    ``../x``. This is the lexical half of :func:`inside`, for callers that have no folder yet
    (validating a record before it is written); it cannot see symlinks.
    """
    if isinstance(name, os.PathLike):
        name = os.fspath(name)
    if not isinstance(name, str) or not name.strip():
        raise BadInputError(f"{what} {name!r:.80}", "not a file name",
                            "give the file's path relative to the dataset folder")
    where = f"{what} {name!r:.200}"
    if "\0" in name:
        raise BadInputError(where, "contains a NUL character", "remove it from the file name")
    if "://" in name or _SCHEME.match(name):
        raise OutsideFolderError(where, "is a URL or a drive path: it leaves the dataset folder",
                                 "download or copy the file into the dataset folder and give its relative path")
    posix = PurePosixPath(name.replace("\\", "/"))
    if posix.is_absolute():
        raise OutsideFolderError(where, "is an absolute path: it leaves the dataset folder",
                                 "copy the file into the dataset folder and give its path relative to it")
    if ".." in posix.parts:
        raise OutsideFolderError(where, "leaves the dataset folder through '..'",
                                 "copy the file into the dataset folder and give its path relative to it")
    return posix


def inside(folder: str | os.PathLike, name: object, what: str = "file name") -> Path:
    """The resolved path of ``name`` under ``folder``; :class:`OutsideFolderError` for a name that
    leaves it, :class:`BadInputError` for one that is no file name at all (empty, a NUL, a loop).

    Refuses absolute names, ``..``, URLs and drive paths (:func:`relative_name`), then resolves
    symlinks on both sides and refuses a name that ends up outside ``folder``: a link inside
    the dataset that points at ``/etc`` is caught here, one to another file of the dataset is
    fine. The file need not exist (the caller says what a missing one means). ``what`` names
    the name's place in the error, e.g. ``"record 'r1', field 'source'"``.
    """
    relative = relative_name(name, what)
    try:
        base = Path(folder).resolve()
        target = (base / relative).resolve()
    except (OSError, RuntimeError) as error:  # a symlink loop: RuntimeError before Python 3.13
        raise BadInputError(f"{what} {name!r:.200}", f"cannot be resolved ({error})",
                            "replace the symlink loop with the file itself") from None
    if not target.is_relative_to(base):
        raise OutsideFolderError(f"{what} {name!r:.200}", "leaves the dataset folder: it resolves "
                                 f"through a symlink to {target}, outside {base}",
                                 "copy the file into the dataset folder instead of linking to it, or drop the row")
    return target
