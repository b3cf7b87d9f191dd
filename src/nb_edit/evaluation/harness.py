"""The evaluation harness: any editor on any benchmark, scored by the oracle and by the judge.

Benchmarks (the issue's four): :func:`shapes_benchmark` (the ShapesWorld test split, truth known),
:func:`multiturn_benchmark` (the held-out instruction sequences), :func:`real_photo_benchmark`
(Real-Edit-style photos, judge only) and :func:`folder_benchmark` (a user's folder in the format
of ``data/README.md``; oracle metrics when its records carry ``edit_json``, target L1 when they
carry targets). :func:`evaluate` runs any pipeline with ``edit(sources, instructions, steps=,
seed=, guidance=)`` on any of them and returns an :class:`EvalResult`: per-item figures, their
means and percentile-bootstrap intervals over items (``stats.bootstrap_ci``).

Per-item figures (:func:`score_outputs`):

* oracle, where the truth is known: ``oracle_followed``, ``oracle_preserved``, ``oracle_quality``,
  ``oracle_success`` (``world.judge``);
* ``untouched_l1``: mean ``|output - source|`` on the [-1, 1] scale over the pixels the edit does
  not touch (the complement of ``Edit.region``, the pixels where the true source and target
  renders differ): EdiVal's consistency L1, the figure MT-EditFlow reports as consistency. NaN
  where the edit touches every pixel; ``target_l1`` the same distance to a reference target;
* judge (:func:`judge_scores`), VIEScore-like (Ku et al., VIEScore, Sec. 3): semantic consistency
  ``SC = min(alpha_i)`` over the sub-scores "instruction followed" and "nothing else changed",
  perceptual quality ``PQ = min(beta_j)`` (here the one quality score), overall
  ``O = sqrt(SC * PQ)``, all on 0-10 (the judge's 0-5 scores times 2). Real-Edit-like
  (Multi-Reward Sec. 5): per perspective the share of "yes" and the mean 0-5 score.

Other helpers: ``run_editor`` (batched edits with a progress bar), ``oracle_scores``,
``judge_agreement`` (how often the judge agrees with the oracle) and ``caption_match`` (does a
teacher draw its caption?), used by notebooks 03-06; :func:`editor_fn` and :func:`judge_fn`
adapt a pipeline and a judge to the interactive editor (``widgets.EditorApp``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from nb_edit import world
from nb_edit.core.images import to_tensor
from nb_edit.core.paths import OutsideFolderError
from nb_edit.core.validation import BadInputError, SkipCounter
from nb_edit.data.real_photos import load_real_edit
from nb_edit.data.schema import RecordError
from nb_edit.data.sequences import edit_from_json, sequences_from
from nb_edit.data.store import read_dataset
from nb_edit.evaluation.stats import Interval, bootstrap_ci, spearman
from nb_edit.rewards.single_turn import multi_perspective

ORACLE_KEYS = ("oracle_followed", "oracle_preserved", "oracle_quality", "oracle_success")
# The item lists a run scores its editors on, named for ``runs.record_items``: the held-out test
# edits of ``data["test"]`` (notebooks 03, 05, 06) and the held-out multi-turn sequences (07). Two
# figures are compared item by item only when they were scored on the same list.
TEST_ITEMS = "shapes.test"
MULTITURN_ITEMS = "multiturn.test"
QUALITY_YES = 3.5  # a 0-5 quality score at or above this counts as "yes" (rewards.QUALITY_THRESHOLD)


def test_edits(dataset) -> list[world.Edit]:
    """The ground-truth edits of a ShapesWorld dataset (records keep them as ``edit_json``)."""
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


def verdict_labels(scores: dict[str, np.ndarray], prefix: str = "") -> list[str]:
    """The oracle's verdict on each output (``oracle_scores``, or an ``EvalResult.per_item`` with
    ``prefix="oracle_"``), in words short enough to print under an image: "success" (followed and
    preserved), or what failed ("not followed", "rest changed", or both on two lines)."""
    failures = (("followed", "not followed"), ("preserved", "rest changed"))
    success = scores[f"{prefix}success"]
    return ["success" if success[i] > 0.5 else
            "\n".join(words for key, words in failures if scores[f"{prefix}{key}"][i] <= 0.5)
            for i in range(len(success))]


def mean_scores(scores: dict[str, np.ndarray], prefix: str, n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """``{prefix.oracle_<key>: mean, ....ci_low, ....ci_high}``: each oracle figure with its 95%
    percentile-bootstrap interval over the test items."""
    out = {}
    for key, values in scores.items():
        out.update(bootstrap_ci(np.asarray(values, dtype=float), n_boot=n_boot, seed=seed).as_metrics(
            f"{prefix}.oracle_{key}"))
    return out


def per_type(scores: dict[str, np.ndarray], edits: Sequence[world.Edit], key: str = "success") -> dict[str, float]:
    types = np.array([e.edit_type for e in edits])
    return {t: float(scores[key][types == t].mean()) for t in sorted(set(types))}


class CopyEditor:
    """The baseline beside every editor: its output is its input, unchanged.

    It preserves everything and follows no instruction (except "do nothing"), so an editor's
    success means something only above the copy's. Takes the same arguments as
    ``EditPipeline.edit`` and ignores all but the sources.
    """

    def edit(self, sources, instructions: Sequence[str], steps: int = 4, seed: int = 0, guidance: float = 1.0,
             **_ignored: Any) -> np.ndarray:
        sources = np.asarray(sources)
        if sources.ndim != 4 or sources.shape[-1] != 3 or sources.dtype != np.uint8 or len(instructions) != len(sources):
            raise BadInputError("CopyEditor.edit(sources, instructions)", f"got sources {sources.shape} "
                                f"{sources.dtype} and {len(instructions)} instructions",
                                "pass uint8 images (N, H, W, 3) and one instruction each")
        return sources.copy()


@torch.no_grad()
def judge_agreement(reward, sources: np.ndarray, edits: Sequence[world.Edit], outputs: np.ndarray,
                    oracle: dict[str, np.ndarray], batch: int = 64, items: bool = False):
    """Accuracy of the judge's yes/no (P(yes) > 0.5) against the oracle, and Spearman of quality.

    With ``items``, also the per-edit ``judge_minus_oracle_followed`` (1: the judge says followed
    where the oracle does not, -1: the other way round, 0: they agree), for paired tests."""
    followed, preserved, quality = [], [], []
    for start in range(0, len(sources), batch):
        chunk = slice(start, start + batch)
        out = reward(to_tensor(sources[chunk]), [e.instruction for e in edits[chunk]], to_tensor(outputs[chunk]),
                     edit_types=[e.edit_type for e in edits[chunk]])
        followed.append(out["followed"].float().numpy())
        preserved.append(out["preserved"].float().numpy())
        quality.append(out["quality"].float().numpy())
    followed, preserved, quality = map(np.concatenate, (followed, preserved, quality))
    summary = {"acc_followed": float(np.mean((followed > 0.5) == (oracle["followed"] > 0.5))),
               "acc_preserved": float(np.mean((preserved > 0.5) == (oracle["preserved"] > 0.5))),
               "score_spearman": float(spearman(quality, oracle["quality"])),
               "judge_followed": float(np.mean(followed > 0.5)), "judge_preserved": float(np.mean(preserved > 0.5))}
    if not items:
        return summary
    gap = (followed > 0.5).astype(float) - (np.asarray(oracle["followed"]) > 0.5).astype(float)
    return summary, {"judge_minus_oracle_followed": gap}


def caption_hits(teacher_pipeline, scenes: Sequence[world.Scene], cfg: world.WorldConfig, steps: int = 4,
                 guidance: float = 1.0, seed: int = 0, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Per scene, 1.0 when the teacher's sample of its caption parses back to that caption (else
    0.0), and the samples."""
    captions = [world.caption(s) for s in scenes]
    images = np.concatenate([teacher_pipeline.generate(captions[i: i + batch], cfg.resolution, steps=steps,
                                                       seed=seed + i, guidance=guidance)
                             for i in range(0, len(captions), batch)])
    hits = np.array([world.caption(world.parse(img, cfg).scene) == cap for img, cap in zip(images, captions)], float)
    return hits, images


def caption_match(teacher_pipeline, scenes: Sequence[world.Scene], cfg: world.WorldConfig, steps: int = 4,
                  guidance: float = 1.0, seed: int = 0, batch: int = 64) -> tuple[float, np.ndarray]:
    """Share of teacher samples whose parsed scene has the caption they were drawn from."""
    hits, images = caption_hits(teacher_pipeline, scenes, cfg, steps, guidance, seed, batch)
    return float(np.mean(hits)), images


# ----------------------------------------------------------------------------------- benchmarks
@dataclass
class Benchmark:
    """Sources and instructions of one single-turn benchmark, with the truth where it is known.

    ``edits`` (ShapesWorld truth) enable the oracle metrics and ``untouched_l1``; ``targets``
    (reference outputs) enable ``target_l1``. ``edit_types`` are "" where unknown.
    """

    name: str
    ids: list[str]
    sources: np.ndarray
    instructions: list[str]
    edit_types: list[str]
    edits: list[world.Edit] | None = None
    targets: np.ndarray | None = None
    world_cfg: world.WorldConfig | None = None
    skipped: int = 0  # unreadable samples left out (counted by the dataset's SkipCounter)

    def __post_init__(self):
        self.sources = np.asarray(self.sources)
        n = len(self.ids)
        sizes = {"sources": len(self.sources), "instructions": len(self.instructions),
                 "edit_types": len(self.edit_types)}
        if self.edits is not None:
            sizes["edits"] = len(self.edits)
        if self.targets is not None:
            sizes["targets"] = len(self.targets)
        if n == 0 or any(size != n for size in sizes.values()):
            raise BadInputError(f"benchmark {self.name!r}", f"has {n} ids and sizes {sizes}",
                                "give one source, instruction and edit type (and edit / target) per id")
        if self.sources.dtype != np.uint8 or self.sources.ndim != 4 or self.sources.shape[-1] != 3:
            raise BadInputError(f"benchmark {self.name!r} sources", f"dtype {self.sources.dtype} shape "
                                f"{self.sources.shape}", "pass uint8 images (N, H, W, 3) of one size")

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class MultiTurnBenchmark:
    """Held-out instruction sequences (``methods.mtrl.train.TurnSequence``: source, instructions, edits)."""

    name: str
    sequences: list
    world_cfg: world.WorldConfig

    def __len__(self) -> int:
        return len(self.sequences)


def shapes_benchmark(dataset, cfg: world.WorldConfig | None = None, name: str = "shapes") -> Benchmark:
    """The ShapesWorld test split: sources rendered from the true edits, targets their true renders."""
    cfg = cfg or world.WorldConfig()
    edits = test_edits(dataset)
    return Benchmark(name, [r.id for r in dataset], render_sources(edits, cfg), [e.instruction for e in edits],
                     [e.edit_type for e in edits], edits, np.stack([world.render(e.target, cfg) for e in edits]),
                     cfg)


def multiturn_benchmark(dataset, n_turns: int | None = None, cfg: world.WorldConfig | None = None,
                        name: str = "multiturn") -> MultiTurnBenchmark:
    """The multi-turn test sequences (``shapesworld(settings)["multiturn"].split("test")``)."""

    cfg = cfg or world.WorldConfig()
    return MultiTurnBenchmark(name, sequences_from(dataset, n_turns, cfg), cfg)


def _samples_benchmark(name: str, samples: Sequence[Mapping[str, Any]], skipped: int,
                       cfg: world.WorldConfig) -> Benchmark:
    if not samples:
        raise BadInputError(f"benchmark {name!r}", "holds no readable sample",
                            "check the folder against data/README.md (metadata file, image paths)")
    edits = None
    if all(s.get("edit_json") for s in samples):  # ShapesWorld truth for every record: the oracle applies
        edits = [s["edit"] if s.get("edit") is not None else edit_from_json(s["id"], s["edit_json"], cfg)
                 for s in samples]
    targets = np.stack([s["target"] for s in samples]) if all(s.get("target") is not None for s in samples) else None
    return Benchmark(name, [str(s["id"]) for s in samples], np.stack([s["source"] for s in samples]),
                     [s["instruction"] for s in samples], [s.get("edit_type") or "" for s in samples], edits,
                     targets, cfg, skipped)


def real_photo_benchmark(resolution: int = 32, fit: str = "crop", categories: Sequence[str] | None = None,
                         name: str = "real_photos") -> Benchmark:
    """The Real-Edit-style photos (``data.real_photos``): no truth, scored by the judge."""

    samples = load_real_edit(resolution, fit, categories)
    return _samples_benchmark(name, samples, 0, world.WorldConfig(resolution=resolution))


def folder_benchmark(folder: str | PathLike, split: str | None = None, resolution: int = 32, fit: str = "crop",
                     name: str = "folder", counter: SkipCounter | None = None) -> Benchmark:
    """A user's folder in the format of ``data/README.md`` (``store.read_dataset``).

    Rows that do not validate, images that do not load (``unreadable_image``) or whose names
    leave the folder (``path_outside_dataset``), and an ``edit_json`` that is not a ShapesWorld
    edit (``invalid_edit_json``) are skipped and counted in ``counter`` (default: ``SkipCounter``'s
    limits, named after the folder) and in ``Benchmark.skipped``. Past the counter's threshold
    the benchmark raises ``TooManyBadSamples`` rather than score the few items left.
    """
    if fit not in ("crop", "pad"):  # checked here, or every sample would be skipped for it
        raise BadInputError(f"fit={fit!r}", "unknown resize mode", "use fit='crop' or fit='pad'")
    folder = Path(folder)
    cfg = world.WorldConfig(resolution=resolution)
    counter = counter if counter is not None else SkipCounter(name=f"benchmark folder {folder}")
    dataset = read_dataset(folder, split=split, counter=counter)
    samples = []
    for index, record in enumerate(dataset):
        # read_dataset counted these rows good; a sample found bad now is moved to skipped
        try:
            sample = dataset.load(index, size=resolution, fit=fit)
            if record.edit_json:
                sample["edit"] = edit_from_json(record.id, record.edit_json, cfg)
        except OutsideFolderError as error:
            counter.retract("path_outside_dataset", str(error))
        except RecordError as error:
            counter.retract("invalid_edit_json", str(error))
        except BadInputError as error:
            counter.retract("unreadable_image", f"record {record.id!r}: {error}")
        else:
            samples.append(sample)
    counter.finish()
    return _samples_benchmark(name, samples, counter.skipped, cfg)


# ----------------------------------------------------------------------------------- scoring
def _no_failure_texts(**inputs) -> list[dict[str, str]]:
    """multi_perspective's failure texts are not part of the evaluation: skip their questions."""
    return [{} for _ in inputs["instructions"]]


@torch.no_grad()
def judge_scores(reward, sources: np.ndarray, instructions: Sequence[str], outputs: np.ndarray,
                 edit_types: Sequence[str | None] | None = None, batch: int = 64) -> dict[str, np.ndarray]:
    """Per-item judge figures of (source, instruction, output) with a ``rewards.single_turn.JudgeReward``.

    * ``following_p`` / ``preserving_p``: P("yes") of NP-Edit's verification and identity questions;
      ``following_yes`` / ``preserving_yes`` those above 0.5 (Real-Edit's yes share);
    * ``following_score``, ``preserving_score``, ``quality_score``: the three 0-5 scores of
      ``rewards.single_turn.multi_perspective``; ``quality_yes``: quality score >= 3.5 (the judge has no yes/no
      quality question; 3.5 is where the reward annotation writes a quality failure);
    * VIEScore (Ku et al., Sec. 3), on 0-10: ``viescore_sc = 2 min(following, preserving)``,
      ``viescore_pq = 2 quality``, ``viescore_overall = sqrt(SC * PQ)``.

    A judge failure (NaN score) stays NaN; :func:`summarize` drops and counts it.
    """

    types = [t or None for t in (edit_types if edit_types is not None else [None] * len(instructions))]
    columns: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(sources), batch):
        chunk = slice(start, start + batch)
        src, out, ins = to_tensor(sources[chunk]), to_tensor(outputs[chunk]), list(instructions[chunk])
        logits = reward.question_logits(src, out, ins, types[chunk])
        scores = multi_perspective(reward, src, ins, out, types[chunk], failure_text_fn=_no_failure_texts)
        part = {"following_p": torch.sigmoid(logits["verify_target"] - logits["verify_other"]),
                "preserving_p": torch.sigmoid(logits["identity_target"] - logits["identity_other"]),
                "following_score": scores["following"], "preserving_score": scores["preserving"],
                "quality_score": scores["quality"]}
        for key, value in part.items():
            columns.setdefault(key, []).append(value.detach().float().cpu().numpy().astype(np.float64))
    out = {key: np.concatenate(parts) for key, parts in columns.items()}
    with np.errstate(invalid="ignore"):  # NaN (judge failures) compare False; kept NaN below
        for name in ("following", "preserving"):
            out[f"{name}_yes"] = np.where(np.isnan(out[f"{name}_p"]), np.nan, out[f"{name}_p"] > 0.5)
        out["quality_yes"] = np.where(np.isnan(out["quality_score"]), np.nan, out["quality_score"] >= QUALITY_YES)
    out["viescore_sc"] = 2.0 * np.minimum(out["following_score"], out["preserving_score"])  # min over SC sub-scores
    out["viescore_pq"] = 2.0 * out["quality_score"]
    out["viescore_overall"] = np.sqrt(out["viescore_sc"] * out["viescore_pq"])  # VIEScore O = sqrt(SC * PQ)
    return out


def untouched_l1(sources: np.ndarray, outputs: np.ndarray, edits: Sequence[world.Edit]) -> np.ndarray:
    """Per item, mean ``|output - source|`` on [-1, 1] over the pixels outside ``Edit.region``; NaN
    where the edit touches every pixel (a style change)."""
    values = np.full(len(edits), np.nan)
    for i, (source, output, edit) in enumerate(zip(sources, outputs, edits)):
        untouched = ~edit.region
        if untouched.any():
            diff = np.abs(output.astype(np.float32) - source.astype(np.float32)) / 127.5
            values[i] = float(diff[untouched].mean())
    return values


def summarize(per_item: Mapping[str, np.ndarray], n_boot: int = 1000, seed: int = 0,
              ci: float = 0.95) -> tuple[dict[str, Interval], dict[str, int]]:
    """Percentile-bootstrap interval of the mean of every per-item figure (``stats.bootstrap_ci``).

    NaN items (judge failures, edits without untouched pixels) are dropped and their number
    returned per figure; a figure with no finite item gets no interval.
    """
    intervals, dropped = {}, {}
    for key, values in per_item.items():
        values = np.asarray(values, dtype=np.float64)
        finite = values[np.isfinite(values)]
        dropped[key] = int(values.size - finite.size)
        if finite.size:
            intervals[key] = bootstrap_ci(finite, n_boot=n_boot, ci=ci, seed=seed)
    return intervals, dropped


@dataclass
class EvalResult:
    """One editor on one benchmark: per-item figures, their bootstrap intervals and the outputs.

    ``outputs`` are the edited images (N, H, W, 3); for a multi-turn benchmark the chains
    (N, turns + 1, H, W, 3), source first. ``summary`` holds every mean, including figures that
    have no per-item form (multi-turn marginal success).
    """

    method: str
    benchmark: str
    per_item: dict[str, np.ndarray]
    intervals: dict[str, Interval]
    dropped: dict[str, int]
    summary: dict[str, float]
    outputs: np.ndarray
    edit_types: list[str] = field(default_factory=list)

    def mean(self, key: str) -> float:
        if key not in self.summary:
            raise BadInputError(f"metric {key!r}", f"not measured for {self.method} on {self.benchmark}",
                                f"choose one of {sorted(self.summary)}")
        return self.summary[key]

    def per_type(self, key: str = "oracle_success") -> dict[str, float]:
        """The mean of ``key`` per edit type (NaN items left out)."""
        if key not in self.per_item:
            raise BadInputError(f"metric {key!r}", f"has no per-item values for {self.method} on {self.benchmark}",
                                f"choose one of {sorted(self.per_item)}")
        values, types = np.asarray(self.per_item[key], dtype=float), np.array(self.edit_types)
        return {t: float(np.nanmean(values[types == t])) for t in sorted(set(self.edit_types))
                if np.isfinite(values[types == t]).any()}

    def metrics(self, prefix: str, keys: Sequence[str] | None = None) -> dict[str, float]:
        """``{prefix.key: mean, prefix.key.ci_low: .., prefix.key.ci_high: ..}`` for the run's metrics."""
        out = {}
        for key in keys if keys is not None else list(self.summary):
            if key not in self.summary or not np.isfinite(self.summary[key]):
                continue  # not measured on this benchmark (oracle figures on photos), or undefined (NaN)
            out[f"{prefix}.{key}"] = self.summary[key]
            if key in self.intervals:
                out.update({name: value for name, value in self.intervals[key].as_metrics(f"{prefix}.{key}").items()
                            if name != f"{prefix}.{key}"})  # the bounds; the mean is the summary's
        return out


def judge_accuracy(result: EvalResult, n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """How often the judge's yes/no agrees with the oracle on one editor's outputs (``result`` of
    :func:`evaluate` with a reward, on a benchmark with the truth): ``acc_followed`` /
    ``acc_preserved`` with their 95% bootstrap intervals over items (``.ci_low`` / ``.ci_high``), beside ``constant_followed`` / ``constant_preserved``, what the better
    constant answer scores on the same outputs (a judge below it has learnt nothing about them)."""
    out: dict[str, float] = {}
    for question, judged_key, truth_key in (("followed", "following_yes", "oracle_followed"),
                                            ("preserved", "preserving_yes", "oracle_preserved")):
        if judged_key not in result.per_item or truth_key not in result.per_item:
            raise BadInputError(f"{result.method} on {result.benchmark}", f"has no {judged_key} or {truth_key}",
                                "evaluate with a reward on a benchmark whose edits the oracle knows")
        judged, truth = np.asarray(result.per_item[judged_key], float), np.asarray(result.per_item[truth_key], float)
        keep = np.isfinite(judged) & np.isfinite(truth)
        yes_rate = float(np.mean(truth[keep] > 0.5))
        agree = ((judged[keep] > 0.5) == (truth[keep] > 0.5)).astype(float)
        out.update(bootstrap_ci(agree, n_boot=n_boot, seed=seed).as_metrics(f"acc_{question}"))
        out[f"constant_{question}"] = max(yes_rate, 1.0 - yes_rate)
    return out


def score_outputs(bench: Benchmark, outputs: np.ndarray, reward=None, method: str = "outputs", n_boot: int = 1000,
                  seed: int = 0, batch: int = 64) -> EvalResult:
    """Score given outputs on ``bench``: oracle and untouched L1 where the truth is known, target L1
    where targets are, judge figures when ``reward`` (a ``rewards.single_turn.JudgeReward``) is given."""
    outputs = np.asarray(outputs)
    if outputs.shape != bench.sources.shape or outputs.dtype != np.uint8:
        raise BadInputError("outputs", f"dtype {outputs.dtype} shape {outputs.shape}, expected uint8 "
                            f"{bench.sources.shape}", "pass one edited uint8 image per benchmark item")
    per_item: dict[str, np.ndarray] = {}
    if bench.edits is not None:
        oracle = oracle_scores(bench.sources, bench.edits, outputs, bench.world_cfg or world.WorldConfig())
        per_item.update({f"oracle_{k}": v for k, v in oracle.items()})
        per_item["untouched_l1"] = untouched_l1(bench.sources, outputs, bench.edits)
    if bench.targets is not None:
        diff = np.abs(outputs.astype(np.float32) - bench.targets.astype(np.float32)) / 127.5
        per_item["target_l1"] = diff.reshape(len(outputs), -1).mean(axis=1).astype(np.float64)
    if reward is not None:
        per_item.update(judge_scores(reward, bench.sources, bench.instructions, outputs, bench.edit_types, batch))
    intervals, dropped = summarize(per_item, n_boot, seed)
    summary = {key: float(np.nanmean(v)) for key, v in per_item.items() if np.isfinite(v).any()}
    return EvalResult(method, bench.name, per_item, intervals, dropped, summary, outputs, list(bench.edit_types))


def multiturn_outcomes(pipeline, sequences: Sequence, world_cfg: world.WorldConfig, steps: int = 4, seed: int = 0,
                       n_turns: int | None = None, **edit_kwargs: Any) -> dict[str, np.ndarray]:
    """Each sequence edited turn after turn, every turn on the pipeline's own previous output.

    Returns per (sequence, turn) the oracle's ``success``, ``followed``, ``preserved`` and the
    ``untouched_l1`` of that turn (NaN where the edit touches every pixel), and the ``chains``
    (N, turns + 1, H, W, 3), source first. Turn t is judged against its own input and its true edit.
    """
    n_turns = n_turns or min(len(s.instructions) for s in sequences)
    if any(s.edits is None for s in sequences):
        raise ValueError("multi-turn evaluation needs the true edits of every turn (ShapesWorld records with "
                         "edit_json).")
    inputs = np.stack([s.source for s in sequences])
    chains = [inputs]
    shape = (len(sequences), n_turns)
    success, followed, preserved = np.zeros(shape, bool), np.zeros(shape, bool), np.zeros(shape, bool)
    l1 = np.full(shape, np.nan)
    for turn in range(n_turns):
        outputs = run_editor(pipeline, inputs, [s.instructions[turn] for s in sequences], steps=steps,
                             seed=seed + 7919 * turn, desc=f"turn {turn + 1}", **edit_kwargs)
        for i, (seq, before, after) in enumerate(zip(sequences, inputs, outputs)):
            verdict = world.judge(before, seq.edits[turn], after, world_cfg)
            success[i, turn], followed[i, turn] = verdict.success, verdict.followed
            preserved[i, turn] = verdict.preserved
        l1[:, turn] = untouched_l1(inputs, outputs, [s.edits[turn] for s in sequences])
        chains.append(outputs)
        inputs = outputs  # the next turn edits this turn's own output
    return {"success": success, "followed": followed, "preserved": preserved, "untouched_l1": l1,
            "chains": np.stack(chains, axis=1)}


def multiturn_items(outcomes: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The per-sequence scores behind :func:`multiturn_summary`'s figures (their means are those
    figures): ``turn{k}_success`` (turns 1..k all succeeded), ``turn{k}_task_success`` and
    ``consistency`` (the sequence's share of preserved turns)."""
    success = np.asarray(outcomes["success"], dtype=bool)
    so_far = np.cumprod(success, axis=1).astype(float)
    items = {"consistency": np.asarray(outcomes["preserved"], dtype=float).mean(axis=1)}
    for k in range(success.shape[1]):
        items[f"turn{k + 1}_success"] = so_far[:, k]
        items[f"turn{k + 1}_task_success"] = success[:, k].astype(float)
    return items


def multiturn_summary(outcomes: Mapping[str, np.ndarray]) -> dict[str, float]:
    """EdiVal-style figures (MT-EditFlow's metrics) from :func:`multiturn_outcomes`.

    ``turn{k}_success``: share of sequences whose turns 1..k ALL succeeded; ``turn{k}_task_success``:
    whose turn k succeeded; ``marginal_success_turn{k}``: success at turn k given turns 1..k-1
    succeeded (NaN if none did); ``consistency``: the oracle's preserved share over all turns;
    ``consistency_l1``: mean untouched L1 over the (sequence, turn) pairs that have untouched
    pixels; ``followed``: the oracle's followed share.
    """
    success = outcomes["success"]
    so_far = np.cumprod(success, axis=1).astype(bool)
    l1 = outcomes["untouched_l1"].T  # turn-major, the order the pairs were visited in
    finite = l1[np.isfinite(l1)]
    result: dict[str, float] = {"n_sequences": float(len(success)), "consistency": float(outcomes["preserved"].mean()),
                                "consistency_l1": float(np.mean(finite)) if finite.size else float("nan"),
                                "followed": float(outcomes["followed"].mean())}
    for k in range(success.shape[1]):
        result[f"turn{k + 1}_success"] = float(so_far[:, k].mean())
        result[f"turn{k + 1}_task_success"] = float(success[:, k].mean())
        if k:
            before = so_far[:, k - 1].sum()
            result[f"marginal_success_turn{k + 1}"] = float(so_far[:, k].sum() / before) if before else float("nan")
    return result


def evaluate(pipeline, bench: Benchmark | MultiTurnBenchmark, reward=None, method: str = "editor", steps: int = 4,
             seed: int = 0, guidance: float = 1.0, n_boot: int = 1000, batch: int = 64,
             **edit_kwargs: Any) -> EvalResult:
    """Evaluate any editor pipeline on any benchmark (see the module doc); the same seed gives the
    same outputs. ``edit_kwargs`` go to ``pipeline.edit`` (e.g. a Multi-Reward editor's ``scores``).

    On a :class:`MultiTurnBenchmark` the oracle scores every turn (``reward`` is not asked) and the
    per-item figures are per sequence: ``turn{k}_success`` (0/1), ``turn{k}_task_success``,
    ``consistency`` and ``followed`` (shares over its turns), with intervals over sequences;
    ``summary`` adds :func:`multiturn_summary`'s figures.
    """
    if isinstance(bench, MultiTurnBenchmark):
        outcomes = multiturn_outcomes(pipeline, bench.sequences, bench.world_cfg, steps=steps, seed=seed,
                                      guidance=guidance, **edit_kwargs)
        so_far = np.cumprod(outcomes["success"], axis=1)
        per_item = {"consistency": outcomes["preserved"].mean(axis=1).astype(float),
                    "followed": outcomes["followed"].mean(axis=1).astype(float)}
        for k in range(so_far.shape[1]):
            per_item[f"turn{k + 1}_success"] = so_far[:, k].astype(float)
            per_item[f"turn{k + 1}_task_success"] = outcomes["success"][:, k].astype(float)
        intervals, dropped = summarize(per_item, n_boot, seed)
        return EvalResult(method, bench.name, per_item, intervals, dropped, multiturn_summary(outcomes),
                          outcomes["chains"])
    if not isinstance(bench, Benchmark):
        raise BadInputError("bench", f"a {type(bench).__name__}", "build one with shapes_benchmark, "
                            "multiturn_benchmark, real_photo_benchmark or folder_benchmark")
    outputs = run_editor(pipeline, bench.sources, bench.instructions, steps=steps, seed=seed, batch=batch,
                         guidance=guidance, desc=f"{method} on {bench.name}", **edit_kwargs)
    return score_outputs(bench, outputs, reward, method, n_boot, seed, batch)


def results_markdown(results: Sequence[EvalResult], keys: Sequence[str], digits: int = 3) -> str:
    """A markdown table, one row per result: ``mean [low, high]`` of each key (bootstrap, 95%)."""
    lines = ["| method | " + " | ".join(f"`{k}`" for k in keys) + " |", "|---|" + "---|" * len(keys)]
    for result in results:
        cells = []
        for key in keys:
            if key in result.intervals:
                iv = result.intervals[key]
                mean = result.summary.get(key, iv.mean)
                cells.append(f"{mean:.{digits}f} [{iv.low:.{digits}f}, {iv.high:.{digits}f}]")
            elif key in result.summary and np.isfinite(result.summary[key]):
                cells.append(f"{result.summary[key]:.{digits}f}")
            else:
                cells.append("–")
        lines.append(f"| {result.method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_type_markdown(results: Sequence[EvalResult], key: str = "oracle_success", digits: int = 2) -> str:
    """A markdown table of ``key`` per edit type (columns, in the world's order) for each result."""
    seen = {t for result in results for t in result.edit_types}
    types = [t for t in world.EDIT_TYPES if t in seen] + sorted(seen - set(world.EDIT_TYPES))
    lines = ["| method | " + " | ".join(types) + " |", "|---|" + "---|" * len(types)]
    for result in results:
        per = result.per_type(key)
        lines.append(f"| {result.method} | " + " | ".join(f"{per[t]:.{digits}f}" if t in per else "–"
                                                         for t in types) + " |")
    return "\n".join(lines)


def examples_per_type(edit_types: Sequence[str], per_type: int = 1) -> list[int]:
    """Indices of the first ``per_type`` items of every edit type, in the world's type order."""
    order = [t for t in world.EDIT_TYPES if t in edit_types] + sorted(set(edit_types) - set(world.EDIT_TYPES))
    return [i for t in order for i in [j for j, u in enumerate(edit_types) if u == t][:per_type]]


# ------------------------------------------------------------------------ the interactive editor
def editor_fn(pipeline, seed: int = 0, guidance: float = 1.0,
              **edit_kwargs: Any) -> Callable[[np.ndarray, str, int], np.ndarray]:
    """``(source uint8 (H, W, 3), instruction, steps) -> edited`` for ``widgets.EditorApp``."""
    def edit(source: np.ndarray, instruction: str, steps: int) -> np.ndarray:
        return pipeline.edit(source[None], [instruction], steps=int(steps), seed=seed, guidance=guidance,
                             **edit_kwargs)[0]
    return edit


JUDGE_FN_KEYS = {"following_p": "followed, P(yes)", "preserving_p": "preserved, P(yes)",
                 "following_score": "following (0-5)", "preserving_score": "preserving (0-5)",
                 "quality_score": "quality (0-5)", "viescore_sc": "VIEScore SC (0-10)",
                 "viescore_pq": "VIEScore PQ (0-10)", "viescore_overall": "VIEScore overall (0-10)"}


def judge_fn(reward, edit_type: str | None = None) -> Callable[[np.ndarray, str, np.ndarray], dict[str, float]]:
    """``(source, instruction, edited) -> {score name: value}`` (:func:`judge_scores` of one item)."""
    def judge(source: np.ndarray, instruction: str, edited: np.ndarray) -> dict[str, float]:
        scores = judge_scores(reward, source[None], [instruction], edited[None], [edit_type])
        return {label: float(scores[key][0]) for key, label in JUDGE_FN_KEYS.items()}
    return judge
