"""Run folders, metrics and the report.

Every run has its own folder ``papermill_runs/<run_id>/`` holding the executed notebooks,
``config.json``, ``metrics.json``, ``figures/`` and ``report.md``. The metrics contract:
``metrics.json`` is ONE flat JSON object whose keys are dotted lowercase names
(``npedit.full.oracle_success``) and whose values are finite numbers; a figure measured over
several seeds is stored as its mean under the key, with ``<key>.sd`` and ``<key>.n`` beside it.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from nb_edit.core import paths

KEY_PATTERN = re.compile(r"^[a-z0-9_]+(\.[a-z0-9_]+)+$")
RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
INTERACTIVE_RUN = "interactive"


@dataclass(frozen=True)
class Run:
    run_id: str
    dir: Path

    @property
    def metrics_path(self) -> Path:
        return self.dir / "metrics.json"

    @property
    def figures_dir(self) -> Path:
        path = self.dir / "figures"
        path.mkdir(parents=True, exist_ok=True)
        return path


def new_run_id() -> str:
    """A run id from the date and time, as ``make run`` uses without RUN_ID."""
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def open_run(run_id: str = "") -> Run:
    """The folder of run ``run_id``, created if needed; ``""`` is the interactive run.

    A notebook opened by hand (or by nbval) has ``run_id = ""`` and writes to
    ``papermill_runs/interactive/``; ``make run`` passes a real id to every notebook.
    """
    run_id = run_id or INTERACTIVE_RUN
    if not RUN_ID_PATTERN.match(run_id):
        raise ValueError(
            f"run_id={run_id!r} is not a usable folder name; use letters, digits, '.', '_' "
            "and '-' (for example RUN_ID=tiny_s0)."
        )
    path = paths.runs_dir() / run_id
    path.mkdir(parents=True, exist_ok=True)
    return Run(run_id, path)


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_metrics(run: Run) -> dict[str, float]:
    if not run.metrics_path.exists():
        return {}
    return json.loads(run.metrics_path.read_text(encoding="utf-8"))


def _check_metric(key: str, value: Any) -> float:
    if not KEY_PATTERN.match(key):
        raise ValueError(
            f"metric key {key!r} does not follow the contract: dotted lowercase names such as "
            "'npedit.full.oracle_success'."
        )
    if isinstance(value, (bool, np.bool_)):
        value = int(value)
    if not isinstance(value, (int, float, np.integer, np.floating)) and not (
        hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1
    ):
        raise TypeError(f"metric {key!r} must be a number, got {type(value).__name__}.")
    number = float(value.item() if hasattr(value, "item") else value)
    if not math.isfinite(number):
        raise ValueError(f"metric {key!r} is {number}; only finite numbers are recorded.")
    return number


def record_metrics(run: Run, metrics: Mapping[str, Any]) -> dict[str, float]:
    """Merge ``metrics`` into the run's ``metrics.json`` (atomically, under a lock: notebooks of
    one run may record at the same time) and return them checked."""
    import fcntl

    checked = {key: _check_metric(key, value) for key, value in metrics.items()}
    with open(run.metrics_path.parent / ".metrics.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        merged = read_metrics(run)
        merged.update(checked)
        _atomic_write_text(run.metrics_path, json.dumps(merged, indent=1, sort_keys=True))
    return checked


def seed_summary(key: str, values: Iterable[float]) -> dict[str, float]:
    """A figure over several seeds: mean under ``key``, sample sd and count beside it."""
    arr = np.asarray(list(values), dtype=float)
    if arr.size == 0:
        raise ValueError(f"seed_summary({key!r}) got no values.")
    sd = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return {key: float(arr.mean()), f"{key}.sd": sd, f"{key}.n": float(arr.size)}


def save_figure(run: Run, fig: Any, name: str, dpi: int = 110) -> Path:
    """Save a matplotlib figure as ``figures/<name>.png`` of the run and return its path."""
    path = run.figures_dir / f"{name}.png"
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def write_config(run: Run, config: Mapping[str, Any]) -> Path:
    path = run.dir / "config.json"
    _atomic_write_text(path, json.dumps(dict(config), indent=2, sort_keys=True, default=str))
    return path
