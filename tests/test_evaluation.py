"""The evaluation harness, the paper-claims table, the report and the cached editors of notebooks 05-07.

Editors here are stand-ins whose right answers are known: one copies the source (it never edits,
so nothing outside an edit changes and only "do nothing" succeeds), one renders the true target
(every edit succeeds). The judge is a stub with fixed answers, so every judge figure can be
computed by hand.
"""

from __future__ import annotations

import io
import json
import math

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

matplotlib.use("Agg")

from nb_edit import world  # noqa: E402
from nb_edit.core import paths, runs  # noqa: E402
from nb_edit.core.validation import BadInputError  # noqa: E402
from nb_edit.evaluation import claims, harness, report, stats  # noqa: E402
from nb_edit.methods import registry  # noqa: E402
from nb_edit.models.vlm import questions  # noqa: E402
from nb_edit.notebook import widgets  # noqa: E402

CFG = world.WorldConfig()


# ------------------------------------------------------------------------------- stand-ins
class CopyEditor:
    """Returns the source unchanged; records the steps it was asked for."""

    def __init__(self):
        self.calls = []

    def edit(self, sources, instructions, steps=4, seed=0, guidance=1.0, **kwargs):
        self.calls.append({"steps": steps, "seed": seed, "n": len(sources), **kwargs})
        return np.array(sources, dtype=np.uint8, copy=True)


class OracleEditor:
    """Renders the true target of every (source, instruction) it knows."""

    def __init__(self, pairs):
        self.truth = {(source.tobytes(), instruction): target for source, instruction, target in pairs}

    def edit(self, sources, instructions, steps=4, seed=0, guidance=1.0):
        return np.stack([self.truth[(s.tobytes(), i)] for s, i in zip(sources, instructions)])


class StubJudge:
    """A JudgeReward with fixed answers: P(followed) = sigmoid(2), P(preserved) = sigmoid(-1), and
    the scores following 4 (NaN, a judge failure, for an instruction containing "fail"),
    preserving 2, quality 4.5."""

    def question_logits(self, sources, outputs, instructions, edit_types=None, removed=None):
        n = len(instructions)
        return {"verify_target": torch.full((n,), 2.0), "verify_other": torch.zeros(n),
                "identity_target": torch.zeros(n), "identity_other": torch.ones(n)}

    def score(self, sources, outputs, question_list, values=range(0, 6)):
        def one(question: str) -> float:
            if "carry out the instruction , from 0 to 5" in question:  # questions.FOLLOWING_SCORE
                return float("nan") if "fail" in question else 4.0
            if "keep everything else" in question:  # questions.PRESERVING_SCORE
                return 2.0
            assert question == questions.QUALITY
            return 4.5
        return torch.tensor([one(q) for q in question_list])


def _edit_of_each_type(seed: int = 0) -> list[world.Edit]:
    rng = np.random.default_rng(seed)
    return [world.sample_edit_of_type(rng, CFG, kind) for kind in world.EDIT_TYPES]


@pytest.fixture(scope="module")
def bench() -> harness.Benchmark:
    edits = _edit_of_each_type()
    return harness.Benchmark("shapes", [f"e{i}" for i in range(len(edits))], harness.render_sources(edits, CFG),
                                [e.instruction for e in edits], [e.edit_type for e in edits], edits,
                                np.stack([world.render(e.target, CFG) for e in edits]), CFG)


def _oracle_for(bench) -> OracleEditor:
    return OracleEditor(zip(bench.sources, bench.instructions, bench.targets))


# ------------------------------------------------------------------------------- single turn
def test_copy_editor_changes_nothing_and_succeeds_only_at_doing_nothing(bench):
    editor = CopyEditor()
    result = harness.evaluate(editor, bench, method="copy", steps=3, seed=5, n_boot=200)
    assert editor.calls == [{"steps": 3, "seed": 5, "n": len(bench)}]
    types = np.array(bench.edit_types)
    success = result.per_item["oracle_success"]
    assert success[types == "noop"].tolist() == [1.0]
    assert success[types != "noop"].tolist() == [0.0] * (len(types) - 1)
    l1 = result.per_item["untouched_l1"]
    assert np.all(l1[np.isfinite(l1)] == 0.0)
    # an edit that touches every pixel has no untouched region: left out and counted
    assert np.isnan(l1).tolist() == [bool(e.region.all()) for e in bench.edits]
    assert result.dropped["untouched_l1"] == int(np.isnan(l1).sum())
    assert result.per_item["target_l1"][types == "noop"] == 0.0
    assert np.all(result.per_item["target_l1"][types != "noop"] > 0.0)
    assert result.summary["oracle_success"] == pytest.approx(1 / len(types))
    assert tuple(result.intervals["oracle_success"]) == tuple(stats.bootstrap_ci(success, n_boot=200, seed=5))
    assert result.per_type()["noop"] == 1.0 and result.per_type()["colour"] == 0.0
    assert "following_yes" not in result.per_item  # no judge given: no judge figures


def test_perfect_editor_succeeds_everywhere_and_keeps_untouched_pixels(bench):
    result = harness.evaluate(_oracle_for(bench), bench, method="oracle", n_boot=100)
    for key in ("oracle_success", "oracle_followed", "oracle_preserved"):
        assert result.per_item[key].tolist() == [1.0] * len(bench), key
        assert tuple(result.intervals[key]) == (1.0, 1.0, 1.0)
    assert np.nanmax(result.per_item["untouched_l1"]) == 0.0 and result.summary["target_l1"] == 0.0


def test_judge_figures_by_hand(bench):
    outputs = bench.sources.copy()
    instructions = list(bench.instructions)
    instructions[0] = "fail " + instructions[0]  # this item's following score is a judge failure (NaN)
    broken = harness.Benchmark("judged", bench.ids, bench.sources, instructions, bench.edit_types)
    result = harness.score_outputs(broken, outputs, StubJudge(), method="stub", n_boot=50)
    per = result.per_item
    assert per["following_p"][1] == pytest.approx(1 / (1 + math.exp(-2.0)))
    assert per["preserving_p"][1] == pytest.approx(1 / (1 + math.exp(1.0)))
    assert per["following_yes"][1] == 1.0 and per["preserving_yes"][1] == 0.0 and per["quality_yes"][1] == 1.0
    assert per["viescore_sc"][1] == pytest.approx(2 * min(4.0, 2.0))  # SC = min of its sub-scores, 0-10
    assert per["viescore_pq"][1] == pytest.approx(9.0)
    assert per["viescore_overall"][1] == pytest.approx(math.sqrt(4.0 * 9.0))  # O = sqrt(SC * PQ) = 6
    assert np.isnan(per["following_score"][0]) and np.isnan(per["viescore_overall"][0])
    assert per["viescore_pq"][0] == pytest.approx(9.0)  # the failure spoils SC and the overall, not PQ
    assert result.dropped["viescore_overall"] == 1 and result.dropped["following_yes"] == 0
    assert result.summary["viescore_overall"] == pytest.approx(6.0)
    assert "oracle_success" not in per and "untouched_l1" not in per  # no truth on this benchmark


def test_judge_accuracy_on_an_editors_outputs_beside_the_constant_answer(bench):
    # the stub judge always says "followed" and never "preserved"; a copy is preserved everywhere
    # and follows only "do nothing": the judge is right on 1 of 11 followed questions and on none
    # of the preserved ones, where a constant "no" / "yes" would be right on 10 of 11 / all
    result = harness.evaluate(CopyEditor(), bench, StubJudge(), method="copy", n_boot=20)
    accuracy = harness.judge_accuracy(result, n_boot=200, seed=3)
    n = len(bench)
    intervals = {k: accuracy.pop(k) for k in list(accuracy) if ".ci_" in k}
    assert accuracy == pytest.approx({"acc_followed": 1 / n, "constant_followed": (n - 1) / n,
                                      "acc_preserved": 0.0, "constant_preserved": 1.0})
    right = (result.per_item["oracle_followed"] > 0.5).astype(float)  # the stub always says "followed"
    expected = stats.bootstrap_ci(right, n_boot=200, seed=3)
    assert (intervals["acc_followed.ci_low"], intervals["acc_followed.ci_high"]) == (expected.low, expected.high)
    assert intervals["acc_preserved.ci_low"] == intervals["acc_preserved.ci_high"] == 0.0
    perfect = harness.evaluate(_oracle_for(bench), bench, StubJudge(), method="oracle", n_boot=20)
    assert harness.judge_accuracy(perfect)["acc_followed"] == 1.0  # every target follows, the stub says yes
    with pytest.raises(BadInputError, match="evaluate with a reward"):
        harness.judge_accuracy(harness.evaluate(CopyEditor(), bench, method="copy", n_boot=20))


def test_judge_minus_oracle_per_edit_shows_where_the_judge_is_fooled(bench):
    from nb_edit.rewards.single_turn import JudgeReward

    class StubReward(StubJudge):  # the stub's answers through JudgeReward's P(yes)
        __call__ = JudgeReward.__call__

    # the stub always says "followed"; a copy follows only "do nothing": fooled on every other edit
    oracle = harness.oracle_scores(bench.sources, bench.edits, bench.sources, CFG)
    summary, per_edit = harness.judge_agreement(StubReward(), bench.sources, bench.edits, bench.sources, oracle,
                                                items=True)
    gap = per_edit["judge_minus_oracle_followed"]
    assert gap.tolist() == [0.0 if t == "noop" else 1.0 for t in bench.edit_types]
    assert summary["judge_followed"] == 1.0 and summary["acc_followed"] == pytest.approx(1 - gap.mean())
    alone = harness.judge_agreement(StubReward(), bench.sources, bench.edits, bench.sources, oracle)
    assert alone == pytest.approx(summary, nan_ok=True)  # without items: the summary alone (a constant quality: NaN rank)


@pytest.mark.bad_input
def test_bad_outputs_and_benchmarks_are_named(bench):
    with pytest.raises(BadInputError, match="outputs.*one edited uint8 image"):
        harness.score_outputs(bench, bench.sources[:2])
    with pytest.raises(BadInputError, match="one source, instruction"):
        harness.Benchmark("bad", ["a", "b"], bench.sources[:1], ["x"], [""])
    with pytest.raises(BadInputError, match="choose one of"):
        harness.score_outputs(bench, bench.sources, n_boot=10).mean("viescore_overall")
    with pytest.raises(BadInputError, match="shapes_benchmark"):
        harness.evaluate(CopyEditor(), [bench.sources])


def test_metrics_tables_and_type_examples(bench):
    result = harness.evaluate(CopyEditor(), bench, method="copy", n_boot=100)
    metrics = result.metrics("eval.shapes.copy", ["oracle_success", "viescore_overall"])
    interval = result.intervals["oracle_success"]
    assert metrics == {"eval.shapes.copy.oracle_success": result.summary["oracle_success"],
                       "eval.shapes.copy.oracle_success.ci_low": interval.low,
                       "eval.shapes.copy.oracle_success.ci_high": interval.high}  # no judge: no viescore
    table = harness.results_markdown([result], ["oracle_success", "viescore_overall"])
    assert table.splitlines()[2].startswith(f"| copy | {result.summary['oracle_success']:.3f} [") and "–" in table
    per_type = harness.per_type_markdown([result]).splitlines()
    assert per_type[0] == "| method | " + " | ".join(bench.edit_types) + " |"  # one edit of each type, in order
    assert per_type[2] == "| copy | " + " | ".join("1.00" if t == "noop" else "0.00" for t in bench.edit_types) + " |"
    with pytest.raises(BadInputError, match="no per-item values"):
        result.per_type("viescore_overall")
    picked = harness.examples_per_type(["colour", "add", "colour", "mystery", "add"], per_type=1)
    assert picked == [1, 0, 3]  # world order (add before colour), unknown types last


# ------------------------------------------------------------------------------- other benchmarks
def test_shapes_benchmark_from_the_test_split(smoke_data):
    bench = harness.shapes_benchmark(smoke_data["test"], CFG)
    assert len(bench) == len(smoke_data["test"]) and bench.sources.shape[1:] == (32, 32, 3)
    result = harness.evaluate(_oracle_for(bench), bench, n_boot=50)
    assert result.summary["oracle_success"] == 1.0


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.bad_input
def test_a_users_folder_is_read_and_bad_rows_are_counted(tmp_path):
    (tmp_path / "imgs").mkdir()
    rows = []
    for i in range(20):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(_png(np.full((40, 60, 3), 10 * i, np.uint8)))
        (tmp_path / "imgs" / f"{i}_t.png").write_bytes(_png(np.full((40, 60, 3), 255, np.uint8)))
        rows.append({"id": f"p{i}", "source_file_name": f"imgs/{i}.png", "target_file_name": f"imgs/{i}_t.png",
                     "instruction": "make it white", "edit_type": "global", "split": "test"})
    rows.append({"id": "lost", "source_file_name": "imgs/nowhere.png", "instruction": "x", "split": "test"})
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    bench = harness.folder_benchmark(tmp_path, split="test", resolution=16, name="mine")
    assert len(bench) == 20 and bench.skipped == 1 and bench.sources.shape == (20, 16, 16, 3)
    assert bench.edits is None and bench.targets is not None
    result = harness.evaluate(CopyEditor(), bench, StubJudge(), method="copy", n_boot=50)
    expected = np.array([(255 - 10 * i) / 127.5 for i in range(20)])  # |source - white| on [-1, 1]
    assert result.per_item["target_l1"] == pytest.approx(expected)
    assert "oracle_success" not in result.summary and result.summary["viescore_overall"] == pytest.approx(6.0)


def test_real_photo_benchmark_is_judged_only(tmp_path, monkeypatch):
    monkeypatch.setenv("NB_EDIT_CACHE", str(tmp_path))
    bench = harness.real_photo_benchmark(resolution=16, categories=["remove", "style"])
    assert len(bench) == 12 and set(bench.edit_types) == {"remove", "style"}
    assert bench.edits is None and bench.targets is None and bench.sources.shape[1:] == (16, 16, 3)
    result = harness.evaluate(CopyEditor(), bench, StubJudge(), method="copy", n_boot=50)
    assert set(result.per_type("following_yes")) == {"remove", "style"}
    assert "untouched_l1" not in result.summary and result.summary["following_yes"] == 1.0


def test_multiturn_benchmark_perfect_and_idle_editors(smoke_data):
    from nb_edit.methods.mtrl.train import evaluate_multiturn

    test_set = smoke_data["multiturn"].split("test")
    bench = harness.multiturn_benchmark(test_set, n_turns=3)
    pairs = []
    for seq in bench.sequences:
        inputs = [seq.source] + [world.render(e.target, CFG) for e in seq.edits[:-1]]
        pairs += [(image, instruction, world.render(edit.target, CFG))
                  for image, instruction, edit in zip(inputs, seq.instructions, seq.edits)]
    perfect = harness.evaluate(OracleEditor(pairs), bench, method="perfect", n_boot=50)
    assert perfect.summary["turn3_success"] == 1.0 and tuple(perfect.intervals["turn3_success"]) == (1.0, 1.0, 1.0)
    assert perfect.outputs.shape == (len(bench), 4, 32, 32, 3)
    assert np.array_equal(perfect.outputs[:, 0], np.stack([s.source for s in bench.sequences]))
    idle = harness.evaluate(CopyEditor(), bench, method="copy", n_boot=50)
    assert idle.per_item["turn1_success"].tolist() == [0.0] * len(bench) and idle.summary["consistency_l1"] == 0.0
    assert math.isnan(idle.summary["marginal_success_turn3"])
    # training.mtrl.evaluate_multiturn is the same computation
    assert evaluate_multiturn(CopyEditor(), test_set, CFG, steps=4, seed=0) == pytest.approx(idle.summary, nan_ok=True)


# ------------------------------------------------------------------------------- the interactive editor
def test_editor_app_drives_a_pipeline_and_the_judge(bench):
    copy = CopyEditor()
    app = widgets.EditorApp({"copy": harness.editor_fn(copy, seed=3),
                             "perfect": harness.editor_fn(_oracle_for(bench))},
                            {"first": bench.sources[0], "second": bench.sources[1]},
                            judge=harness.judge_fn(StubJudge()))
    app.image_choice.value = "second"
    app.instruction.value = bench.instructions[1]
    app.model.value = "perfect"
    app.steps.value = 7
    app.button.click()
    assert np.array_equal(app.last_edited, bench.targets[1])
    assert app.last_scores["VIEScore overall (0-10)"] == pytest.approx(6.0)
    assert app.last_scores["followed, P(yes)"] == pytest.approx(1 / (1 + math.exp(-2.0)))
    assert "VIEScore overall" in app.scores.value and "6.000" in app.scores.value
    app.model.value = "copy"
    app.button.click()
    assert copy.calls[-1]["steps"] == 7 and copy.calls[-1]["seed"] == 3
    assert np.array_equal(app.last_edited, bench.sources[1])


# ------------------------------------------------------------------------------- claims
def test_t_interval_from_a_stored_summary_matches_the_one_from_values():
    values = [0.2, 0.35, 0.5]
    summary = runs.seed_summary("x.y", values)
    from_summary = stats.mean_ci_from_summary(summary["x.y"], summary["x.y.sd"], summary["x.y.n"])
    assert tuple(from_summary) == pytest.approx(tuple(stats.mean_ci_over_seeds(values)))
    assert stats.mean_ci_from_summary(0.4, 0.0, 1).degenerate
    with pytest.raises(BadInputError, match="whole number"):
        stats.mean_ci_from_summary(0.4, 0.1, 2.5)


def _full_metrics(value: float = 0.5) -> dict[str, float]:
    return {key: value for claim in claims.CLAIMS for key in claim.keys}


def _bernoulli(rate: float, n: int, seed: int) -> list[float]:
    return (np.random.default_rng(seed).random(n) < rate).astype(float).tolist()


def _items(scores: dict[str, dict[int, list[float]]], item_set: str = "shapes.test") -> dict:
    """``items.json`` as ``runs.record_items`` writes it."""
    return {key: {"item_set": item_set, "seeds": {str(s): v for s, v in per_seed.items()}}
            for key, per_seed in scores.items()}


def test_paired_verdicts_equal_means_are_inconclusive_and_a_clear_gap_is_reproduced():
    claim = claims.Claim("x", "P", "s", "a above b", (claims.Comparison("m.a.success", ">", "m.b.success"),))
    same = _bernoulli(0.5, 512, 0)
    shuffled = list(np.random.default_rng(1).permutation(same))  # the same mean, other items right
    equal = {"m.a.success": {0: same}, "m.b.success": {0: shuffled}}
    metrics = {"m.a.success": 0.5, "m.b.success": 0.5}
    (row,) = claims.evaluate_claims(metrics, (claim,), items=_items(equal))
    effect = row.effects[0]
    assert row.verdict == "inconclusive" and effect.diff == 0.0 and effect.low < 0.0 < effect.high
    assert "paired over 512 items x 1 seed" in row.note

    gap = {"m.a.success": {s: _bernoulli(0.7, 512, 10 + s) for s in range(3)},
           "m.b.success": {s: _bernoulli(0.4, 512, 20 + s) for s in range(3)}}
    (row,) = claims.evaluate_claims(metrics, (claim,), items=_items(gap))
    assert row.verdict == "reproduced" and 0.0 < row.effects[0].low < row.effects[0].diff < row.effects[0].high
    flipped = claims.Claim("y", "P", "s", "a below b", (claims.Comparison("m.a.success", "<", "m.b.success"),))
    (row,) = claims.evaluate_claims(metrics, (flipped,), items=_items(gap))
    assert row.verdict == "contradicted"
    counts = claims.claims_metrics([row])
    assert counts["eval.claims_contradicted"] == 1.0 and counts["eval.claims_reproduced"] == 0.0

    # 0 against 0: the interval is [0, 0], on neither side: inconclusive, not "0 >= 0 holds"
    zeros = {"m.a.success": {0: [0.0] * 64}, "m.b.success": {0: [0.0] * 64}}
    at_least = claims.Claim("z", "P", "s", "a at least b", (claims.Comparison("m.a.success", ">=", "m.b.success"),))
    (row,) = claims.evaluate_claims({"m.a.success": 0.0, "m.b.success": 0.0}, (at_least,), items=_items(zeros))
    assert row.verdict == "inconclusive" and "both are 0: no information" in row.note


def test_the_paired_test_needs_the_same_items_and_keeps_the_seeds_as_a_second_level():
    claim = claims.Claim("x", "P", "s", "a above b", (claims.Comparison("m.a.success", ">", "m.b.success"),))
    metrics = {"m.a.success": 0.7, "m.b.success": 0.4}
    gap = {"m.a.success": {0: _bernoulli(0.7, 256, 0)}, "m.b.success": {0: _bernoulli(0.4, 256, 1)}}
    other = {**_items({"m.a.success": gap["m.a.success"]}),
             **_items({"m.b.success": gap["m.b.success"]}, item_set="multiturn.test")}
    (row,) = claims.evaluate_claims(metrics, (claim,), items=other)
    assert row.verdict == "inconclusive" and row.effects == [None] and "different items" in row.note
    (row,) = claims.evaluate_claims(metrics, (claim,))
    assert row.verdict == "inconclusive" and "no per-item scores" in row.note

    # seeds that disagree widen the interval beyond what the items alone give
    one_seed = stats.paired_seed_bootstrap({0: gap["m.a.success"][0]}, {0: gap["m.b.success"][0]})
    spread = stats.paired_seed_bootstrap({0: _bernoulli(0.9, 256, 0), 1: _bernoulli(0.5, 256, 2),
                                          2: _bernoulli(0.7, 256, 3)}, {0: gap["m.b.success"][0]})
    assert spread.high - spread.low > one_seed.high - one_seed.low
    # a side measured once (a shipped model) is paired with every seed of the other
    assert spread.diff == pytest.approx(np.mean([np.mean(_bernoulli(r, 256, s)) for r, s in
                                                 ((0.9, 0), (0.5, 2), (0.7, 3))]) - np.mean(gap["m.b.success"][0]))
    with pytest.raises(BadInputError, match="same items"):
        stats.paired_seed_bootstrap({0: [1.0, 0.0]}, {0: [1.0]})


def test_claim_rows_carry_intervals_effects_and_notes():
    metrics = _full_metrics(0.5)
    metrics.update(runs.seed_summary("npedit.full.oracle_success", [0.60, 0.70, 0.65]))
    del metrics["multireward.reward.quality"]
    rows = {row.claim.id: row for row in claims.evaluate_claims(metrics)}
    assert len(rows) == len(claims.CLAIMS)
    left = rows["npedit-vs-supervised"].quantities["npedit.full.oracle_success"]
    t = 4.302652729911275  # t_{0.975, 2}
    assert left.mean == pytest.approx(0.65) and left.high - left.mean == pytest.approx(t * 0.05 / math.sqrt(3))
    assert rows["multireward-quality"].verdict == "not measured"
    assert rows["multireward-quality"].missing == ["multireward.reward.quality"]
    # means alone decide nothing: every measured claim is inconclusive without per-item scores
    assert {row.verdict for row in rows.values()} == {"inconclusive", "not measured"}
    low = rows["multireward-low-score"]  # two comparisons, one note each
    assert low.note.startswith("(1) ") and "(2) " in low.note and len(low.effects) == 2
    counts = claims.claims_metrics(list(rows.values()))
    assert counts["eval.claims_total"] == len(claims.CLAIMS)
    assert counts["eval.claims_measured"] == counts["eval.claims_inconclusive"] == len(claims.CLAIMS) - 1


def test_claims_markdown_and_the_report_open_with_the_table(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "runs_dir", lambda: tmp_path / "runs")
    run = runs.open_run("claims")
    metrics = _full_metrics(0.5)
    metrics["npedit.full.oracle_success"], metrics["models.supervised_clean.oracle_success"] = 0.6, 0.1
    metrics.update({"eval.shapes.copy.oracle_success": 0.25, "eval.shapes.copy.oracle_success.ci_low": 0.1,
                    "eval.shapes.copy.oracle_success.ci_high": 0.4})
    runs.record_metrics(run, metrics)
    runs.record_items(run, {"npedit.full.oracle_success": [1.0] * 60 + [0.0] * 40}, seed=0, item_set="shapes.test")
    runs.record_items(run, {"models.supervised_clean.oracle_success": [1.0] * 10 + [0.0] * 90}, seed=0,
                      item_set="shapes.test")
    table = claims.claims_markdown(claims.evaluate_claims(metrics, items=runs.read_items(run)))
    header, rule, first = table.splitlines()[:3]
    assert header.startswith("| claim | paper, section | statement | measured") and rule.count("|") == 8
    assert "effect (95% paired interval)" in header
    assert first.startswith("| `npedit-vs-supervised` | NP-Edit") and "0.600 (1 seed) ≥ 0.9 × " in first
    assert "**reproduced**" in first and "left − 0.9 × right +0.510 [" in first  # 0.6 - 0.9 * 0.1
    text = report.write_report(run).read_text()
    assert text.index("## Paper claims") < text.index("## Metrics")
    assert "| `npedit-vs-supervised` |" in text and "**reproduced**" in text  # the report reads items.json
    assert "| `eval.shapes.copy.oracle_success` | 0.25 [0.1, 0.4] |" in text
    assert "`eval.shapes.copy.oracle_success.ci_low`" not in text  # folded into the mean's row


def test_record_items_keeps_each_seed_and_a_seed_study_gathers_them(tmp_path, monkeypatch):
    from nb_edit.cli import aggregate_seeds

    monkeypatch.setattr(paths, "runs_dir", lambda: tmp_path / "runs")
    parent, seeds = runs.open_run("study"), [runs.open_run(f"study.seed{s}") for s in (0, 1)]
    for s, run in zip((0, 1), seeds):
        runs.record_metrics(run, {"npedit.full.oracle_success": 0.5 + s / 10})
        runs.record_items(run, {"npedit.full.oracle_success": [1.0, float("nan"), float(s)]}, seed=s,
                          item_set="shapes.test")
    aggregate_seeds(parent, seeds)
    entry = runs.read_items(parent)["npedit.full.oracle_success"]
    assert entry["item_set"] == "shapes.test" and sorted(entry["seeds"]) == ["0", "1"]
    scores = runs.item_scores(entry)
    assert np.isnan(scores[0][1]) and scores[1][2] == 1.0
    with pytest.raises(ValueError, match="metrics contract"):
        runs.record_items(parent, {"Bad Key": [1.0]}, seed=0, item_set="shapes.test")


def test_an_empty_run_reports_every_claim_as_not_measured():
    rows = claims.evaluate_claims({})
    assert {row.verdict for row in rows} == {"not measured"}
    assert claims.claims_metrics(rows) == {"eval.claims_reproduced": 0.0, "eval.claims_contradicted": 0.0,
                                           "eval.claims_inconclusive": 0.0, "eval.claims_measured": 0.0,
                                           "eval.claims_total": float(len(claims.CLAIMS))}
    with pytest.raises(BadInputError, match="read_metrics"):
        claims.evaluate_claims([("a.b", 1.0)])


# ------------------------------------------------------------------------------- cached editors
def test_the_registry_owns_each_run_and_its_folder(smoke_data):
    """Notebooks 05-07 and notebook 08 get a run's configuration and folder from the registry alone."""
    configs = registry.npedit_configs("smoke", seed=3, variants="vlm_only, full")
    assert list(configs) == ["vlm_only", "full"] and configs["full"].seed == 3
    assert list(registry.npedit_configs("smoke")) == list(registry.MAIN_RUNS["npedit"])  # "": the main job's
    assert list(registry.npedit_configs("smoke", study=True)) == list(registry.NPEDIT_VARIANTS)  # every ablation
    with pytest.raises(ValueError, match="unknown"):
        registry.npedit_configs("smoke", variants="full,nope")
    assert list(registry.mtrl_configs("smoke")) == list(registry.MAIN_RUNS["mtrl"])
    everything = registry.mtrl_configs("smoke", study=True)
    assert list(everything) == list(registry.MTRL_VARIANTS) and set(registry.MAIN_RUNS["mtrl"]) < set(everything)
    assert everything["grpo_agg_min"].aggregation == "min" and everything["grpo_reasoning_generate"].reasoning == "generate"
    assert list(registry.mtrl_configs("smoke", variants="grpo_agg_last")) == ["grpo_agg_last"]
    with pytest.raises(ValueError, match="grpo_agg_max"):
        registry.mtrl_configs("smoke", variants="grpo_agg_max")
    assert list(registry.multireward_configs("smoke")) == list(registry.MAIN_RUNS["multireward"])
    every_reward = registry.multireward_configs("smoke", study=True)
    assert list(every_reward) == list(registry.MULTIREWARD_VARIANTS)
    assert (every_reward["reward_blocks"].variant, every_reward["reward_blocks"].injection) == ("reward", "blocks")
    assert every_reward["reward"].injection == "time_embedding"
    every = {"npedit": registry.NPEDIT_VARIANTS, "multireward": registry.MULTIREWARD_VARIANTS,
             "mtrl": registry.MTRL_VARIANTS}
    assert all(set(main) < set(every[stage]) for stage, main in registry.MAIN_RUNS.items())  # the seed study has more
    # 0 steps means the profile's default; any other value is the run's length
    assert registry.mtrl_configs("tiny")["grpo_broadcast"].steps == 20
    assert registry.multireward_configs("tiny")["reward"].steps == 60
    assert registry.multireward_configs("tiny", steps=7)["reward"].steps == 7
    found = {r.name: r for r in registry.trained_runs("smoke", 0, smoke_data, stages=["npedit", "mtrl"])}
    cfg = configs["full"].replace(seed=0)
    assert found["npedit_full"].ckpt_dir == registry.run_dir("npedit", cfg, smoke_data["root"])
    assert registry.run_dir("npedit", cfg, smoke_data["root"]) != registry.run_dir("npedit", cfg.replace(seed=1),
                                                                                 smoke_data["root"])


def test_a_finished_run_loads_without_a_training_step(smoke_data, tmp_path, monkeypatch):
    from nb_edit.methods.npedit.train import NPEditTrainer, shared_warmup_dir

    monkeypatch.setenv("NB_EDIT_CACHE", str(tmp_path))
    found = registry.trained_runs("smoke", 0, smoke_data)
    assert [r.status for r in found if r.stage == "multireward"] == [
        "absent (notebook 06's judge annotations are not in the cache)"] * len(registry.MAIN_RUNS["multireward"])
    run = found[0]
    assert run.name == "npedit_full" and run.status == "absent (never trained)"
    with pytest.raises(RuntimeError, match="05_npedit.ipynb"):
        run.load()
    torch.manual_seed(0)
    assert run.config.copy_warmup_steps > 0  # so that the warm-up, shared as notebook 05 shares it, is exercised
    trainer = NPEditTrainer(run.config, smoke_data["unpaired"])  # what notebook 05 does
    trainer.fit(run.ckpt_dir, progress=False, warmup_dir=shared_warmup_dir(run.config, smoke_data["root"]))
    again = registry.trained_runs("smoke", 0, smoke_data, stages=["npedit"])[0]
    assert again.finished and again.status == f"finished ({run.config.steps} steps)"
    for stage_step in ("step", "copy_step"):  # neither the main stage nor the copy warm-up may take a step
        monkeypatch.setattr(NPEditTrainer, stage_step, lambda *args: pytest.fail("loading a finished run trained"))
    loaded = again.load()
    assert not (again.ckpt_dir / "copy_warmup").exists()
    sources = harness.render_sources(_edit_of_each_type()[:3], CFG)
    texts = ["make the red circle blue"] * 3
    assert np.array_equal(loaded.edit(sources, texts, steps=2, seed=1),
                          trainer.edit_pipeline().edit(sources, texts, steps=2, seed=1))


def test_trained_runs_finds_runs_made_with_each_notebooks_overrides(smoke_data):
    """Each method notebook's ``*_overrides`` win over its ``steps``, in the registry that it and
    trained_runs share; an override of None sets None; a setting the config lacks is refused."""
    from nb_edit.core.validation import BadInputError
    from nb_edit.methods.mtrl.train import MTRLConfig
    from nb_edit.methods.multireward.train import MultiRewardConfig

    overrides = {"lora_rank": 0, "lr": 2e-4, "steps": 7}
    plain = {r.name: r for r in registry.trained_runs("smoke", 0, smoke_data, stages=["multireward"])}
    found = {r.name: r for r in registry.trained_runs("smoke", 0, smoke_data, stages=["multireward", "mtrl"],
                                                      multireward_overrides=overrides,
                                                      mtrl_overrides={"steps": 5})}
    assert found["mtrl_grpo_broadcast"].config == MTRLConfig.for_profile(
        "smoke", seed=0, steps=5, algorithm="grpo", advantage="broadcast")
    full = registry.npedit_configs("full", variants="full", overrides={"ema_decay": None})["full"]
    assert full.ema_decay is None and registry.npedit_configs("full", variants="full")["full"].ema_decay == 0.999
    with pytest.raises(BadInputError, match="condition_lr_scale"):
        registry.npedit_configs("smoke", overrides={"condition_lr_scale": 2.0})
    for variant in ("noreward", "reward"):
        cfg = found[f"multireward_{variant}"].config
        assert cfg == MultiRewardConfig.for_profile("smoke", variant=variant, seed=0, editor_id="", **overrides)
        assert (cfg.steps, cfg.lora_rank, cfg.lr) == (7, 0, 2e-4)
        assert plain[f"multireward_{variant}"].config.lora_rank != 0  # without overrides: the notebook's defaults


def test_copy_editor_is_the_floor_preserving_all_and_following_only_noop():
    """The copy baseline (output = input): the oracle finds every edit preserved and followed
    only where the instruction was "do nothing"; its figures come with 95% intervals."""
    from nb_edit.data.judge_qa import random_edit

    cfg = world.WorldConfig()
    rng = np.random.default_rng(0)
    edits = [random_edit(world.sample_scene(rng, cfg), rng, cfg) for _ in range(60)]
    sources = harness.render_sources(edits, cfg)
    outputs = harness.run_editor(harness.CopyEditor(), sources, [e.instruction for e in edits], batch=16)
    assert np.array_equal(outputs, sources)
    scores = harness.oracle_scores(sources, edits, outputs, cfg)
    assert scores["preserved"].all()
    noop = np.array([e.edit_type == "noop" for e in edits])
    assert noop.any() and np.array_equal(scores["followed"].astype(bool), noop)
    summary = harness.mean_scores(scores, "models.copy")
    mean, low, high = (summary[f"models.copy.oracle_success{end}"] for end in ("", ".ci_low", ".ci_high"))
    assert mean == pytest.approx(noop.mean()) and low <= mean <= high and low < high
    with pytest.raises(BadInputError, match="uint8"):
        harness.CopyEditor().edit(sources.astype(np.float32), [e.instruction for e in edits])
