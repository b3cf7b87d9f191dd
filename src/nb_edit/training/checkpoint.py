"""Crash-safe training checkpoints: a process killed at any instant leaves either the old
checkpoint or the new one, never a half-written one that a resume would trust.

Layout of ``<ckpt_dir>/step_00000012/`` (the step counts completed optimisation steps):

    weights_<module>.safetensors   trainable parameters (all of a small model, only the LoRA
                                   of a frozen base) and buffers
    ema_<module>.safetensors       EMA of the trainable parameters, when EMA is on
    state.pt                       optimizers (8-bit AdamW states included), LR schedulers,
                                   RNG states, data position, history, counters
    config.json                    the run's configuration
    manifest.json                  written last: the step; every other file with its size
                                   ("files") and its sha256 ("sha256"); the stage configuration
                                   ("stage_config") and its hash ("stage_config_sha256")

Everything is first written into ``.tmp-step_...`` in the same folder, each file fsync'd, and
the folder is committed by one ``os.replace`` (atomic on POSIX file systems). ``state.pt`` holds
only tensors and plain Python values, so it loads with ``torch.load(weights_only=True)``. A write
that fails (a full disk) removes the temporary folder and raises :class:`BadInputError` naming
the folder and the intact previous checkpoint.

Resuming (:func:`load_latest_checkpoint`) checks two things before it loads a weight:

* Integrity: every file against its sha256. A corrupt checkpoint (a bit flip that kept the size)
  is reported with a :class:`~nb_edit.core.cache.CorruptFileWarning` naming the file and moved
  aside to ``corrupt-step_...``; the newest intact one is loaded instead. If none is intact,
  :class:`BadInputError` names the folder. Checkpoints written before checksums existed load
  as before (a failed read still counts as corrupt).
* Identity: the stage configuration (what the stage was asked to train: variant, teacher,
  loss weights, sizes...) against the current one. A changed one would continue into a mix of
  two runs, so it is refused with the differing fields (old -> new) unless
  ``allow_config_change=True``. The fields of :data:`RESUME_FREE_FIELDS` may differ: stage
  lengths (extending a run; the loop checks its own schedule against the resumed step),
  checkpoint, logging and evaluation cadence, and where it runs (device, threads).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from nb_edit.core.cache import CorruptFileWarning, config_key, file_sha256, is_storage_error
from nb_edit.core.validation import BadInputError

STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp-"
MANIFEST = "manifest.json"
CORRUPT_PREFIX = "corrupt-"

# Stage-config fields that may change between a run and its resume (see the module docstring).
# Stage lengths: "steps", and the judge's and the pretraining's per-stage counts; the loop
# compares its own steps, schedule and decay with the resumed step. Cadence: checkpoints, the
# judge-vs-oracle curve, logs, evaluation, the oracle's monitoring of rollouts. Placement:
# device and CPU threads. Everything else (variant, teacher, judge, loss weights, lr, sizes,
# seed, world...) shapes what a step computes and blocks a resume.
RESUME_FREE_FIELDS = frozenset({
    "steps", "editor_steps", "perception_steps", "align_steps", "qa_steps", "qa_decay_steps", "feedback_steps",
    "hard_steps",
    "checkpoint_every", "keep_last", "curve_every", "n_curve", "log_every", "eval_every", "track_oracle",
    "device", "num_threads",
})


class CorruptCheckpointError(BadInputError):
    """A checkpoint file failed its checksum or could not be read; ``input_name`` is the file."""


def _fsync_path(path: Path) -> None:
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:  # some platforms cannot open folders; the data files were fsync'd anyway
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file in the same folder, fsync and os.replace."""
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def trainable_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters that train plus buffers: what a checkpoint must keep of ``module``.

    Frozen parameters (a quantised base under LoRA, a teacher) are rebuilt from their source,
    not copied into every checkpoint. Tensors are copied so tied weights can be saved.
    """
    state = {name: p for name, p in module.named_parameters() if p.requires_grad}
    state.update(dict(module.named_buffers()))
    return {name: t.detach().to("cpu", copy=True).contiguous() for name, t in state.items()}


def capture_rng() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states as tensors and plain values."""
    version, python_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    rng = {"python": [version, torch.tensor(python_state, dtype=torch.int64), gauss],
           "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
           "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = [state.cpu() for state in torch.cuda.get_rng_state_all()]
    return rng


def restore_rng(rng: dict[str, Any]) -> None:
    version, python_state, gauss = rng["python"]
    random.setstate((version, tuple(python_state.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _step_of(path: Path) -> int:
    return int(path.name[len(STEP_PREFIX):])


def _plain(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` as JSON gives it back (tuples become lists), so saved and current compare equal."""
    return json.loads(json.dumps(dict(config), default=str))


def _identity(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in _plain(config).items() if k not in RESUME_FREE_FIELDS}


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_hash(stage_config: Mapping[str, Any]) -> str:
    """The hash of a stage configuration without :data:`RESUME_FREE_FIELDS` (key order ignored)."""
    return config_key(_identity(stage_config))


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``"field: old -> new"`` for every field that differs, nested ones as ``world.max_objects``;
    :data:`RESUME_FREE_FIELDS` are left out."""
    old, new = _flatten(_identity(saved)), _flatten(_identity(current))
    missing = "<absent>"
    return [f"{key}: {old.get(key, missing)!r} -> {new.get(key, missing)!r}".replace(f"'{missing}'", missing)
            for key in sorted(set(old) | set(new)) if old.get(key, missing) != new.get(key, missing)]


def _read_manifest(path: Path) -> dict | None:
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else None


def _is_complete(path: Path) -> bool:
    manifest = _read_manifest(path)
    try:
        return manifest is not None and all((path / name).is_file() and (path / name).stat().st_size == size
                                            for name, size in manifest["files"].items())
    except (OSError, TypeError):
        return False


def verify_checkpoint(path: str | Path) -> list[str]:
    """What is wrong with checkpoint ``path``: one line per missing, cut or corrupt file, each
    naming the file; empty when it is intact. Without checksums (older checkpoints) only the
    manifest and the sizes are checked."""
    path = Path(path)
    manifest = _read_manifest(path)
    if manifest is None:
        return [f"{path / MANIFEST}: missing or not a valid manifest"]
    problems = []
    for name, size in manifest["files"].items():
        file = path / name
        try:
            if file.stat().st_size != size:
                problems.append(f"{file}: {file.stat().st_size} bytes, the manifest says {size}")
            elif name in manifest.get("sha256", {}) and file_sha256(file) != manifest["sha256"][name]:
                problems.append(f"{file}: content does not match its sha256 in {MANIFEST}")
        except OSError as error:
            problems.append(f"{file}: unreadable ({error.strerror or error})")
    return problems


def _step_folders(ckpt_dir: Path) -> list[Path]:
    return [p for p in ckpt_dir.iterdir()
            if p.is_dir() and p.name.startswith(STEP_PREFIX) and p.name[len(STEP_PREFIX):].isdigit()]


def list_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``ckpt_dir``, oldest first; temp and incomplete folders are ignored."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    return sorted((p for p in _step_folders(ckpt_dir) if _is_complete(p)), key=_step_of)


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or ``None``. Sizes only (no checksum): cheap
    enough to ask often; :func:`load_latest_checkpoint` verifies the content."""
    complete = list_checkpoints(ckpt_dir)
    return complete[-1] if complete else None


def save_checkpoint(ckpt_dir: str | Path, step: int, *, modules: dict[str, torch.nn.Module],
                    state: dict[str, Any], ema: dict[str, dict[str, torch.Tensor]] | None = None,
                    config: dict[str, Any] | None = None, keep_last: int | None = None,
                    stage_config: Mapping[str, Any] | None = None) -> Path:
    """Write checkpoint ``step`` atomically and keep only the newest ``keep_last`` ones.

    ``state`` holds what ``torch.save`` writes to ``state.pt`` (optimizer and scheduler state
    dicts, data position, history...); the RNG states are added here. ``stage_config`` (the
    stage's configuration) goes into the manifest with its hash, for the resume check. A failed
    write (a full disk) raises :class:`BadInputError`; the previous checkpoints are untouched.
    """
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / f"{STEP_PREFIX}{step:08d}"
    tmp = ckpt_dir / f"{TMP_PREFIX}{final.name}.{os.getpid()}"
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_dir.glob(f"{TMP_PREFIX}{STEP_PREFIX}*"):  # left by a killed writer
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
        for name, module in modules.items():
            save_file(trainable_state_dict(module), tmp / f"weights_{name}.safetensors")
        for name, weights in (ema or {}).items():
            save_file({k: v.detach().to("cpu", copy=True).contiguous() for k, v in weights.items()},
                      tmp / f"ema_{name}.safetensors")
        torch.save({**state, "step": int(step), "rng": capture_rng()}, tmp / "state.pt")
        (tmp / "config.json").write_text(json.dumps(config or {}, indent=2, default=str), encoding="utf-8")
        files, sums = {}, {}
        for file in sorted(tmp.iterdir()):
            _fsync_path(file)
            files[file.name] = file.stat().st_size
            sums[file.name] = file_sha256(file)
        manifest = {"step": int(step), "files": files, "sha256": sums}
        if stage_config is not None:
            manifest.update(stage_config=_plain(stage_config), stage_config_sha256=config_hash(stage_config))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        _fsync_path(tmp / MANIFEST)
        _fsync_path(tmp)
        _commit(tmp, final)
    except Exception as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if not is_storage_error(error):
            raise
        previous = latest_checkpoint(ckpt_dir)
        kept = (f"the previous checkpoint {previous.name} is intact" if previous is not None
                else "no earlier checkpoint is in it")
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        raise BadInputError(
            ckpt_dir, f"could not write checkpoint step {step} ({reason}); {kept}",
            "free disk space, or point the checkpoint folder elsewhere (ckpt_dir=..., or NB_EDIT_CACHE for "
            "the artifact cache), then run again: it resumes from the newest intact checkpoint") from error
    _fsync_path(ckpt_dir)
    if keep_last is not None and keep_last > 0:
        for old in list_checkpoints(ckpt_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _commit(tmp: Path, final: Path) -> None:
    """``os.replace(tmp, final)``; a checkpoint already at ``final`` (a re-run over the same step,
    or the corrupt one a resume fell back from) is moved aside first and put back on failure."""
    old = None
    if final.exists():
        old = final.with_name(f"{TMP_PREFIX}old-{final.name}.{os.getpid()}")
        os.replace(final, old)
    try:
        os.replace(tmp, final)  # the commit
    except OSError:
        if old is not None:
            os.replace(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _corrupt(file: Path, error: BaseException | str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        file, f"unreadable or corrupt ({error})",
        "resume from the previous checkpoint (the training loop falls back to it by itself), or delete this "
        "checkpoint folder")


def load_checkpoint(path: str | Path, modules: dict[str, torch.nn.Module],
                    restore_rng_states: bool = True, verify: bool = True) -> dict[str, Any]:
    """Load weights into ``modules`` and return the rest: ``state.pt``'s contents, with the EMA
    weights under ``"ema"`` and the config under ``"config"``. Restores the RNG states.

    Every file is checked against its sha256 first (``verify``) and read before any module
    changes, so a corrupt checkpoint raises :class:`CorruptCheckpointError` naming the file and
    leaves ``modules`` as they were. Optimizers and schedulers are restored by the caller from
    ``state`` (it owns them).
    """
    path = Path(path)
    if not _is_complete(path):
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no valid {MANIFEST}); "
                                "pass a folder returned by latest_checkpoint()")
    if verify:
        problems = verify_checkpoint(path)
        if problems:
            file, _, problem = problems[0].partition(": ")
            raise CorruptCheckpointError(
                file, problem + (f" (and {len(problems) - 1} more file(s))" if len(problems) > 1 else ""),
                "resume from the previous checkpoint (the training loop falls back to it by itself), or delete "
                "this checkpoint folder")
    loaded = {}
    for name, module in modules.items():
        file = path / f"weights_{name}.safetensors"
        if not file.is_file():
            raise KeyError(f"{path}: no weights for module {name!r}; the checkpoint holds "
                           f"{sorted(p.name for p in path.glob('weights_*'))}: pass the same module names")
        try:
            weights = load_file(file)
        except Exception as error:  # whatever a damaged file makes the reader raise: name the file
            raise _corrupt(file, error) from error
        expected = {n for n, p in module.named_parameters() if p.requires_grad}
        expected |= {n for n, _ in module.named_buffers()}
        if set(weights) != set(expected):
            raise KeyError(f"{file}: its tensors do not match module {name!r} (missing "
                           f"{sorted(set(expected) - set(weights))[:5]}, unexpected "
                           f"{sorted(set(weights) - set(expected))[:5]}); build the module as the run did")
        loaded[name] = weights
    try:
        file = path / "state.pt"
        state = torch.load(file, map_location="cpu", weights_only=True)
        ema = {}
        for file in sorted(path.glob("ema_*.safetensors")):
            ema[file.name[len("ema_"):-len(".safetensors")]] = load_file(file)
        file = path / "config.json"
        config = json.loads(file.read_text(encoding="utf-8"))
    except Exception as error:  # zip, unpickler, safetensors and JSON errors alike: name the file
        raise _corrupt(file, error) from error
    if not isinstance(state, dict) or "rng" not in state:
        raise _corrupt(path / "state.pt", "no training state in it")
    for name, module in modules.items():
        module.load_state_dict(loaded[name], strict=False)
    state["ema"], state["config"] = ema, config
    if restore_rng_states:
        restore_rng(state["rng"])
    return state


def check_stage_config(path: str | Path, stage_config: Mapping[str, Any] | None,
                       allow_config_change: bool = False) -> None:
    """Refuse to resume checkpoint ``path`` under another stage configuration.

    Compares the manifest's hash of the configuration the run was made with against
    ``stage_config`` (the fields of :data:`RESUME_FREE_FIELDS` left out). A difference raises
    :class:`BadInputError` naming each changed field (old -> new) and the fixes; with
    ``allow_config_change`` it only warns. Nothing is checked when either side has no
    configuration (a caller that passes none).
    """
    path = Path(path)
    if stage_config is None:
        return
    manifest = _read_manifest(path) or {}
    if "stage_config" in manifest:
        saved, saved_hash = manifest["stage_config"], manifest.get("stage_config_sha256")
    else:  # written before manifests held it: the training loop kept it in config.json under "run"
        try:
            saved = json.loads((path / "config.json").read_text(encoding="utf-8")).get("run")
        except (OSError, ValueError, AttributeError):
            saved = None
        saved_hash = None
    if not isinstance(saved, dict) or saved_hash == config_hash(stage_config):
        return
    changes = config_changes(saved, stage_config)
    if not changes:  # the hash moved only because the list of free fields did
        return
    listed = "; ".join(changes)
    if allow_config_change:
        warnings.warn(f"checkpoint {path}: resuming under a changed stage configuration ({listed}) because "
                      "allow_config_change=True; the result mixes both settings", UserWarning, stacklevel=3)
        return
    raise BadInputError(
        f"checkpoint {path}", f"it was made with another stage configuration ({listed})",
        "resume with the configuration it was made with; or train the new one into a new checkpoint folder "
        "(another ckpt_dir); or pass allow_config_change=True to continue this run under the new settings "
        "on purpose")


def _set_aside(path: Path) -> None:
    aside = path.with_name(f"{CORRUPT_PREFIX}{path.name}")
    if aside.exists():
        aside = path.with_name(f"{CORRUPT_PREFIX}{path.name}.{int(time.time())}")
    try:
        os.replace(path, aside)
    except OSError:  # another process of the run moved it first
        pass


def load_latest_checkpoint(ckpt_dir: str | Path, modules: dict[str, torch.nn.Module], *,
                           stage_config: Mapping[str, Any] | None = None, allow_config_change: bool = False,
                           restore_rng_states: bool = True,
                           set_aside: bool = True) -> tuple[Path, dict[str, Any]] | None:
    """Load the newest intact checkpoint of ``ckpt_dir`` into ``modules``: ``(folder, state)``
    as :func:`load_checkpoint` returns it, or None when the folder holds no checkpoint.

    A corrupt checkpoint is skipped with a :class:`~nb_edit.core.cache.CorruptFileWarning`
    naming the file; once an older intact one loads, the skipped ones are renamed
    ``corrupt-step_...`` (``set_aside``; only one process of a distributed run should) so they
    neither shadow the new checkpoints nor get lost. When every checkpoint is corrupt,
    :class:`BadInputError` names the folder and nothing is moved. The stage configuration is
    checked (:func:`check_stage_config`) before any weight is loaded.
    """
    ckpt_dir = Path(ckpt_dir)
    complete = list_checkpoints(ckpt_dir)
    incomplete = sorted(set(_step_folders(ckpt_dir)) - set(complete), key=_step_of) if ckpt_dir.is_dir() else []
    skipped: list[tuple[Path, list[str]]] = []
    for path in reversed(complete):
        problems = verify_checkpoint(path)
        if not problems:
            check_stage_config(path, stage_config, allow_config_change)
            try:
                state = load_checkpoint(path, modules, restore_rng_states, verify=False)
            except CorruptCheckpointError as error:  # no checksums (an older checkpoint), but unreadable
                problems = [str(error)]
            else:
                for bad in incomplete:
                    if _step_of(bad) > _step_of(path):
                        warnings.warn(f"{bad}: not a complete checkpoint (no valid {MANIFEST}); ignored, resumed "
                                      f"from {path.name}", CorruptFileWarning, stacklevel=2)
                if skipped:
                    warnings.warn(f"resumed from {path} (step {_step_of(path)}), the newest intact checkpoint; "
                                  f"corrupt newer ones {'set aside as ' + CORRUPT_PREFIX + '*' if set_aside else 'skipped'}"
                                  f": {', '.join(p.name for p, _ in skipped)}", CorruptFileWarning, stacklevel=2)
                    for bad, _ in skipped if set_aside else ():
                        _set_aside(bad)
                return path, state
        warnings.warn(f"checkpoint {path} is corrupt: {'; '.join(problems)}; trying the one before it",
                      CorruptFileWarning, stacklevel=2)
        skipped.append((path, problems))
    if skipped:
        listed = "; ".join(f"{p.name}: {problems[0]}" for p, problems in skipped)
        raise BadInputError(
            ckpt_dir, f"every checkpoint in it is corrupt ({listed})",
            "delete the corrupt step_* folders (or the whole folder) to start the run over, or restore them from "
            "a backup; or pass another ckpt_dir to train elsewhere")
    for bad in incomplete:
        warnings.warn(f"{bad}: not a complete checkpoint (no valid {MANIFEST}); ignored, the run starts over",
                      CorruptFileWarning, stacklevel=2)
    return None
