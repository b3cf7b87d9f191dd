"""The artifact cache: trained weights and generated tensors, keyed by the config that made them.

``ensure(name, config, build)`` returns the artifact saved under
``data/cache/<name>/<key>/`` (``tensors.safetensors`` + ``config.json`` + ``meta.json``), where
``key`` is a hash of ``config``; on a miss it calls ``build()``, saves what it returns, and
returns that. So each notebook runs alone from a fresh kernel and reuses what an earlier
notebook (or an earlier run) trained with the same settings, and a changed setting never
returns a stale artifact. Only safetensors and JSON are read back: nothing is unpickled.

An entry is written into a temporary folder and renamed into place, ``meta.json`` last;
``sha256.json`` (written just before it) holds the sha256 of every other file. A corrupt entry
(a bit flip, a truncated or emptied file: a failed checksum or a failed read) is a miss: a
:class:`CorruptFileWarning` names the file, the entry is moved aside to
``<name>/.corrupt-<key>`` and ``ensure`` rebuilds it. Entries written before checksums existed
still load (only a failed read tells they are corrupt). A write that fails (a full disk) raises
a :class:`BadInputError` naming the folder; ``ensure`` then warns and returns what it built, so
a finished training is not thrown away because it could not be cached.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nb_edit.core import paths
from nb_edit.core.validation import BadInputError

TensorDict = dict[str, torch.Tensor]
BuildResult = TensorDict | tuple[TensorDict, Mapping[str, Any]]

CHECKSUMS = "sha256.json"
CORRUPT_PREFIX = ".corrupt-"


class CorruptFileWarning(UserWarning):
    """A stored file (cache entry, checkpoint) failed its checksum or could not be read; the
    message names it and says what was done instead (rebuilt, or an older copy used)."""


# How the writers report a full disk: OSError from Python; safetensors' SafetensorError "I/O error:
# ... (os error 28)"; torch.save's RuntimeError "PytorchStreamWriter failed writing file ...".
_STORAGE_WORDS = ("I/O error", "os error", "write failed", "failed writing", "No space left")


def is_storage_error(error: BaseException) -> bool:
    """True when ``error`` says the disk refused a write (full, read-only, gone)."""
    return isinstance(error, OSError) or (isinstance(error, (SafetensorError, RuntimeError))
                                          and any(word in str(error) for word in _STORAGE_WORDS))


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in chunks (weights files can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Artifact:
    tensors: TensorDict
    meta: dict[str, Any]
    path: Path
    hit: bool  # True when loaded from the cache, False when just built


def config_key(config: Mapping[str, Any]) -> str:
    """A stable short hash of a JSON-able config (key order does not matter)."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def artifact_dir(name: str, config: Mapping[str, Any], root: Path | None = None) -> Path:
    return (root or paths.cache_dir()) / name / config_key(config)


def standins_fingerprint() -> str:
    """A short hash of the shipped stand-ins (every ``data/pretrained/*/made_by.json``).

    Runs that start from the shipped models mix it into their cache keys, so remaking the
    stand-ins (``make pretrain``) retrains them instead of finding runs made from the old ones.
    """

    digest = hashlib.sha256()
    for made_by in sorted(paths.pretrained_dir().glob("*/made_by.json")):
        digest.update(made_by.parent.name.encode())
        digest.update(made_by.read_bytes())
    return digest.hexdigest()[:16]


def checkpoint_dir(stage: str, config: Mapping[str, Any], root: Path | None = None) -> Path:
    """Where a training run of ``stage`` made with ``config`` keeps its checkpoints: rerunning the
    same configuration from the same shipped stand-ins resumes (or finds finished) the same run;
    another configuration, or remade stand-ins, start afresh.

    Every field is in the key (the step count too), so a folder found here never holds a run of
    another configuration. A folder the user names instead (``--ckpt-dir``, ``ckpt_dir=``) may:
    the training loop compares the configuration hash in its checkpoints' manifests with the
    current one and refuses to resume a changed one (``nb_edit.training.checkpoint``)."""
    return artifact_dir(stage, {**config, "standins": standins_fingerprint()}, root)


def _check_entry(folder: Path) -> str | None:
    """None if the entry's files match ``sha256.json`` (or it has none), else the first problem."""
    listed = folder / CHECKSUMS
    if not listed.exists():
        return None  # an entry written before checksums: only a failed read can tell
    try:
        expected = json.loads(listed.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return f"{listed}: unreadable ({error})"
    for file_name, digest in expected.items():
        file = folder / file_name
        try:
            if file_sha256(file) != digest:
                return f"{file}: content does not match its checksum in {CHECKSUMS}"
        except OSError as error:
            return f"{file}: unreadable ({error})"
    return None


def _set_aside(folder: Path, problem: str) -> None:
    """Move a corrupt entry out of the way (kept for a look; the previous corrupt copy goes)."""
    aside = folder.parent / f"{CORRUPT_PREFIX}{folder.name}"
    try:
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(folder, aside)
        where = f"moved to {aside}"
    except OSError:  # another process moved it first, or the disk refuses: make sure it is gone
        shutil.rmtree(folder, ignore_errors=True)
        where = "removed"
    warnings.warn(f"{problem}; the cache entry was {where} and will be rebuilt", CorruptFileWarning, stacklevel=3)


def load(name: str, config: Mapping[str, Any], root: Path | None = None) -> Artifact | None:
    """The artifact saved for ``config``, or None: when absent, and when corrupt (warned, set aside)."""
    folder = artifact_dir(name, config, root)
    if not (folder / "meta.json").exists():  # meta.json is written last: its presence = complete
        return None
    problem = _check_entry(folder)
    if problem is None:
        tensors_file, meta_file = folder / "tensors.safetensors", folder / "meta.json"
        try:
            tensors = load_file(tensors_file)
        except Exception as error:  # whatever a damaged file makes the reader raise: name the file
            problem = f"{tensors_file}: unreadable ({error})"
        else:
            try:
                meta = json.loads(meta_file.read_text(encoding="utf-8"))
            except (OSError, ValueError) as error:
                problem = f"{meta_file}: unreadable ({error})"
    if problem is not None:
        _set_aside(folder, problem)
        return None
    return Artifact(tensors, meta, folder, hit=True)


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def save(
    name: str,
    config: Mapping[str, Any],
    tensors: TensorDict,
    meta: Mapping[str, Any] | None = None,
    root: Path | None = None,
) -> Artifact:
    """Write an artifact atomically: a temporary folder renamed into place when complete.

    Raises :class:`BadInputError` naming the folder when the disk refuses (full, read-only...).
    """
    folder = artifact_dir(name, config, root)
    # clone: tied weights share storage, which safetensors refuses to save twice
    contiguous = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}
    tmp = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
        save_file(contiguous, tmp / "tensors.safetensors")
        sums = {"tensors.safetensors": file_sha256(tmp / "tensors.safetensors")}
        config_text = json.dumps(dict(config), indent=2, sort_keys=True, default=str)
        sums["config.json"] = _write(tmp / "config.json", config_text.encode("utf-8"))
        meta_bytes = json.dumps(dict(meta or {}), indent=2, sort_keys=True, default=str).encode("utf-8")
        sums["meta.json"] = hashlib.sha256(meta_bytes).hexdigest()
        (tmp / CHECKSUMS).write_text(json.dumps(sums, indent=2), encoding="utf-8")
        (tmp / "meta.json").write_bytes(meta_bytes)  # last: its presence marks the entry complete
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except Exception as error:
        if not is_storage_error(error):
            raise
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        raise BadInputError(
            folder, f"could not write this cache entry ({reason})",
            "free disk space, or point NB_EDIT_CACHE at a disk with room, then run again") from error
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return Artifact(contiguous, dict(meta or {}), folder, hit=False)


def ensure(
    name: str,
    config: Mapping[str, Any],
    build: Callable[[], BuildResult],
    root: Path | None = None,
    rebuild: bool = False,
) -> Artifact:
    """Load artifact ``name`` made with ``config``, or ``build()`` it and save it first.

    ``build`` returns a dict of tensors, or ``(tensors, meta)`` where ``meta`` is JSON-able
    (metrics, histories). ``rebuild=True`` ignores a cached copy. A corrupt entry is rebuilt; an
    entry that cannot be written is returned uncached with a warning (``hit=False``, no folder).
    """
    if not rebuild:
        cached = load(name, config, root)
        if cached is not None:
            return cached
    result = build()
    tensors, meta = result if isinstance(result, tuple) else (result, {})
    try:
        return save(name, config, tensors, meta, root)
    except BadInputError as error:
        # what build() made may be an hour of training: keep it for this session at least
        warnings.warn(f"{error} (the result is used uncached; the next run builds it again)", stacklevel=2)
        return Artifact({k: v.detach() for k, v in tensors.items()}, dict(meta), Path(error.input_name), hit=False)


def ensure_module(
    name: str,
    config: Mapping[str, Any],
    module: torch.nn.Module,
    train: Callable[[torch.nn.Module], Mapping[str, Any] | None],
    root: Path | None = None,
    rebuild: bool = False,
) -> tuple[torch.nn.Module, Artifact]:
    """``ensure`` for a model: load its trained state into ``module``, or ``train(module)``.

    ``train`` trains in place and may return JSON-able meta (its history, metrics).
    """

    def build() -> tuple[TensorDict, Mapping[str, Any]]:
        meta = train(module) or {}
        return dict(module.state_dict()), meta

    artifact = ensure(name, config, build, root, rebuild)
    if artifact.hit:
        module.load_state_dict(artifact.tensors)
    return module, artifact
