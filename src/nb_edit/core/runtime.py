"""Seeding, device, dtype, precision and quantisation: the one place that decides them.

**Device.** ``accelerate`` owns it: :func:`process_state` is accelerate's ``PartialState`` of
this process, made once: CUDA when present (``cuda:<local rank>`` under ``accelerate launch`` or
``torchrun``), else CPU, with the rank and world size the launcher gives. ``pick_device("auto")``
is that device, and the training loop's ``Accelerator`` (``nb_edit.training.loop``) runs on it,
so a trainer's modules and the loop always agree on one device.

**Precision on a machine without CUDA.** A stage config may ask for ``mixed_precision="bf16"``
(the full profile does) or a half ``dtype`` for its frozen bases. On CPU these fall back to fp32
with one :class:`CPUFallbackWarning` naming the field (:func:`resolve_mixed_precision`,
:func:`resolve_dtype`) instead of stopping the run: CPU bf16 autocast is slower than fp32 on
most CPUs, it would end the CPU runs' bit-for-bit reproducibility, and the model computed is the
same one. ``dtype="auto"`` means bf16 on CUDA (fp32 where the card has no bf16), fp32 on CPU.

**Quantisation on a machine without CUDA** raises :class:`BadInputError`
(:func:`resolve_quantization`): bitsandbytes' NF4 and int8 weights need a CUDA device, and
loading a model meant to fit in 4 bits in fp32 instead would change its memory by 8x (a 12B
editor needs 48 GB), so the run stops at once with the fix rather than later without memory.
"""

from __future__ import annotations

import os
import random
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from accelerate import PartialState

from nb_edit.core.validation import BadInputError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# a stage config's quantization -> the name the loaders (models.loaders) and VLMJudge take
QUANTIZATION_NAMES = {"nf4": "4bit", "int8": "8bit"}


class CPUFallbackWarning(UserWarning):
    """A setting that needs CUDA (bf16/fp16) was replaced by fp32 because the device is not CUDA."""


def set_seed(seed: int, deterministic: bool = True) -> torch.Generator:
    """Seed Python, NumPy and torch (all devices); return a torch generator with that seed.

    On CPU the tiny profile is then bit-for-bit reproducible; on CUDA ``deterministic``
    also asks cuDNN and cuBLAS for deterministic kernels.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic and torch.cuda.is_available():
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    return torch.Generator().manual_seed(seed)


def process_state() -> PartialState:
    """accelerate's state of this process: its device, rank and number of processes.

    ``cpu=True`` where CUDA is absent: then accelerate also takes the processes that
    ``torchrun`` / ``accelerate launch --cpu`` start as one gloo group (without it, it would see
    each of them as a lone process). The first call of a process decides; later ones share it.
    """
    return PartialState(cpu=not torch.cuda.is_available())


def pick_device(preference: str | None = "auto") -> torch.device:
    """``auto`` is the accelerator's device (CUDA when present, else CPU, see :func:`process_state`);
    ``cpu``/``cuda``/``cuda:N`` force one (a benchmark or an inference that runs outside the loop)."""
    if preference in ("auto", "", None):
        return process_state().device
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={preference!r} was asked for but no CUDA device is visible; "
            "use device='auto' or 'cpu'."
        )
    return device


def same_device(a: torch.device | str, b: torch.device | str) -> bool:
    """Whether two devices are one (``cuda`` and ``cuda:0`` are, when 0 is the current card)."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    current = torch.cuda.current_device()
    return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)


def pick_dtype(device: torch.device, preference: str = "auto") -> torch.dtype:
    """Mixed-precision dtype: bf16 on GPUs that support it, fp32 on CPU (``auto``)."""
    if preference != "auto":
        if preference not in DTYPES:
            raise ValueError(f"dtype={preference!r} is unknown; use one of auto, {', '.join(DTYPES)}.")
        return DTYPES[preference]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _fallback(field: str, value: str, device: torch.device, what: str, plain: str) -> None:
    warnings.warn(f"{field}={value!r} needs a CUDA device but this run is on {device}; {what} in fp32 instead "
                  f"(set it to {plain!r} to silence this)", CPUFallbackWarning, stacklevel=3)


def resolve_mixed_precision(requested: str, device: torch.device, field: str = "mixed_precision") -> str:
    """The mixed precision a run uses on ``device``: ``requested`` on CUDA; on any other device
    "no" (fp32), with one :class:`CPUFallbackWarning` naming ``field`` if bf16/fp16 was asked."""
    if requested not in ("no", "bf16", "fp16"):
        raise BadInputError(f"{field}={requested!r}", "unknown mixed precision", "use one of no, bf16, fp16")
    if requested == "no" or device.type == "cuda":
        return requested
    _fallback(field, requested, device, "it runs", "no")
    return "no"


def resolve_dtype(preference: str, device: torch.device, field: str = "dtype") -> torch.dtype:
    """The dtype of frozen bases: ``auto`` = bf16 on CUDA (fp32 on cards without bf16), fp32 on
    CPU; an explicit half dtype on CPU falls back to fp32 with one warning naming ``field``."""
    if preference != "auto" and preference not in DTYPES:
        raise BadInputError(f"{field}={preference!r}", "unknown dtype", f"use one of auto, {', '.join(DTYPES)}")
    dtype = pick_dtype(device, preference)
    if dtype != torch.float32 and device.type != "cuda":
        _fallback(field, preference, device, "the frozen bases load", "auto")
        return torch.float32
    return dtype


def resolve_quantization(value: str | None, device: torch.device, field: str = "quantization") -> str | None:
    """``None`` / ``"nf4"`` / ``"int8"`` as the loaders and the judge name it (None / "4bit" /
    "8bit"); raises :class:`BadInputError` on a device other than CUDA (module docstring)."""
    if value is None:
        return None
    if value not in QUANTIZATION_NAMES:
        raise BadInputError(f"{field}={value!r}", "unknown quantisation", "use null (none), nf4 or int8")
    if device.type != "cuda":
        raise BadInputError(f"{field}={value!r}", f"bitsandbytes quantisation needs a CUDA device, but this run is "
                            f"on {device}", f"set {field}=None (--set {field.rpartition('.')[2]}=null) to load the "
                            "frozen bases unquantised, or run on a GPU")
    return QUANTIZATION_NAMES[value]


@dataclass(frozen=True)
class Placement:
    """How a stage holds its models, resolved once from its config (see the module docstring)."""

    device: torch.device  # where every module of the stage lives: the accelerator's device by default
    dtype: torch.dtype  # of the frozen bases (editor/teacher base, text encoder, autoencoder, judge)
    mixed_precision: str  # what the training loop's Accelerator runs: "no" | "bf16" | "fp16"
    quantization: str | None  # of the frozen editor/teacher base and the judge: None | "4bit" | "8bit"


def placement(cfg, device: torch.device | str | None = None) -> Placement:
    """The :class:`Placement` of a stage config with ``dtype``, ``quantization`` and
    ``mixed_precision`` fields; ``device`` None (or "auto") is the accelerator's device.
    Warnings and errors name the field as ``<ConfigClass>.<field>``."""
    name = type(cfg).__name__
    dev = pick_device("auto" if device is None else str(device))
    quantization = resolve_quantization(cfg.quantization, dev, f"{name}.quantization")  # refusals before warnings
    return Placement(dev, resolve_dtype(cfg.dtype, dev, f"{name}.dtype"),
                     resolve_mixed_precision(cfg.mixed_precision, dev, f"{name}.mixed_precision"), quantization)


def is_quantized(module: torch.nn.Module) -> bool:
    """Whether ``module`` holds bitsandbytes weights (they are placed at load time)."""
    return any(type(p).__name__ in ("Params4bit", "Int8Params") for p in module.parameters())


def to_device(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module`` with every parameter and buffer on ``device``: moved only if one is elsewhere,
    so a quantised base (already placed where it was loaded) is never touched."""
    tensors = [*module.parameters(), *module.buffers()]
    if any(not same_device(t.device, device) for t in tensors):
        module.to(device)
    return module


def trainable_in_fp32(module: torch.nn.Module) -> torch.nn.Module:
    """Trainable bf16/fp16 parameters (LoRA adapters made in a half-precision base's dtype) in
    fp32: Adam's updates, lr times a normalised gradient, are often below a bf16 weight's spacing."""
    for p in module.parameters():
        if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()
    return module


def process_rank() -> int:
    """This process's rank in a distributed run (``accelerate launch``), 0 otherwise.

    Stages mix it into their data and noise seeds so that each process trains on its own shard.
    """
    return process_state().process_index


@contextmanager
def torch_threads(n: int | None):
    """Run a block with ``n`` torch CPU threads (``None``: unchanged), then restore the old count."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
