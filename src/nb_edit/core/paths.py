"""Where things live. Every path in the project goes through these helpers.

papermill runs in the folder it is launched from and nbval in the notebook's folder, so no
path may depend on the working directory: everything is anchored at the repository root,
found from this file (an editable install keeps ``src/nb_edit`` inside the checkout). Set
``NB_EDIT_ROOT`` to point a non-editable install at a checkout or a data folder.
"""

from __future__ import annotations

import os
from pathlib import Path


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
    """Run folders: ``papermill_runs/<run_id>/``."""
    return repo_root() / "papermill_runs"


def notebooks_dir() -> Path:
    return repo_root() / "notebooks"
