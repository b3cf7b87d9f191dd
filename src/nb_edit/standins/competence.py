"""How good a set of stand-ins is at its world, measured before any method trains on them.

A method's figure means something only when the models it starts from and the judge that
scores it are good at the world it runs in. :func:`measure` scores the stand-ins a folder holds
(``teacher/``, ``clean/``, ``noisy/``, ``judge/``: what ``make pretrain`` or
``python -m nb_edit pretrain --to DIR`` writes) on held-out items of their own world, under the
metric keys notebook 03 records, each with its 95% bootstrap interval:

* ``models.copy.*``: the output-equals-input baseline on the same edits, the floor an editor clears;
* ``models.supervised_clean.*`` / ``models.supervised_noisy.*``: oracle success, followed,
  preserved, quality, and ``per_type.<edit type>``;
* ``models.teacher.caption_match``: the share of the teacher's samples that draw their caption, at
  the sampling steps and guidance DMD's real score uses;
* ``judge.acc_<kind>``: the judge's accuracy on held-out questions of each kind.

``python -m nb_edit competence --world small --from DIR`` runs it and writes the figures as JSON:
the command that makes a calibration of the world rerunnable.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nb_edit import world
from nb_edit.evaluation import harness
from nb_edit.evaluation.stats import bootstrap_ci
from nb_edit.flow.pipeline import load_pipeline
from nb_edit.models.vlm.judge import VLMJudge
from nb_edit.standins import judge as standin_judge
from nb_edit.standins.pretrain import check_world, is_complete

EDITORS = {"clean": "supervised_clean", "noisy": "supervised_noisy"}  # folder -> metric name (notebook 03)
HELD_OUT_STREAM = 8_675_309  # the held-out edits' random stream, apart from every training stream


def held_out_edits(world_cfg: world.WorldConfig, n: int, seed: int = 0) -> list[world.Edit]:
    """``n`` edits of ``world_cfg`` drawn from a stream no training set draws from."""
    rng = np.random.default_rng([seed, HELD_OUT_STREAM])
    return [world.sample_edit(world.sample_scene(rng, world_cfg), rng, world_cfg) for _ in range(n)]


def measure(folder: str | Path, world_cfg: world.WorldConfig, n: int = 512, seed: int = 0, steps: int = 4,
            guidance: float = 2.0, n_boot: int = 1000) -> dict[str, float]:
    """The competence figures of every stand-in ``folder`` holds (module docstring), on ``n``
    held-out edits of ``world_cfg`` sampled with ``steps`` steps; the teacher with ``guidance``."""
    folder = Path(folder)
    present = [part for part in ("teacher", *EDITORS, "judge") if is_complete(folder / part)]
    if not present:
        raise FileNotFoundError(f"{folder} holds no finished stand-in (teacher/, clean/, noisy/, judge/ with "
                                "made_by.json); make them with `python -m nb_edit pretrain --to DIR`.")
    check_world(world_cfg, *(folder / part for part in present))
    edits = held_out_edits(world_cfg, n, seed)
    sources = harness.render_sources(edits, world_cfg)
    instructions = [e.instruction for e in edits]
    metrics: dict[str, float] = {}
    editors = {"copy": harness.CopyEditor(), **{name: load_pipeline(folder / part)
                                                for part, name in EDITORS.items() if part in present}}
    for name, pipe in editors.items():
        outputs = harness.run_editor(pipe, sources, instructions, steps=steps, seed=seed, desc=name)
        scores = harness.oracle_scores(sources, edits, outputs, world_cfg)
        metrics.update(harness.mean_scores(scores, f"models.{name}", n_boot=n_boot, seed=seed))
        metrics.update({f"models.{name}.per_type.{t}": v for t, v in harness.per_type(scores, edits).items()})
    if "teacher" in present:
        teacher = load_pipeline(folder / "teacher", as_teacher=True)
        hits, _ = harness.caption_hits(teacher, [e.source for e in edits], world_cfg, steps=steps,
                                       guidance=guidance, seed=seed)
        metrics.update(bootstrap_ci(np.asarray(hits, float), n_boot=n_boot, seed=seed).as_metrics("models.teacher.caption_match"))
    if "judge" in present:
        judge = VLMJudge.from_pretrained(folder / "judge").freeze()
        cfg = standin_judge.JudgeConfig.for_profile("tiny", seed=seed, world=world_cfg.to_dict())
        held = standin_judge.evaluate_pool(judge, standin_judge.build_pool(cfg, cfg.eval_size, seed=cfg.seed + 20_000))
        metrics.update({f"judge.{key}": value for key, value in held.items()})
    return metrics
