"""The editors that notebooks 05-07 trained, found again in the artifact cache (for notebook 08).

Notebooks 05-07 train each run into ``cache.checkpoint_dir(stage, {**config, "data": ...})``, a
folder keyed by the run's configuration, its data and the shipped stand-ins it started from.
Re-creating the same configuration and calling the trainer's ``fit`` on the same folder returns
the trained model without a training step: the loop resumes at its last checkpoint, which is the
end of the run.

:func:`trained_runs` re-creates the configurations the notebooks build from their parameters
(the variant tables below are the notebooks'; ``tests/test_evaluation.py`` checks that they still
match), :attr:`TrainedRun.status` says whether a run finished, and :meth:`TrainedRun.load` loads a
finished run and refuses any other, so evaluating never trains.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from nb_edit import cache, paths
from nb_edit.config import resolve_profile
from nb_edit.training.checkpoint import STEP_PREFIX, latest_checkpoint

__all__ = ["MTRL_VARIANTS", "NOTEBOOK_STEPS", "NPEDIT_VARIANTS", "STAGES", "TrainedRun", "trained_runs"]

STAGES = ("npedit", "multireward", "mtrl")
NOTEBOOK = {"npedit": "05_npedit", "multireward": "06_multi_reward", "mtrl": "07_multiturn_rl"}
# The default of the ``steps`` parameter of notebooks 05, 06 and 07 (0: the profile's default).
NOTEBOOK_STEPS = {"npedit": 0, "multireward": 60, "mtrl": 20}
NPEDIT_VARIANTS = ("full", "dmd_only", "vlm_only", "no_identity", "full_vocab")  # notebook 05's ``variants``
MULTIREWARD_VARIANTS = ("noreward", "reward")  # notebook 06
MTRL_VARIANTS: dict[str, dict[str, Any]] = {  # notebook 07's ``variants``
    "grpo_broadcast": dict(algorithm="grpo", advantage="broadcast"),
    "grpo_perturn": dict(algorithm="grpo", advantage="perturn"),
    "nft_broadcast": dict(algorithm="nft", advantage="broadcast"),
    "nft_perturn": dict(algorithm="nft", advantage="perturn"),
    "grpo_reward_fusion": dict(algorithm="grpo", advantage="broadcast", fusion="reward"),
    "grpo_singleturn": dict(algorithm="grpo", n_turns=1),
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
            from nb_edit.training.npedit import NPEditTrainer

            trainer = NPEditTrainer(self.config, self.dataset)
            trainer.fit(self.ckpt_dir, progress=False, warmup_dir=self.warmup_dir)
            return trainer.edit_pipeline()
        if self.stage == "multireward":
            from nb_edit.training.multireward import train_multireward

            return train_multireward(self.config, self.dataset, self.ckpt_dir, progress=False)[0]
        from nb_edit.training.mtrl import train_mtrl

        return train_mtrl(self.config, self.dataset, self.ckpt_dir, progress=False)[0]


def _steps(stage: str, steps: int, profile: str) -> int | None:
    """The ``steps`` override a notebook passes to its config: 05 any profile, 06 and 07 tiny only."""
    value = NOTEBOOK_STEPS[stage] if steps < 0 else steps
    if stage == "npedit":
        return value or None
    return (value or None) if profile == "tiny" else None


def reward_annotations(data: dict, judge_id: str = ""):
    """(folder, dataset or None) of notebook 06's judge annotations of the noisy training triplets."""
    noisy = data["noisy"].split("train")
    folder = paths.cache_dir() / "rewardedit" / cache.config_key(
        {"data": str(data["root"]), "judge": str(judge_id), "n": len(noisy), "standins": cache.standins_fingerprint()})
    if not (folder / "dataset.json").exists():
        return folder, None
    from nb_edit.data.store import read_dataset

    return folder, read_dataset(folder)


def trained_runs(profile: str, seed: int, data: dict, *, steps: int = -1, judge_id: str = "",
                 teacher_id: str = "", editor_id: str = "", policy_id: str = "",
                 overrides: dict | None = None, stages: Sequence[str] = STAGES) -> list[TrainedRun]:
    """Every run notebooks 05-07 make with these parameters (the notebooks' parameter names;
    ``steps=-1`` means each notebook's own default; ``overrides`` are notebook 06's more
    ``MultiRewardConfig`` settings, which win over ``steps`` as they do there), found or not in
    the artifact cache.

    ``data`` is ``data.world_datasets.shapesworld(settings, seed=0)``, as the notebooks build it.
    """
    from nb_edit.training.mtrl import MTRLConfig
    from nb_edit.training.multireward import MultiRewardConfig
    from nb_edit.training.npedit import NPEditConfig, shared_warmup_dir

    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"stages {sorted(unknown)} are unknown; use some of {', '.join(STAGES)}.")
    resolved = resolve_profile(profile)
    root = str(data["root"])
    runs: list[TrainedRun] = []
    if "npedit" in stages:
        for variant in NPEDIT_VARIANTS:
            cfg = NPEditConfig.for_profile(profile, variant=variant, teacher_id=teacher_id, judge_id=judge_id,
                                           seed=seed, steps=_steps("npedit", steps, resolved))
            runs.append(TrainedRun(f"npedit_{variant}", "npedit", cfg,
                                   cache.checkpoint_dir("npedit", {**cfg.to_dict(), "data": root}), data["unpaired"],
                                   warmup_dir=shared_warmup_dir(cfg, root) if cfg.copy_warmup_steps else None))
    if "multireward" in stages:
        folder, annotated = reward_annotations(data, judge_id)
        for variant in MULTIREWARD_VARIANTS:
            settings = {**dict(seed=seed, editor_id=editor_id, steps=_steps("multireward", steps, resolved)),
                        **(overrides or {})}  # as notebook 06 composes them: overrides win
            cfg = MultiRewardConfig.for_profile(profile, variant=variant, **settings)
            ckpt = (cache.checkpoint_dir("multireward", {**cfg.to_dict(), "data": str(folder)})
                    if annotated is not None else None)
            missing = "" if annotated is not None else "notebook 06's judge annotations are not in the cache"
            runs.append(TrainedRun(f"multireward_{variant}", "multireward", cfg, ckpt, annotated, missing))
    if "mtrl" in stages:
        train_sequences = data["multiturn"].split("train")
        for name, overrides in MTRL_VARIANTS.items():
            cfg = MTRLConfig.for_profile(profile, seed=seed, policy_id=policy_id, judge_id=judge_id,
                                         steps=_steps("mtrl", steps, resolved), **overrides)
            runs.append(TrainedRun(f"mtrl_{name}", "mtrl", cfg,
                                   cache.checkpoint_dir("mtrl", {**cfg.to_dict(), "data": root}), train_sequences))
    return runs
