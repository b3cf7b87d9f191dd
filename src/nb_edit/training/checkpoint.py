"""Crash-safe training checkpoints: a process killed at any instant leaves either the old
checkpoint or the new one, never a half-written one that a resume would trust.

Layout of ``<ckpt_dir>/step_00000012/`` (the step counts completed optimisation steps):

    weights_<module>.safetensors   trainable parameters (all of a small model, only the LoRA
                                   of a frozen base) and buffers
    ema_<module>.safetensors       EMA of the trainable parameters, when EMA is on
    state.pt                       optimizers (8-bit AdamW states included), LR schedulers,
                                   RNG states, data position, history, counters
    config.json                    the run's configuration
    manifest.json                  written last: the file list with sizes

Everything is first written into ``.tmp-step_...`` in the same folder, each file fsync'd, and
the folder is committed by one ``os.replace`` (atomic on POSIX file systems). ``state.pt`` holds
only tensors and plain Python values, so it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp-"
MANIFEST = "manifest.json"


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


def _is_complete(path: Path) -> bool:
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        return all((path / name).is_file() and (path / name).stat().st_size == size
                   for name, size in manifest["files"].items())
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return False


def list_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``ckpt_dir``, oldest first; temp and incomplete folders are ignored."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir()
             if p.is_dir() and p.name.startswith(STEP_PREFIX) and p.name[len(STEP_PREFIX):].isdigit()]
    return sorted((p for p in found if _is_complete(p)), key=_step_of)


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or ``None``."""
    complete = list_checkpoints(ckpt_dir)
    return complete[-1] if complete else None


def save_checkpoint(ckpt_dir: str | Path, step: int, *, modules: dict[str, torch.nn.Module],
                    state: dict[str, Any], ema: dict[str, dict[str, torch.Tensor]] | None = None,
                    config: dict[str, Any] | None = None, keep_last: int | None = None) -> Path:
    """Write checkpoint ``step`` atomically and keep only the newest ``keep_last`` ones.

    ``state`` holds what ``torch.save`` writes to ``state.pt`` (optimizer and scheduler state
    dicts, data position, history...); the RNG states are added here.
    """
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for stale in ckpt_dir.glob(f"{TMP_PREFIX}{STEP_PREFIX}*"):  # left by a killed writer
        shutil.rmtree(stale, ignore_errors=True)
    final = ckpt_dir / f"{STEP_PREFIX}{step:08d}"
    tmp = ckpt_dir / f"{TMP_PREFIX}{final.name}.{os.getpid()}"
    tmp.mkdir()
    for name, module in modules.items():
        save_file(trainable_state_dict(module), tmp / f"weights_{name}.safetensors")
    for name, weights in (ema or {}).items():
        save_file({k: v.detach().to("cpu", copy=True).contiguous() for k, v in weights.items()},
                  tmp / f"ema_{name}.safetensors")
    torch.save({**state, "step": int(step), "rng": capture_rng()}, tmp / "state.pt")
    (tmp / "config.json").write_text(json.dumps(config or {}, indent=2, default=str), encoding="utf-8")
    files = {}
    for file in sorted(tmp.iterdir()):
        _fsync_path(file)
        files[file.name] = file.stat().st_size
    (tmp / MANIFEST).write_text(json.dumps({"step": int(step), "files": files}, indent=2), encoding="utf-8")
    _fsync_path(tmp / MANIFEST)
    _fsync_path(tmp)
    if final.exists():  # a re-run over the same step (resume=False): move the old one aside first
        old = ckpt_dir / f"{TMP_PREFIX}old-{final.name}.{os.getpid()}"
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, final)  # the commit
    _fsync_path(ckpt_dir)
    if keep_last is not None and keep_last > 0:
        for old in list_checkpoints(ckpt_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path, modules: dict[str, torch.nn.Module],
                    restore_rng_states: bool = True) -> dict[str, Any]:
    """Load weights into ``modules`` and return the rest: ``state.pt``'s contents, with the EMA
    weights under ``"ema"`` and the config under ``"config"``. Restores the RNG states.

    Optimizers and schedulers are restored by the caller from ``state`` (it owns them).
    """
    path = Path(path)
    if not _is_complete(path):
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no valid {MANIFEST}); "
                                "pass a folder returned by latest_checkpoint()")
    for name, module in modules.items():
        file = path / f"weights_{name}.safetensors"
        if not file.is_file():
            raise KeyError(f"{path}: no weights for module {name!r}; the checkpoint holds "
                           f"{sorted(p.name for p in path.glob('weights_*'))}: pass the same module names")
        weights = load_file(file)
        expected = {n for n, p in module.named_parameters() if p.requires_grad}
        expected |= {n for n, _ in module.named_buffers()}
        if set(weights) != set(expected):
            raise KeyError(f"{file}: its tensors do not match module {name!r} (missing "
                           f"{sorted(set(expected) - set(weights))[:5]}, unexpected "
                           f"{sorted(set(weights) - set(expected))[:5]}); build the module as the run did")
        module.load_state_dict(weights, strict=False)
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    state["ema"] = {file.name[len("ema_"):-len(".safetensors")]: load_file(file)
                    for file in sorted(path.glob("ema_*.safetensors"))}
    state["config"] = json.loads((path / "config.json").read_text(encoding="utf-8"))
    if restore_rng_states:
        restore_rng(state["rng"])
    return state
