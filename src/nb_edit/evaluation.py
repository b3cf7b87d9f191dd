"""The evaluation harness: any editor on a benchmark, scored by the oracle and by the judge.

* ``run_editor`` edits a batch of sources with a pipeline (few-step sampling, progress bar);
* ``oracle_scores`` judges outputs against the truth (followed, preserved, quality, success);
* ``judge_agreement`` measures how often the VLM judge agrees with the oracle on the same
  outputs (accuracy of its yes/no answers, Spearman of its quality score);
* ``caption_match`` checks a text-to-image teacher: does the parsed sample show what its
  caption says?
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from nb_edit import world
from nb_edit.images import to_tensor
from nb_edit.stats import spearman


def test_edits(dataset) -> list[world.Edit]:
    """The ground-truth edits of a ShapesWorld dataset (records keep them as ``edit_json``)."""
    import json

    missing = [r.id for r in dataset if not r.edit_json]
    if missing:
        raise ValueError(f"records {missing[:3]} carry no edit_json; oracle metrics need ShapesWorld records.")
    return [world.Edit.from_dict(json.loads(r.edit_json)) for r in dataset]


def render_sources(edits: Sequence[world.Edit], cfg: world.WorldConfig) -> np.ndarray:
    return np.stack([world.render(e.source, cfg) for e in edits])


def run_editor(pipeline, sources: np.ndarray, instructions: Sequence[str], steps: int = 4, seed: int = 0,
               batch: int = 64, guidance: float = 1.0, desc: str = "edit", **edit_kwargs: Any) -> np.ndarray:
    """Edit ``sources`` (uint8 (N, H, W, 3)) in batches; the same seed gives the same outputs."""
    outputs = []
    for start in tqdm(range(0, len(sources), batch), desc=desc, leave=False):
        chunk = slice(start, start + batch)
        outputs.append(pipeline.edit(sources[chunk], list(instructions[chunk]), steps=steps, seed=seed + start,
                                     guidance=guidance, **edit_kwargs))
    return np.concatenate(outputs)


def oracle_scores(sources: np.ndarray, edits: Sequence[world.Edit], outputs: np.ndarray,
                  cfg: world.WorldConfig) -> dict[str, np.ndarray]:
    verdicts = [world.judge(s, e, o, cfg) for s, e, o in zip(sources, edits, outputs)]
    return {"followed": np.array([v.followed for v in verdicts], dtype=float),
            "preserved": np.array([v.preserved for v in verdicts], dtype=float),
            "quality": np.array([v.quality for v in verdicts], dtype=float),
            "success": np.array([v.success for v in verdicts], dtype=float)}


def mean_scores(scores: dict[str, np.ndarray], prefix: str) -> dict[str, float]:
    return {f"{prefix}.oracle_{k}": float(np.mean(v)) for k, v in scores.items()}


def per_type(scores: dict[str, np.ndarray], edits: Sequence[world.Edit], key: str = "success") -> dict[str, float]:
    types = np.array([e.edit_type for e in edits])
    return {t: float(scores[key][types == t].mean()) for t in sorted(set(types))}


@torch.no_grad()
def judge_agreement(reward, sources: np.ndarray, edits: Sequence[world.Edit], outputs: np.ndarray,
                    oracle: dict[str, np.ndarray], batch: int = 64) -> dict[str, float]:
    """Accuracy of the judge's yes/no (P(yes) > 0.5) against the oracle, and Spearman of quality."""
    followed, preserved, quality = [], [], []
    for start in range(0, len(sources), batch):
        chunk = slice(start, start + batch)
        out = reward(to_tensor(sources[chunk]), [e.instruction for e in edits[chunk]], to_tensor(outputs[chunk]),
                     edit_types=[e.edit_type for e in edits[chunk]])
        followed.append(out["followed"].float().numpy())
        preserved.append(out["preserved"].float().numpy())
        quality.append(out["quality"].float().numpy())
    followed, preserved, quality = map(np.concatenate, (followed, preserved, quality))
    return {"acc_followed": float(np.mean((followed > 0.5) == (oracle["followed"] > 0.5))),
            "acc_preserved": float(np.mean((preserved > 0.5) == (oracle["preserved"] > 0.5))),
            "score_spearman": float(spearman(quality, oracle["quality"])),
            "judge_followed": float(np.mean(followed > 0.5)), "judge_preserved": float(np.mean(preserved > 0.5))}


def caption_match(teacher_pipeline, scenes: Sequence[world.Scene], cfg: world.WorldConfig, steps: int = 4,
                  guidance: float = 1.0, seed: int = 0, batch: int = 64) -> tuple[float, np.ndarray]:
    """Share of teacher samples whose parsed scene has the caption they were drawn from."""
    captions = [world.caption(s) for s in scenes]
    images = np.concatenate([teacher_pipeline.generate(captions[i: i + batch], cfg.resolution, steps=steps,
                                                       seed=seed + i, guidance=guidance)
                             for i in range(0, len(captions), batch)])
    hits = [world.caption(world.parse(img, cfg).scene) == cap for img, cap in zip(images, captions)]
    return float(np.mean(hits)), images
