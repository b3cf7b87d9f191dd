"""Training: one generic loop (``loop.train``), crash-safe checkpoints (``checkpoint``) and one
short module per stage. Importing this package is cheap; the names below load on first use.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "train": "loop", "LoopConfig": "loop", "NonFiniteError": "loop", "make_optimizer": "loop",
    "make_scheduler": "loop", "EMA": "loop", "History": "loop",
    "save_checkpoint": "checkpoint", "load_checkpoint": "checkpoint",
    "latest_checkpoint": "checkpoint", "list_checkpoints": "checkpoint",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
