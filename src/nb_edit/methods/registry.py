"""The one owner of "a trained run": the variants of each paper's notebook, the configuration
each variant gets from the notebook's parameters, and the folder (cache key) it trains into.

Notebooks 05-07 build their runs here (:func:`npedit_configs`, :func:`multireward_configs`,
:func:`mtrl_configs`, :func:`run_dir`), the CLI too, and notebook 08 finds the same runs again
(:func:`trained_runs`). A run's folder is keyed by its configuration, its data and the shipped
stand-ins it started from, so re-creating the same configuration and calling the trainer's
``fit`` on the same folder returns the trained model without a training step: the loop resumes
at its last checkpoint, which is the end of the run. :attr:`TrainedRun.status` says whether a
run finished, and :meth:`TrainedRun.load` loads a finished run and refuses any other, so
evaluating never trains.

A notebook's ``steps`` parameter of 0 means the profile's default, which lives with the stage's
configuration (``PROFILES``); so does an empty model id (``teacher_id=""``, ``editor_id=""``...):
the shipped stand-in in the tiny profile, the hub model in the full one (``StageConfig.for_profile``).
The trainers build every model on the accelerator's device (``core.runtime``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from nb_edit.core import cache, paths
from nb_edit.core.config import setting_types
from nb_edit.core.runtime import placement
from nb_edit.core.validation import BadInputError
from nb_edit.data.store import read_dataset
from nb_edit.methods.mtrl.train import MTRLConfig, train_mtrl
from nb_edit.methods.multireward.train import VARIANTS as MULTIREWARD_CONDITIONS  # the baseline, the method, Table 4
from nb_edit.methods.multireward.train import MultiRewardConfig, train_multireward
from nb_edit.methods.npedit.train import VARIANTS as NPEDIT_VARIANTS  # the full method and the paper's ablations
from nb_edit.methods.npedit.train import (
    NPEditConfig,
    NPEditTrainer,
    shared_warmup_dir,
    train_npedit,
    warmup_editor_dir,
)
from nb_edit.models.vlm.judge import VLMJudge
from nb_edit.rewards.single_turn import JudgeReward, annotate_rewards
from nb_edit.training.checkpoint import STEP_PREFIX, latest_checkpoint

__all__ = ["MAIN_RUNS", "MODEL_SETTING", "MTRL_VARIANTS", "MULTIREWARD_VARIANTS", "NPEDIT_VARIANTS", "STAGES", "STAGE_CONFIGS",
           "TrainedRun",
           "annotated_triplets", "flowgrpo_baseline", "mtrl_configs", "multireward_configs", "npedit_configs",
           "reward_annotations", "run_dir", "stage_config", "train_stage", "trained_runs"]

STAGES = ("npedit", "multireward", "mtrl")
STAGE_CONFIGS = {"npedit": NPEditConfig, "multireward": MultiRewardConfig, "mtrl": MTRLConfig}
# the setting that names the model a stage starts from
MODEL_SETTING = {"npedit": "teacher_id", "multireward": "editor_id", "mtrl": "policy_id"}
NOTEBOOK = {"npedit": "05_npedit", "multireward": "06_multi_reward", "mtrl": "07_multiturn_rl"}
MTRL_VARIANTS: dict[str, dict[str, Any]] = {  # name -> MTRLConfig settings
    "grpo_broadcast": dict(algorithm="grpo", advantage="broadcast"),
    "grpo_perturn": dict(algorithm="grpo", advantage="perturn"),
    "nft_broadcast": dict(algorithm="nft", advantage="broadcast"),
    "nft_perturn": dict(algorithm="nft", advantage="perturn"),
    "grpo_reward_fusion": dict(algorithm="grpo", advantage="broadcast", fusion="reward"),
    "grpo_singleturn": dict(algorithm="grpo", n_turns=1),
    # the paper's design axes: how turn scores aggregate into the trajectory's score ("mean" is
    # grpo_broadcast), and how the judge is read, its "reasoning modes" ("expected" is grpo_broadcast)
    **{f"grpo_agg_{how}": dict(algorithm="grpo", advantage="broadcast", aggregation=how)
       for how in ("min", "product", "last")},
    **{f"grpo_reasoning_{mode}": dict(algorithm="grpo", advantage="broadcast", reasoning=mode)
       for mode in ("sampled", "generate")},
}

MULTIREWARD_VARIANTS: dict[str, dict[str, Any]] = {  # name -> MultiRewardConfig settings
    **{name: dict(variant=name) for name in MULTIREWARD_CONDITIONS},
    # where Linear_2(c_R) enters: after each UNet block, eq. 3 as written, against "reward"'s
    # addition to the timestep embedding (this project's default)
    "reward_blocks": dict(variant="reward", injection="blocks"),
}

# The main job's runs (``study=False``), which keep `make run` within its 30 minutes: each method,
# the baselines its claims compare it with, and the ablations its claims name. The seed study
# (``study: true``, papermill_runs/seeds.yaml) trains every variant of each stage.
MAIN_RUNS: dict[str, tuple[str, ...]] = {
    "npedit": ("full", "dmd_only", "vlm_only"),
    "multireward": ("noreward", "reward"),
    "mtrl": ("grpo_broadcast", "grpo_perturn", "nft_broadcast", "nft_perturn", "grpo_reward_fusion",
             "grpo_singleturn"),
}


@dataclass
class TrainedRun:
    """One training run of notebooks 05-07: its configuration, checkpoint folder and data.

    ``ckpt_dir`` is None when the run's data is itself absent (notebook 06's annotated triplets).
    """

    name: str  # e.g. "npedit_full", "multireward_reward", "mtrl_grpo_broadcast"
    stage: str
    config: Any
    ckpt_dir: Path | None
    dataset: Any
    missing_data: str = ""
    warmup_dir: Path | None = None  # NP-Edit: the copy warm-up the variants share (notebook 05)

    @property
    def done_steps(self) -> int:
        latest = latest_checkpoint(self.ckpt_dir) if self.ckpt_dir is not None else None
        return int(latest.name[len(STEP_PREFIX):]) if latest is not None else 0

    @property
    def finished(self) -> bool:
        return self.ckpt_dir is not None and self.done_steps >= self.config.steps

    @property
    def status(self) -> str:
        if self.ckpt_dir is None:
            return f"absent ({self.missing_data})"
        done = self.done_steps
        if done >= self.config.steps:
            return f"finished ({self.config.steps} steps)"
        return f"partial ({done} of {self.config.steps} steps)" if done else "absent (never trained)"

    def load(self):
        """The trained editor as a pipeline, read from its last checkpoint (no training step)."""
        if not self.finished:
            raise RuntimeError(f"{self.name}: {self.status} in {self.ckpt_dir}; run notebooks/"
                               f"{NOTEBOOK[self.stage]}.ipynb with the same parameters first (it trains into "
                               "the artifact cache), then evaluate")
        if self.stage == "npedit":
            trainer = NPEditTrainer(self.config, self.dataset)
            trainer.fit(self.ckpt_dir, progress=False, warmup_dir=self.warmup_dir)
            return trainer.edit_pipeline()
        if self.stage == "multireward":
            return train_multireward(self.config, self.dataset, self.ckpt_dir, progress=False)[0]

        return train_mtrl(self.config, self.dataset, self.ckpt_dir, progress=False)[0]


def run_dir(stage: str, cfg, data_folder) -> Path:
    """The folder a run trains into: the one cache key of a trained run (its stage, its
    configuration, the data it trained on, the shipped stand-ins). The configuration is its
    ``identity()``: settings added later count only away from their old value, so runs trained
    before they existed are found again."""
    return cache.checkpoint_dir(stage, {**cfg.identity(), "data": str(data_folder)})


def _variant_names(wanted: str | Sequence[str], known: Sequence[str], stage: str, study: bool) -> list[str]:
    """The variants named in ``wanted``; none named: every one (``study``) or the main job's."""
    names = [v.strip() for v in wanted.split(",")] if isinstance(wanted, str) else list(wanted)
    names = [v for v in names if v] or list(known if study else MAIN_RUNS[stage])
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"{stage} variants {unknown} are unknown; choose from {', '.join(known)}.")
    return names


def _configured(cls, profile: str, settings: dict, overrides: dict | None, world_cfg=None):
    """``cls.for_profile(profile, **settings, **overrides)``; an override of None sets None
    (``quantization: null`` loads the bases unquantised) instead of meaning "the profile's value".
    ``world_cfg`` (the data's world) fills a ``world`` setting the class has."""
    overrides = dict(overrides or {})
    if world_cfg is not None and "world" in setting_types(cls):
        settings = {**settings, "world": world_cfg.to_dict()}
    unknown = sorted(set(overrides) - set(setting_types(cls)))
    if unknown:
        raise BadInputError(f"overrides {unknown}", f"{cls.__name__} has no such settings",
                            f"use names of {cls.__name__}: {', '.join(sorted(setting_types(cls)))}")
    nones = {k: None for k, v in overrides.items() if v is None}
    return cls.for_profile(profile, **{**settings, **overrides}).replace(**nones)


def npedit_configs(profile: str, *, seed: int = 0, steps: int = 0, teacher_id: str = "", judge_id: str = "",
                   variants: str | Sequence[str] = "", study: bool = False, overrides: dict | None = None,
                   world_cfg=None) -> dict[str, NPEditConfig]:
    """Notebook 05's runs: variant name -> configuration (``variants`` "" means the main job's,
    ``MAIN_RUNS``, or every ablation with ``study``); ``overrides`` are more ``NPEditConfig``
    settings and win over ``steps``; ``world_cfg`` is the data's world
    (``shapesworld(settings)["world_cfg"]``, default the rich world)."""
    settings = dict(teacher_id=teacher_id, judge_id=judge_id, seed=seed, steps=steps or None)
    return {v: _configured(NPEditConfig, profile, {**settings, "variant": v}, overrides, world_cfg)
            for v in _variant_names(variants, NPEDIT_VARIANTS, "npedit", study)}


def multireward_configs(profile: str, *, seed: int = 0, steps: int = 0, editor_id: str = "", judge_id: str = "",
                        study: bool = False, overrides: dict | None = None) -> dict[str, MultiRewardConfig]:
    """Notebook 06's runs (the main job's, or every variant with ``study``); ``overrides`` are
    more ``MultiRewardConfig`` settings and win over ``steps``."""
    settings = dict(seed=seed, editor_id=editor_id, judge_id=judge_id, steps=steps or None)
    return {v: _configured(MultiRewardConfig, profile, {**settings, **MULTIREWARD_VARIANTS[v]}, overrides)
            for v in _variant_names("", list(MULTIREWARD_VARIANTS), "multireward", study)}


def mtrl_configs(profile: str, *, seed: int = 0, steps: int = 0, policy_id: str = "", judge_id: str = "",
                 variants: str | Sequence[str] = "", study: bool = False, overrides: dict | None = None,
                 world_cfg=None) -> dict[str, MTRLConfig]:
    """Notebook 07's runs: variant name -> configuration (``variants`` as in
    :func:`npedit_configs`); ``overrides`` and ``world_cfg`` as there."""
    settings = dict(seed=seed, policy_id=policy_id, judge_id=judge_id, steps=steps or None)
    return {name: _configured(MTRLConfig, profile, {**settings, **MTRL_VARIANTS[name]}, overrides, world_cfg)
            for name in _variant_names(variants, list(MTRL_VARIANTS), "mtrl", study)}


def flowgrpo_baseline(npedit_cfg: NPEditConfig, data: dict, overrides: dict | None = None,
                      progress: bool = True) -> tuple[MTRLConfig, Path]:
    """NP-Edit's comparison with Flow-GRPO on equal terms: (configuration, run folder) of a
    single-turn Flow-GRPO run that uses the same judge as its reward, starts from the same editor
    (the one after NP-Edit's copy warm-up, exported once as a model folder,
    :func:`~nb_edit.methods.npedit.train.warmup_editor_dir`, and the reference of its KL), trains
    on NP-Edit's unpaired instructions (``data["unpaired"]``) and samples as many edited images
    as NP-Edit's main stage: ``steps x batch_size`` edits, in rollouts of
    ``groups_per_step x group_size`` (``groups_per_step`` = batch_size // group_size, at least 1),
    each rollout serving ``updates_per_rollout`` optimizer steps. ``overrides`` are more
    ``MTRLConfig`` settings (e.g. ``{"quantization": None}``); the step count is derived, not set.
    Train it with ``train_mtrl(cfg, data["unpaired"], folder)``."""
    start = warmup_editor_dir(npedit_cfg, data["root"])
    if not start.exists():
        if placement(npedit_cfg).quantization:  # refused before any model loads
            raise BadInputError(f"NPEditConfig.quantization={npedit_cfg.quantization!r}",
                                "the Flow-GRPO baseline starts from NP-Edit's editor after its warm-up, exported by "
                                "merging its LoRA into the base, and merging into quantised weights is lossy",
                                "run notebook 05 with npedit_overrides: {quantization: null} for this comparison")
        trainer = NPEditTrainer(npedit_cfg, data["unpaired"])
        if npedit_cfg.copy_warmup_steps:
            trainer.warm_up(shared_warmup_dir(npedit_cfg, data["root"]), progress=progress)
        trainer.save_editor(start)
        del trainer
    overrides = {k: v for k, v in (overrides or {}).items() if k != "steps"}
    settings = dict(algorithm="grpo", advantage="broadcast", n_turns=1, policy_id=str(start),
                    judge_id=npedit_cfg.judge_id, seed=npedit_cfg.seed, sampling_steps=npedit_cfg.sampling_steps,
                    world=npedit_cfg.world)
    cfg = _configured(MTRLConfig, npedit_cfg.profile, settings, overrides)
    groups = max(1, npedit_cfg.batch_size // cfg.group_size)
    images = npedit_cfg.steps * npedit_cfg.batch_size
    rollouts = -(-images // (groups * cfg.group_size))  # ceil: at least as many edits as NP-Edit
    cfg = cfg.replace(groups_per_step=groups, steps=rollouts * cfg.updates_per_rollout)
    return cfg, run_dir("mtrl", cfg, data["root"])


def reward_annotations(data: dict, judge_id: str = ""):
    """(folder, dataset or None) of notebook 06's judge annotations of the noisy training triplets:
    the folder is keyed by the data, the judge, the number of triplets and the stand-ins."""
    noisy = data["noisy"].split("train")
    folder = paths.cache_dir() / "rewardedit" / cache.config_key(
        {"data": str(data["root"]), "judge": str(judge_id), "n": len(noisy), "standins": cache.standins_fingerprint()})
    if not (folder / "dataset.json").exists():
        return folder, None

    return folder, read_dataset(folder)


def annotated_triplets(data: dict, cfg: MultiRewardConfig):
    """(folder, dataset) of the judge's annotations of the noisy training triplets, made now with
    ``cfg``'s judge (on the accelerator's device, held as ``cfg`` says) if the cache lacks them."""
    folder, annotated = reward_annotations(data, cfg.judge_id)
    if annotated is None:
        place = placement(cfg)
        judge = VLMJudge.from_pretrained(cfg.judge_id or paths.pretrained_dir() / "judge", quantization=place.quantization,
                                         dtype=place.dtype, device=place.device).freeze()
        annotated = annotate_rewards(data["noisy"].split("train"), JudgeReward(judge), folder)
    return folder, annotated


def stage_config(stage: str, profile: str, settings: dict | None = None, world_cfg=None):
    """One run's configuration of ``stage`` (``npedit``, ``multireward``, ``mtrl``) in ``profile``
    with ``settings`` (an override of None sets None, as in the notebooks' overrides) on the data
    of ``world_cfg``."""
    if stage not in STAGE_CONFIGS:
        raise ValueError(f"stage {stage!r} is unknown; use one of {', '.join(STAGES)}.")
    return _configured(STAGE_CONFIGS[stage], profile, {}, settings, world_cfg)


def train_stage(stage: str, cfg, data: dict, ckpt_dir: Path | None = None):
    """Train one run of ``stage`` with ``cfg`` on ``data`` (``shapesworld(settings, seed=0)``) into
    ``ckpt_dir`` (default: its folder in the artifact cache, :func:`run_dir`); what
    ``python -m nb_edit train`` runs. Returns (the trained editor's pipeline, the loop's history)."""
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r} is unknown; use one of {', '.join(STAGES)}.")
    data_world = data["world_cfg"].to_dict()
    if getattr(cfg, "world", data_world) != data_world:
        raise BadInputError(f"the {stage} config's world", "it differs from the world of the data it would train on",
                            "build the config with the data's world (registry.stage_config(..., "
                            "world_cfg=data['world_cfg']))")
    if stage == "npedit":
        return train_npedit(cfg, data["unpaired"], Path(ckpt_dir or run_dir(stage, cfg, data["root"])))
    if stage == "multireward":
        folder, annotated = annotated_triplets(data, cfg)
        return train_multireward(cfg, annotated, Path(ckpt_dir or run_dir(stage, cfg, folder)))
    return train_mtrl(cfg, data["multiturn"].split("train"), Path(ckpt_dir or run_dir(stage, cfg, data["root"])))


def trained_runs(profile: str, seed: int, data: dict, *, steps: int = 0, judge_id: str = "",
                 teacher_id: str = "", editor_id: str = "", policy_id: str = "",
                 npedit_overrides: dict | None = None, multireward_overrides: dict | None = None,
                 mtrl_overrides: dict | None = None, study: bool = False,
                 stages: Sequence[str] = STAGES) -> list[TrainedRun]:
    """Every run notebooks 05-07 make with these parameters (the notebooks' parameter names;
    ``steps=0`` means the profile's default), found or not in the artifact cache.

    ``data`` is ``data.world_datasets.shapesworld(settings, seed=0)``, as the notebooks build it.
    """
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"stages {sorted(unknown)} are unknown; use some of {', '.join(STAGES)}.")
    root = data["root"]
    runs: list[TrainedRun] = []
    if "npedit" in stages:
        configs = npedit_configs(profile, seed=seed, steps=steps, teacher_id=teacher_id, judge_id=judge_id,
                                 study=study, overrides=npedit_overrides, world_cfg=data["world_cfg"])
        for variant, cfg in configs.items():
            runs.append(TrainedRun(f"npedit_{variant}", "npedit", cfg, run_dir("npedit", cfg, root), data["unpaired"],
                                   warmup_dir=shared_warmup_dir(cfg, root) if cfg.copy_warmup_steps else None))
    if "multireward" in stages:
        folder, annotated = reward_annotations(data, judge_id)
        missing = "" if annotated is not None else "notebook 06's judge annotations are not in the cache"
        configs = multireward_configs(profile, seed=seed, steps=steps, editor_id=editor_id, judge_id=judge_id,
                                      study=study, overrides=multireward_overrides)
        for variant, cfg in configs.items():
            ckpt = run_dir("multireward", cfg, folder) if annotated is not None else None
            runs.append(TrainedRun(f"multireward_{variant}", "multireward", cfg, ckpt, annotated, missing))
    if "mtrl" in stages:
        train_sequences = data["multiturn"].split("train")
        for name, cfg in mtrl_configs(profile, seed=seed, steps=steps, policy_id=policy_id, judge_id=judge_id,
                                      study=study, overrides=mtrl_overrides, world_cfg=data["world_cfg"]).items():
            runs.append(TrainedRun(f"mtrl_{name}", "mtrl", cfg, run_dir("mtrl", cfg, root), train_sequences))
    return runs
