"""Run folders, metrics and the report.

Every run has its own folder ``papermill_runs/<run_id>/`` holding the executed notebooks,
``config.json``, ``metrics.json``, ``figures/`` and ``report.md``. The metrics contract:
``metrics.json`` is ONE flat JSON object whose keys are dotted lowercase names
(``npedit.full.oracle_success``) and whose values are finite numbers; a figure measured over
several seeds is stored as its mean under the key, with ``<key>.sd`` and ``<key>.n`` beside it.
A training curve is stored point by point as ``<prefix>.curve.step<NNNNN>.<name>``
(:func:`curve_metrics`), so a seed study folds each point over seeds like any figure.
``items.json`` keeps, under the same keys, the per-item scores behind a figure for each seed (the
claims' paired tests read them).

A run id names one set of parameters: :func:`claim_run` refuses to start a run in a folder that
already holds one (its metrics would mix into the new report) unless asked to resume it with the
same parameters or to overwrite it, and :func:`release_unused` removes the folders a run created
when it failed before writing any output.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from nb_edit.core import paths
from nb_edit.core.validation import BadInputError

KEY_PATTERN = re.compile(r"^[a-z0-9_]+(\.[a-z0-9_]+)+$")
CURVE_KEY = re.compile(r"^(?P<prefix>.+)\.curve\.step(?P<step>\d+)\.(?P<name>[a-z0-9_]+)$")
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


def run_path(run_id: str) -> Path:
    """The folder of run ``run_id`` (not created); ``""`` is the interactive run."""
    run_id = run_id or INTERACTIVE_RUN
    if not isinstance(run_id, str) or not RUN_ID_PATTERN.match(run_id):
        raise BadInputError(f"run_id={run_id!r}", "not a usable folder name",
                            "use letters, digits, '.', '_' and '-', starting with a letter or digit "
                            "(for example --run-id tiny_s0, RUN_ID=tiny_s0 with make)")
    return paths.runs_dir() / run_id


def open_run(run_id: str = "") -> Run:
    """The folder of run ``run_id``, created if needed; ``""`` is the interactive run.

    A notebook opened by hand (or by nbval) has ``run_id = ""`` and writes to
    ``papermill_runs/interactive/``; ``make run`` passes a real id to every notebook.
    """
    path = run_path(run_id)
    path.mkdir(parents=True, exist_ok=True)
    return Run(path.name, path)


def existing_run(run_id: str, command: str = "report") -> Run:
    """An existing run (for commands that read one: ``report``, ``publish``), never created:
    a mistyped id would otherwise leave an empty folder behind."""
    path = run_path(run_id)
    if not path.is_dir():
        known = sorted(p.name for p in paths.runs_dir().glob("*") if p.is_dir()) if paths.runs_dir().is_dir() else []
        raise BadInputError(f"{command} --run-id {run_id!r}", f"there is no run folder {path}",
                            "give the id of an existing run" + (f", e.g. one of {', '.join(known[-5:])}" if known
                                                                else "; make one with `make run`"))
    return Run(path.name, path)


# What `python -m nb_edit run` writes before its first notebook, and scratch files of atomic
# writes: a folder holding only these has no output worth keeping after a failed start.
RUNNER_FILES = ("config.json",)


def holds_output(path: Path) -> bool:
    """Whether a run folder holds anything beyond :data:`RUNNER_FILES` and hidden scratch files."""
    if not path.is_dir():
        return False
    return any(not (entry.name in RUNNER_FILES or (entry.name.startswith(".") and entry.is_file()))
               for entry in path.iterdir())


def read_config(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _as_recorded(value: Any) -> Any:
    """``value`` as config.json stores it (tuples as lists, odd objects as text), for comparing."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def recorded_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The settings that define a run, from its config.json: its parameters and seed study."""
    settings = dict(config.get("parameters", {}))
    if config.get("seed_study") is not None:
        settings["seed_study"] = config["seed_study"]
    return settings


def changed_settings(earlier: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """The keys whose values differ between two sets of settings (a key on one side only counts)."""
    earlier, now = _as_recorded(dict(earlier)), _as_recorded(dict(now))
    return sorted(k for k in set(earlier) | set(now) if earlier.get(k, "<unset>") != now.get(k, "<unset>"))


def claim_run(run_id: str, settings: Mapping[str, Any], *, resume: bool = False, overwrite: bool = False,
              related: Iterable[str] = ()) -> tuple[Run, list[Path]]:
    """Open run ``run_id`` for a new execution and return it with the folders this call creates.

    ``settings`` are the run's parameters as :func:`recorded_settings` reads them back from
    config.json; ``related`` are run ids that belong to it (a seed study's ``<run_id>.seed<k>``).
    A folder that already holds anything is refused, since the earlier run's metrics would land
    in the new report, unless ``resume`` (allowed only with the same settings) or ``overwrite``
    (the folders are deleted first; call this after every other check, so that a run refused
    for another reason deletes nothing).
    """
    parent = run_path(run_id)
    folders = [parent] + [run_path(r) for r in related]
    used = [f for f in folders if f.is_dir() and any(f.iterdir())]
    if used and not (resume or overwrite):
        entries = sorted(e.name for e in used[0].iterdir())
        raise BadInputError(
            f"--run-id {parent.name}",
            f"the run folder {used[0]} already holds a run ({', '.join(entries[:4])}"
            f"{', ...' if len(entries) > 4 else ''}); running into it would mix the two runs' metrics",
            "choose a new --run-id (RUN_ID=... with make; leave it out for a date-time one), pass --resume to "
            "run more notebooks into it with the SAME parameters, or --overwrite to delete it and start again")
    if used and resume:
        earlier = read_config(parent)
        if earlier:
            differ = changed_settings(recorded_settings(earlier), settings)
            if differ:
                before, after = _as_recorded(recorded_settings(earlier)), _as_recorded(dict(settings))
                detail = "; ".join(f"{k}: {before.get(k, '<unset>')!r} -> {after.get(k, '<unset>')!r}"
                                   for k in differ)
                raise BadInputError(
                    f"--resume {parent.name}",
                    f"the parameters differ from those the run was started with ({detail})",
                    "resume with the same -f/-p parameters, choose a new --run-id for the new ones, "
                    "or pass --overwrite to replace the run")
    # decided before --overwrite empties anything: a folder that held a run is never one this
    # call created, so a failed start after an overwrite leaves it (empty) rather than guessing
    created = [f for f in folders if not f.exists()]
    if used and overwrite:
        for folder in used:
            shutil.rmtree(folder)
    parent.mkdir(parents=True, exist_ok=True)
    return Run(parent.name, parent), created


def release_unused(created: Iterable[Path]) -> list[Path]:
    """Remove the folders a failed run created, if none of them holds output (see
    :func:`holds_output`); a folder that existed before the run is never passed here. Returns
    the folders removed."""
    created = [Path(f) for f in created if Path(f).is_dir()]
    if any(holds_output(f) for f in created):
        return []
    for folder in created:
        shutil.rmtree(folder)
    return created


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


def curve_metrics(prefix: str, history: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """A training curve as metrics: ``<prefix>.curve.step<NNNNN>.<name>`` for every ``curve_<name>``
    field of every record of ``history`` (``{"step": ..., "curve_oracle_success": ..., ...}``, as the
    trainers log their periodic checks). Recorded per seed, a seed study folds each point over seeds;
    the report shows the curves as a table."""
    return {f"{prefix}.curve.step{int(record['step']):05d}.{field[len('curve_'):]}": float(value)
            for record in history for field, value in record.items() if field.startswith("curve_")}


def items_path(run: Run) -> Path:
    """``items.json``: the per-item scores behind a run's figures, what a paired test needs."""
    return run.dir / "items.json"


def read_items(run: Run) -> dict[str, dict[str, Any]]:
    """``{key: {"item_set": name, "seeds": {"<seed>": [score per item]}}}`` (empty when none)."""
    path = items_path(run)
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def record_items(run: Run, scores: Mapping[str, Any], seed: int, item_set: str) -> None:
    """Keep the per-item scores behind figures of ``metrics.json`` (same keys), for paired tests.

    ``scores`` maps a metric key to one score per item (NaN: not scored) of the item list
    ``item_set`` names (e.g. ``"shapes.test"``: the run's held-out test edits, in their order);
    two keys are paired item by item only when they share the item set and the length. ``seed``
    is the training seed of the run that made them; a seed study gathers every seed's scores in
    its parent run (:func:`merge_items`).
    """
    checked = {}
    for key, values in scores.items():
        if not KEY_PATTERN.match(key):
            raise ValueError(f"item key {key!r} does not follow the metrics contract (dotted lowercase names).")
        array = np.asarray(values, dtype=np.float64).ravel()
        checked[key] = {"item_set": item_set,
                        "seeds": {str(int(seed)): [None if not math.isfinite(v) else float(v) for v in array]}}
    _merge_items(run, checked)


def merge_items(parent: Run, seed_runs: Iterable[Run]) -> dict[str, dict[str, Any]]:
    """Gather the per-item scores of a seed study's runs into the parent run's ``items.json``."""
    for seed_run in seed_runs:
        _merge_items(parent, read_items(seed_run))
    return read_items(parent)


def _merge_items(run: Run, entries: Mapping[str, Mapping[str, Any]]) -> None:
    """Merge ``items.json`` entries into the run's, seed by seed (under a lock: notebooks of one
    run may record at the same time); an entry of another item list replaces the old one."""
    import fcntl

    if not entries:
        return
    with open(run.dir / ".items.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        merged = read_items(run)
        for key, entry in entries.items():
            into = merged.get(key)
            if into is None or into.get("item_set") != entry["item_set"]:
                into = merged[key] = {"item_set": entry["item_set"], "seeds": {}}
            into["seeds"].update(entry["seeds"])
        _atomic_write_text(items_path(run), json.dumps(merged, sort_keys=True))


def item_scores(entry: Mapping[str, Any]) -> dict[int, np.ndarray]:
    """An ``items.json`` entry as ``{seed: float array}`` (None read back as NaN)."""
    return {int(seed): np.array([np.nan if v is None else v for v in values], dtype=np.float64)
            for seed, values in entry["seeds"].items()}


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
