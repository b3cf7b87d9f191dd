"""Configuration as plain data: one dataclass per stage, each with per-profile defaults.

Profiles (``RunSettings.profile``):

* ``tiny``  - the default: 2 CPU cores, minutes, ShapesWorld and the shipped stand-in models;
* ``full``  - real hub models on one GPU (LoRA, 8-bit optimizers, quantised frozen bases);
* ``smoke`` - the tiny code path at toy sizes, so that the test suite runs every notebook cell
  in seconds. ``make test`` asks for it by setting ``NB_EDIT_SMOKE=1`` for the nbval kernels; a
  notebook still says ``profile = "tiny"`` and :func:`resolve_profile` swaps in ``smoke``.
  With ``NB_EDIT_SMOKE=1`` the ``full`` profile keeps its models and how it holds them (ids,
  backbone, dtype, quantisation, mixed precision, gradient checkpointing) and takes smoke's
  sizes (steps, batches, images, evaluation sets): the full code path in a minute, which the
  tests run on tiny hub-layout models and a user can run before a long job.

Only sizes, model ids, data paths and how the models are held (dtype, quantisation, mixed
precision) change between profiles, never the logic. A stage config declares its per-profile
values in ``PROFILES`` and is built with ``MyConfig.for_profile("tiny", steps=10)``; the final
config is written next to the outputs. An override of ``None``, or of ``""`` for a model id
(a setting named ``*_id``), means "the profile's value": a notebook's ``editor_id=""`` is
InstructPix2Pix in the full profile and the shipped stand-in in the tiny one.

The three methods' configs derive from :class:`TrainingConfig`, which adds how their models
are held: ``dtype`` of the frozen bases, their bitsandbytes ``quantization``, the loop's
``mixed_precision`` and ``gradient_checkpointing``; ``nb_edit.core.runtime`` resolves them
for the device (what falls back on CPU and what refuses, see its docstring).

Settings that come from outside the code (``python -m nb_edit train --set steps=50``) go through
:func:`parse_overrides` first, which checks each one against the config's own fields and types
before anything loads, so a typo fails in a second instead of after the models loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import types
import typing
from typing import Any, ClassVar, Mapping, Sequence, TypeVar

import yaml

from nb_edit.core.validation import BadInputError

PROFILE_NAMES = ("tiny", "full", "smoke")
SMOKE_ENV = "NB_EDIT_SMOKE"

T = TypeVar("T", bound="StageConfig")


def smoke_requested() -> bool:
    """Whether ``NB_EDIT_SMOKE`` asks for toy sizes (see the module docstring)."""
    return os.environ.get(SMOKE_ENV, "") not in ("", "0")


def resolve_profile(profile: str) -> str:
    """Check ``profile`` and apply the test suite's smoke override (see module docstring)."""
    if not isinstance(profile, str) or profile not in PROFILE_NAMES:
        raise ValueError(
            f"profile={profile!r} is not a known profile; use one of {', '.join(PROFILE_NAMES)} "
            "(papermill: -p profile tiny)."
        )
    if profile == "tiny" and smoke_requested():
        return "smoke"
    return profile


@dataclasses.dataclass
class StageConfig:
    """Base of every stage config: per-profile defaults, overrides, JSON round trip."""

    profile: str = "tiny"
    seed: int = 0

    PROFILES: ClassVar[dict[str, dict[str, Any]]] = {}
    # int settings that count work per step: 0 trains nothing or divides by zero. Every other int
    # setting only has to be >= 0 (0 is meaningful there: no warm-up, full fine-tuning, no curve)
    POSITIVE: ClassVar[tuple[str, ...]] = ("steps", "batch_size", "sampling_steps", "checkpoint_every",
                                           "n_turns", "group_size", "groups_per_step", "updates_per_rollout",
                                           "heads", "gradient_accumulation_steps")
    # Settings added after runs were trained and cached, with the value every earlier run had:
    # identity() leaves them out at that value, so earlier runs keep their cache folders and
    # their checkpoints still resume (a new field would otherwise read as a changed config).
    ADDED_LATER: ClassVar[dict[str, Any]] = {}
    # settings that size the machine, not the run: at smoke sizes they keep their defaults
    MACHINE_SETTINGS: ClassVar[tuple[str, ...]] = ("num_threads",)

    @classmethod
    def for_profile(cls: type[T], profile: str = "tiny", **overrides: Any) -> T:
        name = resolve_profile(profile)
        values = dict(cls.PROFILES.get(name, {}))
        if name == "full" and smoke_requested():  # the full code path at smoke sizes (module docstring)
            values.update(cls.PROFILES.get("smoke", {}))
            for local in cls.MACHINE_SETTINGS:
                values.pop(local, None)
        # None, and "" for a model id, mean "the profile's value" (module docstring): a notebook's
        # empty editor_id must not swap the full profile's hub model for the tiny stand-in
        values.update({k: v for k, v in overrides.items()
                       if v is not None and not (v == "" and is_model_id(k))})
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

    def identity(self) -> dict[str, Any]:
        """What names this run (cache keys, checkpoint configs): ``to_dict()`` without the
        :attr:`ADDED_LATER` settings that hold the value runs had before the setting existed."""
        return {k: v for k, v in self.to_dict().items()
                if not (k in self.ADDED_LATER and v == self.ADDED_LATER[k])}

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


MODEL_ID_SUFFIX = "_id"  # a setting named like this holds a model folder or hub id


def is_model_id(name: str) -> bool:
    """Whether setting ``name`` names a model (``teacher_id``, ``judge_id``, ``editor_id``...)."""
    return name.endswith(MODEL_ID_SUFFIX)


DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")
QUANTIZATION_CHOICES = (None, "nf4", "int8")
MIXED_PRECISION_CHOICES = ("no", "bf16", "fp16")


@dataclasses.dataclass
class TrainingConfig(StageConfig):
    """Base of the methods' stage configs (NP-Edit, Multi-Reward, MT-EditFlow): how their models
    are held and run; ``nb_edit.core.runtime.placement`` resolves it for the accelerator's device.
    """

    dtype: str = "auto"  # frozen bases: "auto" (bf16 on CUDA, fp32 on CPU) | "fp32" | "bf16" | "fp16"
    # bitsandbytes for the frozen editor/teacher base and the judge: None | "nf4" | "int8" (CUDA only)
    quantization: str | None = None
    gradient_checkpointing: bool = False  # on the editor's backbone: recompute activations in backward
    mixed_precision: str = "no"  # the loop's autocast: "no" | "bf16" | "fp16" (fp32 on CPU, with a warning)

    ADDED_LATER: ClassVar[dict[str, Any]] = {"dtype": "auto", "quantization": None}

    def __post_init__(self):
        name = type(self).__name__
        for field, choices in (("dtype", DTYPE_CHOICES), ("quantization", QUANTIZATION_CHOICES),
                               ("mixed_precision", MIXED_PRECISION_CHOICES)):
            if getattr(self, field) not in choices:
                raise BadInputError(f"{name}.{field}={getattr(self, field)!r}", f"unknown {field}",
                                    f"use one of {', '.join('null' if c is None else c for c in choices)}")


THREADS_ENV = "NB_EDIT_THREADS"


@dataclasses.dataclass
class RunSettings(StageConfig):
    """Settings every notebook shares: device, precision, world size and evaluation size."""

    device: str = "auto"
    mixed_precision: str = "no"  # "no" | "bf16" | "fp16"; used on GPUs only
    # the ladder's world (``world.WORLDS``: toy, small, rich) the run's data are drawn from; the
    # stand-ins in data/pretrained/ are made for it (``make pretrain`` reads it from here)
    world: str = "rich"
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
        # 512 held-out test edits: a success rate's 95% interval is about +-0.04 (256 gave +-0.06)
        "tiny": dict(resolution=32, n_eval=512),
        "smoke": dict(resolution=32, n_eval=16, n_probe=40, n_train_scenes=24, n_sequences=6, n_test_sequences=6),
        "full": dict(resolution=512, n_eval=512, mixed_precision="bf16", num_threads=8),
    }


class TypeMismatch(TypeError):
    """A value that does not fit a type (raised by :func:`coerce_value`, without a message: the
    caller knows which input it was and says so in a :class:`BadInputError`)."""


def type_name(hint: Any) -> str:
    """A type as a user writes it: ``int``, ``float or None``, ``tuple[float, float]``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("None" if a is type(None) else type_name(a) for a in args)
    if origin is not None and args:
        return f"{getattr(origin, '__name__', origin)}[{', '.join('...' if a is Ellipsis else type_name(a) for a in args)}]"
    return getattr(hint, "__name__", str(hint))


def coerce_value(value: Any, hint: Any) -> Any:
    """``value`` as type ``hint``, or raise :class:`TypeMismatch`.

    Only conversions that cannot change meaning are made: an int where a float is expected, a
    float written as text (YAML reads ``1e-3`` as a string), a list where a tuple is expected.
    A bool is never taken for a number, nor a float for an int (``steps=2.5`` is a mistake).
    """
    if hint is Any or hint is object:
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arm in args:
            try:
                return coerce_value(value, arm)
            except TypeMismatch:
                continue
        raise TypeMismatch
    if hint is type(None) or hint is None:
        if value is None:
            return None
        raise TypeMismatch
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise TypeMismatch
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeMismatch
    if hint is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise TypeMismatch from None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise TypeMismatch
    if hint is str:
        if isinstance(value, str):
            return value
        raise TypeMismatch
    if origin is tuple or hint is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeMismatch
        if not args:
            return tuple(value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce_value(v, args[0]) for v in value)
        if len(value) != len(args):
            raise TypeMismatch
        return tuple(coerce_value(v, a) for v, a in zip(value, args))
    if origin is list or hint is list:
        if not isinstance(value, (list, tuple)):
            raise TypeMismatch
        return [coerce_value(v, args[0]) for v in value] if args else list(value)
    if origin is dict or hint is dict:
        if isinstance(value, dict):
            return value
        raise TypeMismatch
    if origin is typing.Literal:
        if value in args:
            return value
        raise TypeMismatch
    if isinstance(hint, type) and not isinstance(value, hint):
        raise TypeMismatch
    return value


def closest(name: object, known: Sequence[str]) -> str | None:
    """The known name nearest to ``name`` (for "did you mean ...?"), or None."""
    match = difflib.get_close_matches(str(name), list(known), n=1, cutoff=0.5)
    return match[0] if match else None


def _example(cls: type[StageConfig], name: str) -> str:
    """The field's default as one would type it after ``--set name=`` (YAML: [0.0, 0.9], null)."""
    default = getattr(cls, name, None)
    try:
        return json.dumps(list(default) if isinstance(default, tuple) else default)
    except TypeError:
        return "<value>"


def setting_types(cls: type[StageConfig]) -> dict[str, Any]:
    """Field name -> its type (the annotations resolved) of a stage config dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def check_overrides(cls: type[StageConfig], overrides: Mapping[str, Any], option: str = "--set",
                    shown: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Check settings for ``cls`` given from outside the code; return them converted to the
    fields' types. Unknown names, wrong types and counts below their minimum raise
    :class:`BadInputError` naming the setting, the value and the fix. ``shown`` maps a name to
    the text the user typed, for the message."""
    known = setting_types(cls)
    checked: dict[str, Any] = {}
    for name, value in overrides.items():
        where = f"{option} {(shown or {}).get(name) or f'{name}={value!r}'}"
        if name == "profile":
            raise BadInputError(where, "the profile is not a setting",
                                f"use --profile ({', '.join(PROFILE_NAMES)}) instead")
        if name not in known:
            near = closest(name, [k for k in known if k != "profile"])
            raise BadInputError(where, f"{cls.__name__} has no setting {name!r}"
                                + (f" (did you mean {near!r}?)" if near else ""),
                                f"use one of {', '.join(sorted(k for k in known if k != 'profile'))}")
        hint = known[name]
        try:
            value = coerce_value(value, hint)
        except TypeMismatch:
            raise BadInputError(where, f"{cls.__name__}.{name} expects {type_name(hint)}, got {value!r} "
                                f"({type(value).__name__})",
                                f"give a value of type {type_name(hint)}, e.g. {option} "
                                f"{name}={_example(cls, name)}") from None
        if isinstance(value, int) and not isinstance(value, bool):
            if name in cls.POSITIVE and value < 1:
                raise BadInputError(where, f"{name} must be a positive count, got {value}",
                                    "give a whole number >= 1")
            if value < 0:
                raise BadInputError(where, f"{name} must not be negative, got {value}",
                                    "give a whole number >= 0")
        if (name == "lr" or name.endswith("_lr")) and value is not None and value <= 0:
            raise BadInputError(where, f"a learning rate must be > 0, got {value}", "give e.g. 1e-4")
        checked[name] = value
    return checked


def parse_overrides(cls: type[StageConfig], items: Sequence[str], option: str = "--set") -> dict[str, Any]:
    """``["steps=50", "lr=1e-4"]`` -> checked settings for ``cls`` (see :func:`check_overrides`).

    Each value is read as YAML (``true``, ``[0.0, 0.9]``, ``null``); a name given twice keeps the last.
    """
    overrides: dict[str, Any] = {}
    shown: dict[str, str] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise BadInputError(f"{option} {item!r}", "expected NAME=VALUE" + (" (no '=')" if not sep else
                                                                             " (the name is empty)"),
                                f"write it as {option} steps=50")
        try:
            overrides[name] = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError as error:
            raise BadInputError(f"{option} {item!r}", f"the value is not valid YAML ({getattr(error, 'problem', error)})",
                                "quote it or fix its brackets") from None
        shown[name] = item
    return check_overrides(cls, overrides, option, shown)
