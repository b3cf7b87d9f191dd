"""The artifact cache: trained weights and generated tensors, keyed by the config that made them.

``ensure(name, config, build)`` returns the artifact saved under
``data/cache/<name>/<key>/`` (``tensors.safetensors`` + ``config.json`` + ``meta.json``), where
``key`` is a hash of ``config``; on a miss it calls ``build()``, saves what it returns, and
returns that. So each notebook runs alone from a fresh kernel and reuses what an earlier
notebook (or an earlier run) trained with the same settings, and a changed setting never
returns a stale artifact. Only safetensors and JSON are read back: nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors.torch import load_file, save_file

from nb_edit.core import paths

TensorDict = dict[str, torch.Tensor]
BuildResult = TensorDict | tuple[TensorDict, Mapping[str, Any]]


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
    another configuration, or remade stand-ins, start afresh."""
    return artifact_dir(stage, {**config, "standins": standins_fingerprint()}, root)


def load(name: str, config: Mapping[str, Any], root: Path | None = None) -> Artifact | None:
    folder = artifact_dir(name, config, root)
    if not (folder / "meta.json").exists():  # meta.json is written last: its presence = complete
        return None
    tensors = load_file(folder / "tensors.safetensors")
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    return Artifact(tensors, meta, folder, hit=True)


def save(
    name: str,
    config: Mapping[str, Any],
    tensors: TensorDict,
    meta: Mapping[str, Any] | None = None,
    root: Path | None = None,
) -> Artifact:
    """Write an artifact atomically: a temporary folder renamed into place when complete."""
    folder = artifact_dir(name, config, root)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        # clone: tied weights share storage, which safetensors refuses to save twice
        contiguous = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}
        save_file(contiguous, tmp / "tensors.safetensors")
        (tmp / "config.json").write_text(json.dumps(dict(config), indent=2, sort_keys=True, default=str))
        (tmp / "meta.json").write_text(json.dumps(dict(meta or {}), indent=2, sort_keys=True, default=str))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
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
    (metrics, histories). ``rebuild=True`` ignores a cached copy.
    """
    if not rebuild:
        cached = load(name, config, root)
        if cached is not None:
            return cached
    result = build()
    tensors, meta = result if isinstance(result, tuple) else (result, {})
    return save(name, config, tensors, meta, root)


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
