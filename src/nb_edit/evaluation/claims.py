"""The three papers' claims in the tiny world, as plain data, and their verdicts on a run's metrics.

A :class:`Claim` names its paper and section, says what the paper found, and carries a rule: one
or more :class:`Comparison` of metric keys, ``left op factor * right``, all of which must hold.
The keys are those notebooks 03 and 05-07 record (``papermill_runs/<run>/metrics.json``).

:func:`evaluate_claims` reads a metrics dict and the run's per-item scores (``items.json``,
``runs.read_items``) and gives one :class:`Row` per claim:

* every compared quantity as its mean with a 95% interval over seeds. A seed study stores the
  mean under the key and ``<key>.sd`` / ``<key>.n`` beside it (``runs.seed_summary``); the
  interval is Student-t, ``mean +- t_{0.975, n-1} sd / sqrt(n)`` (``stats.mean_ci_from_summary``).
  A key without ``.n`` is one seed and has no interval;
* for each comparison ``left op factor * right``, the effect ``left - factor * right`` with its
  95% interval from a paired two-level bootstrap over the same test items and training seeds
  (``stats.paired_seed_bootstrap``), when both sides have per-item scores of the same items;
* the verdict, three-way: ``"reproduced"`` when the interval of every comparison lies on the
  claimed side of 0 (above for ``>``/``>=``, below for ``<``/``<=``), ``"contradicted"`` when the
  interval of one lies wholly on the other side, else ``"inconclusive"``: a tie, an interval
  across 0 (``0 >= 0`` among them), or no paired test (per-item scores missing, or the two sides
  scored on different items). ``"not measured"`` when a key of the rule is missing;
* a note per comparison: the paired test's size, or why there is none, and the overlap of the two
  sides' own intervals.

:func:`claims_markdown` renders the rows for the report and notebook 08;
:func:`claims_metrics` gives ``eval.claims_reproduced``, ``eval.claims_contradicted``,
``eval.claims_inconclusive``, ``eval.claims_measured`` and ``eval.claims_total`` (every claim,
measured or not).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from nb_edit.core.runs import item_scores, read_items, read_metrics
from nb_edit.core.validation import BadInputError
from nb_edit.evaluation.stats import Interval, PairedDiff, mean_ci_from_summary, paired_seed_bootstrap

__all__ = ["CLAIMS", "Claim", "Comparison", "Row", "claims_markdown", "claims_metrics", "evaluate_claims",
           "evaluate_run", "of_paper", "quantity"]

VERDICTS = ("reproduced", "contradicted", "inconclusive", "not measured")
_OPERATORS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}
_SYMBOLS = {">": ">", ">=": "≥", "<": "<", "<=": "≤"}


@dataclass(frozen=True)
class Comparison:
    """``metrics[left] op factor * metrics[right]`` on the means."""

    left: str
    op: str
    right: str
    factor: float = 1.0

    def __post_init__(self):
        if self.op not in _OPERATORS:
            raise BadInputError(f"Comparison op {self.op!r}", "unknown", f"use one of {sorted(_OPERATORS)}")

    @property
    def keys(self) -> tuple[str, str]:
        return self.left, self.right


@dataclass(frozen=True)
class Claim:
    id: str
    paper: str
    section: str
    statement: str
    comparisons: tuple[Comparison, ...]

    @property
    def keys(self) -> list[str]:
        return list(dict.fromkeys(key for c in self.comparisons for key in c.keys))


def _ablation(variant: str, what: str) -> Claim:
    return Claim(f"npedit-ablation-{variant.replace('_', '-')}", "NP-Edit", "experiments: ablations",
                 f"{what} scores below the full method (oracle success).",
                 (Comparison(f"npedit.{variant}.oracle_success", "<", "npedit.full.oracle_success"),))


def _perspective(metric: str, what: str) -> Claim:
    by_oracle = metric.startswith("oracle_")
    name = metric.split("_")[1 if by_oracle else 0]
    return Claim(f"multireward-{name}" + ("-oracle" if by_oracle else ""), "Multi-Reward",
                 "Sec. 6.2, Tab. 1; App. C.2, Tab. 8",
                 f"Trained on the same noisy triplets, the reward-conditioned editor asked for the best score "
                 f"beats the editor trained without the condition on {what}.",
                 (Comparison(f"multireward.reward.{metric}", ">", f"multireward.noreward.{metric}"),))


# The claims of the tiny world. Multi-Reward's three perspectives are three claims, as the paper
# reports each perspective on its own (following 47.7 -> 57.1, preserving 4.21 -> 4.50, quality
# 4.33 -> 4.41): one row per perspective shows which of them reproduce.
CLAIMS: tuple[Claim, ...] = (
    Claim("npedit-vs-supervised", "NP-Edit", "experiments: comparison with paired-data editors",
          "Trained without any editing pair, NP-Edit is on par with an editor of the same architecture "
          "trained on clean pairs: at least 90% of its oracle success.",
          (Comparison("npedit.full.oracle_success", ">=", "models.supervised_clean.oracle_success", 0.9),)),
    Claim("npedit-vs-flowgrpo", "NP-Edit", "experiments: comparison with Flow-GRPO",
          "With the same VLM as reward, NP-Edit beats single-turn Flow-GRPO started from the same editor "
          "(NP-Edit's after its copy warm-up) with as many edited images (oracle success on the same "
          "held-out test edits; trained by notebook 05 with study=True).",
          (Comparison("npedit.full.oracle_success", ">", "npedit.flowgrpo.oracle_success"),)),
    _ablation("dmd_only", "DMD alone (no VLM feedback)"),
    _ablation("vlm_only", "VLM feedback alone (no DMD)"),
    _ablation("no_identity", "Dropping the identity-preservation question"),
    _ablation("full_vocab", "The full-vocabulary cross-entropy instead of the yes/no softmax"),
    _ablation("no_unroll", "Training the one-step estimate x0_hat = eps - G(eps, 1) without the unroll"),
    Claim("npedit-dmd-quality", "NP-Edit", "method: distribution matching; experiments: ablations",
          "DMD keeps the outputs on the image manifold: the full method's outputs are of higher quality "
          "than VLM-only's (the oracle's quality score).",
          (Comparison("npedit.full.oracle_quality", ">", "npedit.vlm_only.oracle_quality"),)),
    # the judge's "followed" minus the oracle's, per edit: how far the judge is fooled on a
    # variant's outputs. Trained against the judge alone, VLM-only can learn what fools it.
    Claim("npedit-vlm-only-hacks", "NP-Edit", "experiments: ablations (VLM only)",
          "Without DMD the editor games its judge: on VLM-only's outputs the judge says \"followed\" more "
          "often than the oracle does, by more than on the full method's.",
          (Comparison("npedit.vlm_only.judge_minus_oracle_followed", ">",
                      "npedit.full.judge_minus_oracle_followed"),)),
    _perspective("following_acc", "instruction following (share of the judge's \"yes\")"),
    _perspective("preserving", "detail preserving (judge score 0-5)"),
    _perspective("quality", "generation quality (judge score 0-5)"),
    # the same perspectives by the oracle: the judge also wrote the training annotations, so a gain
    # it alone sees could be the editor learning the judge's taste rather than better edits
    _perspective("oracle_followed", "instruction following (the oracle's verdict)"),
    _perspective("oracle_preserved", "detail preserving (the oracle's verdict)"),
    _perspective("oracle_quality", "generation quality (the oracle's verdict)"),
    # Table 4: each kind of reward information alone helps, both together help most
    *(Claim(f"multireward-{part.replace('_', '-')}", "Multi-Reward", "Sec. 6.4, Tab. 4",
            f"The {what} alone, as the condition, already beats the editor trained without a condition "
            "(oracle success, both asked for the best).",
            (Comparison(f"multireward.{part}.oracle_success", ">", "multireward.noreward.oracle_success"),))
      for part, what in (("score_only", "reward scores"), ("text_only", "reward texts"))),
    Claim("multireward-both-parts", "Multi-Reward", "Sec. 6.4, Tab. 4",
          "Scores and texts together beat either alone (oracle success, all asked for the best).",
          (Comparison("multireward.reward.oracle_success", ">", "multireward.score_only.oracle_success"),
           Comparison("multireward.reward.oracle_success", ">", "multireward.text_only.oracle_success"))),
    Claim("multireward-score-sweep", "Multi-Reward", "Sec. 6.4, Tab. 6",
          "The reward-conditioned editor asked for scores of 0 (text \"None\") edits worse than asked for 5 "
          "(oracle success): lowering the asked score lowers the result.",
          (Comparison("multireward.score_sweep.s0.oracle_success", "<", "multireward.score_sweep.s5.oracle_success"),)),
    Claim("multireward-low-score", "Multi-Reward", "Sec. 6.4, Tab. 6",
          "Asking the reward-conditioned editor for low scores degrades its edits below both editors asked "
          "for the best (oracle success): the condition is used.",
          (Comparison("multireward.low_score.oracle_success", "<", "multireward.reward.oracle_success"),
           Comparison("multireward.low_score.oracle_success", "<", "multireward.noreward.oracle_success"))),
    Claim("mtrl-grpo-raises-turn3", "MT-EditFlow", "experiments: main results",
          "Multi-turn Flow-GRPO with the broadcast advantage raises turn-3 success over the base editor.",
          (Comparison("mtrl.grpo_broadcast.turn3_success", ">", "mtrl.base.turn3_success"),)),
    Claim("mtrl-nft-raises-turn3", "MT-EditFlow", "experiments: main results",
          "Multi-turn DiffusionNFT with the broadcast advantage raises turn-3 success over the base editor.",
          (Comparison("mtrl.nft_broadcast.turn3_success", ">", "mtrl.base.turn3_success"),)),
    # The tiny editors rarely get three turns in a row right (turn-3 success can be 0 for every
    # variant, an inconclusive 0 vs 0); the same claim on the turn-3 edit alone stays measurable.
    *(Claim(f"mtrl-{algo}-raises-turn3-task", "MT-EditFlow", "experiments: main results (tiny proxy)",
            f"{name} with the broadcast advantage raises turn-3 task success (turn 3 judged on the image "
            "it edited, whatever turns 1-2 did) over the base editor.",
            (Comparison(f"mtrl.{algo}_broadcast.turn3_task_success", ">", "mtrl.base.turn3_task_success"),))
      for algo, name in (("grpo", "Multi-turn Flow-GRPO"), ("nft", "Multi-turn DiffusionNFT"))),
    Claim("mtrl-multiturn-vs-singleturn", "MT-EditFlow", "experiments: main results",
          "Multi-turn Flow-GRPO (broadcast advantage) beats single-turn Flow-GRPO at turn 3.",
          (Comparison("mtrl.grpo_broadcast.turn3_success", ">", "mtrl.grpo_singleturn.turn3_success"),)),
    Claim("mtrl-exposure-bias", "MT-EditFlow", "introduction: exposure bias",
          "Multi-turn RL on the editor's own outputs shrinks the exposure gap (turn 2 on the true turn-1 "
          "result minus turn 2 on the editor's own) below the base editor's.",
          (Comparison("mtrl.grpo_broadcast.exposure_gap", "<", "mtrl.base.exposure_gap"),)),
    Claim("mtrl-broadcast-grpo", "MT-EditFlow", "analysis: advantage broadcasting",
          "Broadcasting the trajectory advantage to every turn at least matches per-turn advantages "
          "(Flow-GRPO, turn-3 success).",
          (Comparison("mtrl.grpo_broadcast.turn3_success", ">=", "mtrl.grpo_perturn.turn3_success"),)),
    Claim("mtrl-broadcast-nft", "MT-EditFlow", "analysis: advantage broadcasting",
          "Broadcasting the trajectory advantage to every turn at least matches per-turn advantages "
          "(DiffusionNFT, turn-3 success).",
          (Comparison("mtrl.nft_broadcast.turn3_success", ">=", "mtrl.nft_perturn.turn3_success"),)),
    # Notebook 07 records the oracle's turn-k success and consistency of both fusion levels (the
    # "gold" metrics), not the judge's IF/CC rewards at the end of training; so hacking shows here
    # as what it costs on the gold metrics: reward-level fusion trading consistency (CC) or success
    # for the reward it hacks.
    Claim("mtrl-advantage-fusion", "MT-EditFlow", "analysis: reward fusion level",
          "Fusing IF and CC at the advantage level resists hacking one reward: against reward-level "
          "fusion it keeps at least the oracle's consistency and turn-3 success.",
          (Comparison("mtrl.grpo_broadcast.consistency", ">=", "mtrl.grpo_reward_fusion.consistency"),
           Comparison("mtrl.grpo_broadcast.turn3_success", ">=", "mtrl.grpo_reward_fusion.turn3_success"))),
)


def evaluate_run(run, claims: Sequence[Claim] = CLAIMS) -> list[Row]:
    """:func:`evaluate_claims` on a run folder's ``metrics.json`` and ``items.json`` (``core.runs``)."""
    return evaluate_claims(read_metrics(run), claims, items=read_items(run))


def of_paper(paper: str) -> tuple[Claim, ...]:
    """The claims of one paper (``"NP-Edit"``, ``"Multi-Reward"``, ``"MT-EditFlow"``)."""
    chosen = tuple(c for c in CLAIMS if c.paper == paper)
    if not chosen:
        raise BadInputError(f"paper {paper!r}", "no claim names it", f"use one of {sorted({c.paper for c in CLAIMS})}")
    return chosen


def quantity(metrics: Mapping[str, float], key: str, ci: float = 0.95) -> Interval | None:
    """The mean of ``key`` with its interval over seeds, or None when the run did not record it."""
    if key not in metrics:
        return None
    mean = float(metrics[key])
    n = metrics.get(f"{key}.n", 1)
    sd = metrics.get(f"{key}.sd", 0.0)
    return mean_ci_from_summary(mean, float(sd), int(round(float(n))), ci)


@dataclass
class Row:
    """A claim with its quantities (key -> interval; None = not recorded), the paired effect of
    each comparison (None: no paired test), its verdict and notes."""

    claim: Claim
    quantities: dict[str, Interval | None]
    verdict: str
    notes: list[str] = field(default_factory=list)
    effects: list[PairedDiff | None] = field(default_factory=list)

    @property
    def missing(self) -> list[str]:
        return [key for key, value in self.quantities.items() if value is None]

    @property
    def note(self) -> str:
        return "; ".join(self.notes)


def _significance(left: Interval, right: Interval, factor: float) -> str:
    """Whether the 95% intervals of the two sides overlap (the right side scaled by ``factor``).

    When only one side has an interval (a seed study beside a figure measured once, such as a
    shipped model's), the other side's value is checked against it.
    """
    low, high = sorted((factor * right.low, factor * right.high))
    if left.degenerate and right.degenerate:
        return "1 seed: no interval, significance unknown"
    if left.degenerate or right.degenerate:
        value, (lo, hi), n = ((left.mean, (low, high), right.n) if left.degenerate
                              else (factor * right.mean, (left.low, left.high), left.n))
        where = "outside it: significant" if value < lo or value > hi else "inside it: not significant"
        return f"one side measured once, the other over {n} seeds: the single value lies {where}"
    if left.high < low or left.low > high:
        return "intervals disjoint: significant"
    return "intervals overlap: not significant"


def _paired(comparison: Comparison, items: Mapping[str, Mapping], n_boot: int, seed: int
            ) -> tuple[PairedDiff | None, str]:
    """The paired effect of ``comparison`` from the per-item scores, or None and why not."""
    left, right = items.get(comparison.left), items.get(comparison.right)
    if left is None or right is None:
        return None, "no per-item scores: no paired test"
    if left["item_set"] != right["item_set"]:
        return None, f"scored on different items ({left['item_set']} vs {right['item_set']}): no paired test"
    a, b = item_scores(left), item_scores(right)
    try:
        effect = paired_seed_bootstrap(a, b, comparison.factor, n_boot=n_boot, seed=seed)
    except BadInputError as error:
        return None, f"no paired test ({error.problem})"
    seeds = max(len(a), len(b))
    n_items = max(len(v) for v in a.values())
    return effect, f"paired over {n_items} items x {seeds} seed{'s' if seeds > 1 else ''}"


def _verdict(comparison: Comparison, effect: PairedDiff | None) -> str:
    """Three-way: the interval of ``left - factor * right`` on the claimed side of 0, the other, or across."""
    if effect is None:
        return "inconclusive"
    above = comparison.op in (">", ">=")
    if (effect.low > 0.0) if above else (effect.high < 0.0):
        return "reproduced"
    if (effect.high < 0.0) if above else (effect.low > 0.0):
        return "contradicted"
    return "inconclusive"


def evaluate_claims(metrics: Mapping[str, float], claims: Sequence[Claim] = CLAIMS, ci: float = 0.95,
                    items: Mapping[str, Mapping] | None = None, n_boot: int = 2000, seed: int = 0) -> list[Row]:
    """One :class:`Row` per claim on ``metrics`` (a flat dict as in ``metrics.json``) and ``items``
    (the run's per-item scores, ``runs.read_items``; None: none, so no claim is decided)."""
    if not isinstance(metrics, Mapping):
        raise BadInputError("metrics", f"expected a dict of metric key -> number, got {type(metrics).__name__}",
                            "pass runs.read_metrics(run) or json.load of a metrics.json")
    items = items or {}
    rows = []
    for claim in claims:
        values = {key: quantity(metrics, key, ci) for key in claim.keys}
        missing = [key for key, value in values.items() if value is None]
        if missing:
            rows.append(Row(claim, values, "not measured", [f"missing: {', '.join(missing)}"]))
            continue
        effects, verdicts, notes = [], [], []
        for c in claim.comparisons:
            effect, how = _paired(c, items, n_boot, seed)
            effects.append(effect)
            verdicts.append(_verdict(c, effect))
            note = f"{how}; {_significance(values[c.left], values[c.right], c.factor)}"
            if values[c.left].mean == 0.0 and values[c.right].mean == 0.0:
                note += "; both are 0: no information"
            notes.append(note)
        verdict = ("contradicted" if "contradicted" in verdicts else
                   "reproduced" if all(v == "reproduced" for v in verdicts) else "inconclusive")
        notes = [n if len(notes) == 1 else f"({i + 1}) {n}" for i, n in enumerate(notes)]
        rows.append(Row(claim, values, verdict, notes, effects))
    return rows


def _cell(value: Interval | None) -> str:
    if value is None:
        return "missing"
    if value.degenerate:
        return f"{value.mean:.3f} (1 seed)"
    return f"{value.mean:.3f} [{value.low:.3f}, {value.high:.3f}] ({value.n} seeds)"


def _measured(comparison: Comparison, quantities: Mapping[str, Interval | None]) -> str:
    """"`left` 0.412 (1 seed) > 0.9 × `right` 0.300 (1 seed)": the rule with its numbers."""
    factor = "" if comparison.factor == 1.0 else f"{comparison.factor:g} × "
    return (f"`{comparison.left}` {_cell(quantities[comparison.left])} {_SYMBOLS[comparison.op]} {factor}"
            f"`{comparison.right}` {_cell(quantities[comparison.right])}")


def _effect(comparison: Comparison, effect: PairedDiff | None) -> str:
    if effect is None:
        return "no paired test"
    factor = "" if comparison.factor == 1.0 else f"{comparison.factor:g} × "
    return f"left − {factor}right {effect.diff:+.3f} [{effect.low:+.3f}, {effect.high:+.3f}]"


def claims_markdown(rows: Sequence[Row]) -> str:
    """A markdown table: claim, paper and section, statement, measured quantities, paired effect
    with its 95% interval, verdict, note."""
    lines = ["| claim | paper, section | statement | measured (mean, 95% interval over seeds) | "
             "effect (95% paired interval) | verdict | note |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        measured = "<br>".join(_measured(c, row.quantities) for c in row.claim.comparisons)
        effects = "<br>".join(_effect(c, e) for c, e in zip(row.claim.comparisons, row.effects)) or "-"
        verdict = f"**{row.verdict}**" if row.verdict in ("reproduced", "contradicted") else row.verdict
        lines.append(f"| `{row.claim.id}` | {row.claim.paper}, {row.claim.section} | {row.claim.statement} | "
                     f"{measured} | {effects} | {verdict} | {row.note} |")
    counts = claims_metrics(rows)
    lines += ["", f"{counts['eval.claims_reproduced']:.0f} of {counts['eval.claims_total']:.0f} claims reproduced, "
              f"{counts['eval.claims_contradicted']:.0f} contradicted, {counts['eval.claims_inconclusive']:.0f} "
              f"inconclusive ({counts['eval.claims_measured']:.0f} measured): a verdict needs the paired interval "
              "of the effect wholly on one side of 0."]
    return "\n".join(lines)


def claims_metrics(rows: Sequence[Row]) -> dict[str, float]:
    """``eval.claims_reproduced`` / ``_contradicted`` / ``_inconclusive`` (paired verdicts),
    ``eval.claims_measured`` and ``eval.claims_total`` (all claims)."""
    count = lambda verdict: float(sum(row.verdict == verdict for row in rows))  # noqa: E731
    return {"eval.claims_reproduced": count("reproduced"), "eval.claims_contradicted": count("contradicted"),
            "eval.claims_inconclusive": count("inconclusive"),
            "eval.claims_measured": float(sum(row.verdict != "not measured" for row in rows)),
            "eval.claims_total": float(len(rows))}
