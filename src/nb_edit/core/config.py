"""Configuration as plain data: one dataclass per stage, each with per-profile defaults.

Profiles (``RunSettings.profile``):

* ``tiny``  - the default: 2 CPU cores, minutes, ShapesWorld and the shipped stand-in models;
* ``full``  - real hub models on one GPU (LoRA, 8-bit optimizers, quantised frozen bases);
* ``smoke`` - the tiny code path at toy sizes, so that the test suite runs every notebook cell
  in seconds. ``make test`` asks for it by setting ``NB_EDIT_SMOKE=1`` for the nbval kernels; a
  notebook still says ``profile = "tiny"`` and :func:`resolve_profile` swaps in ``smoke``.

Only sizes, model ids and data paths change between profiles, never the logic. A stage
config declares its per-profile values in ``PROFILES`` and is built with
``MyConfig.for_profile("tiny", steps=10)``; the final config is written next to the outputs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, ClassVar, TypeVar

PROFILE_NAMES = ("tiny", "full", "smoke")
SMOKE_ENV = "NB_EDIT_SMOKE"

T = TypeVar("T", bound="StageConfig")


def resolve_profile(profile: str) -> str:
    """Check ``profile`` and apply the test suite's smoke override (see module docstring)."""
    if not isinstance(profile, str) or profile not in PROFILE_NAMES:
        raise ValueError(
            f"profile={profile!r} is not a known profile; use one of {', '.join(PROFILE_NAMES)} "
            "(papermill: -p profile tiny)."
        )
    if profile == "tiny" and os.environ.get(SMOKE_ENV, "") not in ("", "0"):
        return "smoke"
    return profile


@dataclasses.dataclass
class StageConfig:
    """Base of every stage config: per-profile defaults, overrides, JSON round trip."""

    profile: str = "tiny"
    seed: int = 0

    PROFILES: ClassVar[dict[str, dict[str, Any]]] = {}

    @classmethod
    def for_profile(cls: type[T], profile: str = "tiny", **overrides: Any) -> T:
        name = resolve_profile(profile)
        values = dict(cls.PROFILES.get(name, {}))
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(
                f"{cls.__name__} has no setting(s) {sorted(unknown)}; "
                f"known: {sorted(f.name for f in dataclasses.fields(cls))}."
            )
        return cls(profile=name, **{k: v for k, v in values.items() if k != "profile"})

    def replace(self: T, **changes: Any) -> T:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


THREADS_ENV = "NB_EDIT_THREADS"


@dataclasses.dataclass
class RunSettings(StageConfig):
    """Settings every notebook shares: device, precision, world size and evaluation size."""

    device: str = "auto"
    mixed_precision: str = "no"  # "no" | "bf16" | "fp16"; used on GPUs only
    resolution: int = 32  # image side in pixels
    n_eval: int = 256  # held-out test edits per evaluation
    n_probe: int = 500  # items for quick measurements (oracle parse accuracy, ...)
    n_train_scenes: int = 1000  # reference scenes of the synthetic training sets
    n_sequences: int = 200  # multi-turn training sequences
    n_test_sequences: int = 100  # held-out multi-turn test sequences
    # torch CPU threads; NB_EDIT_THREADS sets the default (1 when other jobs share the cores:
    # two jobs with 2 threads each on 2 cores run several times slower than with 1 each)
    num_threads: int = dataclasses.field(default_factory=lambda: int(os.environ.get(THREADS_ENV, "2")))

    PROFILES: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": dict(resolution=32),
        "smoke": dict(resolution=32, n_eval=16, n_probe=40, n_train_scenes=24, n_sequences=6, n_test_sequences=6),
        "full": dict(resolution=512, n_eval=512, mixed_precision="bf16", num_threads=8),
    }
