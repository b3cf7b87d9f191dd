"""Seeding, device and dtype: the one place that decides them."""

from __future__ import annotations

import os
import random
from contextlib import contextmanager

import numpy as np
import torch


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


def pick_device(preference: str = "auto") -> torch.device:
    """``auto`` takes CUDA when present, else CPU; ``cpu``/``cuda``/``cuda:N`` force one."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={preference!r} was asked for but no CUDA device is visible; "
            "use device='auto' or 'cpu'."
        )
    return device


def pick_dtype(device: torch.device, preference: str = "auto") -> torch.dtype:
    """Mixed-precision dtype: bf16 on GPUs that support it, fp32 on CPU (``auto``)."""
    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if preference != "auto":
        if preference not in table:
            raise ValueError(f"dtype={preference!r} is unknown; use one of auto, {', '.join(table)}.")
        return table[preference]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def process_rank() -> int:
    """This process's rank in a distributed run (``accelerate launch``), 0 otherwise.

    Stages mix it into their data and noise seeds so that each process trains on its own shard.
    """
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


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
