"""Uncertainty for the claims table: bootstrap and t-intervals, rank correlation, paired tests.

Every figure a notebook reports comes from a finite sample (a few hundred held-out edits, two to
five seeds), so it is reported with an interval, and "method A beats method B" is a statement about
an interval of the difference, not about two point estimates.

- :func:`bootstrap_ci`: percentile bootstrap over the items of one sample (e.g. per-edit oracle
  success of one model). Resamples items with replacement, recomputes the statistic, and reads the
  interval off the quantiles of the resampled statistics (Efron & Tibshirani, ch. 13).
- :func:`mean_ci_over_seeds`: Student-t interval over per-seed figures,
  ``mean +- t_{(1+ci)/2, n-1} * s / sqrt(n)``, the right tool for 2-5 seeds where a bootstrap of so
  few values is meaningless. A single seed gives a zero-width interval that is *flagged*
  (``Interval.n == 1``, ``Interval.degenerate``, and a :class:`SingleSeedWarning`).
  :func:`mean_ci_from_summary` is the same interval from a stored ``(mean, sd, n)``, the form a
  seed study leaves in ``metrics.json`` (``runs.seed_summary``).
- :func:`spearman`: rank correlation between a reward and the oracle (how well a VLM judge ranks
  edits), through ``scipy.stats.spearmanr``.
- :func:`paired_bootstrap_diff`: both methods scored on the *same* items; resampling item indices
  jointly keeps the pairing, so item difficulty cancels and the interval of ``stat(a) - stat(b)``
  is much narrower than two independent intervals would suggest.
- :func:`paired_seed_bootstrap`: the same over several training seeds, as a two-level bootstrap
  (Davison & Hinkley, sec. 3.8): resample the seeds, then the items within each drawn seed,
  always the same items for both methods.
"""

from __future__ import annotations

import warnings
from typing import Callable, NamedTuple

import numpy as np
from scipy import stats as scipy_stats

from nb_edit.core.validation import BadInputError

__all__ = ["Interval", "PairedDiff", "SingleSeedWarning", "bootstrap_ci", "mean_ci_from_summary",
           "mean_ci_over_seeds", "paired_bootstrap_diff", "paired_seed_bootstrap", "spearman"]


class SingleSeedWarning(UserWarning):
    """A mean over seeds was asked for with one seed: its interval has width 0 and says nothing."""


class _Triple(NamedTuple):
    mean: float
    low: float
    high: float


class Interval(_Triple):
    """``(mean, low, high)``; unpacks and indexes like a tuple and carries how it was made.

    ``n`` is the sample size and ``method`` is "bootstrap" or "t"; ``degenerate`` is True when the
    interval is not an estimate of uncertainty at all (one value).
    """

    def __new__(cls, mean: float, low: float, high: float, n: int, method: str):
        interval = super().__new__(cls, float(mean), float(low), float(high))
        interval.n, interval.method = int(n), method
        return interval

    def __getnewargs__(self):  # keeps n and method through copy and pickle
        return (self.mean, self.low, self.high, self.n, self.method)

    @property
    def degenerate(self) -> bool:
        return self.n < 2

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2.0

    def as_metrics(self, key: str) -> dict[str, float]:
        """``{key: mean, key.ci_low: low, key.ci_high: high}``: how a run's metrics.json holds a
        figure with its interval (the report reads the two bounds back beside the key)."""
        return {key: self.mean, f"{key}.ci_low": self.low, f"{key}.ci_high": self.high}


class PairedDiff(NamedTuple):
    """``stat(a) - stat(b)`` with its percentile-bootstrap interval.

    ``p_not_above`` is the share of resamples where A did not beat B (difference <= 0): a one-sided
    bootstrap p-value for "A above B". ``a_above`` holds when the whole interval is above 0.
    """

    diff: float
    low: float
    high: float
    p_not_above: float

    @property
    def a_above(self) -> bool:
        return self.low > 0.0


def _sample(values, name: str, min_size: int = 1) -> np.ndarray:
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise BadInputError(name, f"not a sequence of numbers ({type(values).__name__})",
                            "pass a list or 1-D array of floats (e.g. per-edit success as 0/1)") from None
    if array.ndim != 1:
        raise BadInputError(name, f"expected a 1-D sample, got shape {array.shape}",
                            "flatten it, or pass one value per item / per seed")
    if array.size < min_size:
        raise BadInputError(name, f"has {array.size} values, needs at least {min_size}",
                            "evaluate on more items or seeds")
    if not np.isfinite(array).all():
        raise BadInputError(name, f"contains {int((~np.isfinite(array)).sum())} NaN/Inf values",
                            "drop failed evaluations explicitly (and report how many) before the interval")
    return array


def _check_level(ci: float, n_boot: int | None = None) -> None:
    if not 0.0 < ci < 1.0:
        raise BadInputError(f"ci={ci!r}", "not a coverage level in (0, 1)", "use e.g. ci=0.95")
    if n_boot is not None and (not isinstance(n_boot, (int, np.integer)) or n_boot < 1):
        raise BadInputError(f"n_boot={n_boot!r}", "not a positive int", "use e.g. n_boot=1000")


def _resampled_stat(samples: np.ndarray, stat: Callable) -> np.ndarray:
    """``stat`` of each row of ``samples`` (n_boot, n): one vectorised call if ``stat`` takes axis."""
    try:
        values = np.asarray(stat(samples, axis=1), dtype=np.float64)
        if values.shape == (samples.shape[0],):
            return values
    except TypeError:  # a statistic without an axis argument: fall back to one call per resample
        pass
    return np.array([stat(row) for row in samples], dtype=np.float64)


def bootstrap_ci(values, n_boot: int = 1000, ci: float = 0.95, seed: int = 0,
                 stat: Callable = np.mean) -> Interval:
    """Percentile-bootstrap interval of ``stat(values)``: ``(estimate, low, high)``.

    Deterministic for a given ``seed``. ``stat`` gets a 1-D array (or a 2-D one and ``axis=1``
    when it accepts that, which is ~100x faster for ``np.mean``/``np.median``).
    """
    sample = _sample(values, "values")
    _check_level(ci, n_boot)
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, sample.size, size=(n_boot, sample.size))  # draws with replacement
    resampled = _resampled_stat(sample[indices], stat)
    tail = (1.0 - ci) / 2.0
    low, high = np.quantile(resampled, [tail, 1.0 - tail])
    return Interval(float(stat(sample)), low, high, sample.size, "bootstrap")


def mean_ci_from_summary(mean: float, sd: float, n: int, ci: float = 0.95) -> Interval:
    """Student-t interval ``mean +- t_{(1+ci)/2, n-1} * sd / sqrt(n)`` from summary figures.

    ``sd`` is the sample standard deviation (``ddof=1``) of ``n`` per-seed values, as
    ``runs.seed_summary`` stores it. ``n == 1`` gives the flagged zero-width interval (no warning
    here: the caller says "1 seed" where it shows it).
    """
    _check_level(ci)
    checked = _sample([mean, sd, n], "mean, sd, n")
    mean, sd = float(checked[0]), float(checked[1])
    if checked[2] < 1 or not float(checked[2]).is_integer() or sd < 0:
        raise BadInputError(f"(mean={mean}, sd={sd}, n={checked[2]:g})", "n must be a whole number >= 1 "
                            "and sd >= 0", "pass the figures runs.seed_summary stores (<key>, <key>.sd, <key>.n)")
    n = int(checked[2])
    if n == 1:
        return Interval(mean, mean, mean, 1, "t")
    standard_error = sd / np.sqrt(n)
    t_quantile = scipy_stats.t.ppf((1.0 + ci) / 2.0, df=n - 1)  # two-sided, n-1 degrees of freedom
    return Interval(mean, mean - t_quantile * standard_error, mean + t_quantile * standard_error, n, "t")


def mean_ci_over_seeds(values, ci: float = 0.95) -> Interval:
    """Student-t interval of the mean of per-seed figures (meant for 2-5 seeds).

    One seed gives ``(value, value, value)`` with ``degenerate`` True and a SingleSeedWarning, so a
    notebook still runs in the tiny profile but the report cannot pass it off as a measurement.
    """
    sample = _sample(values, "values (one figure per seed)")
    _check_level(ci)
    if sample.size == 1:
        warnings.warn("mean_ci_over_seeds got a single seed: the interval has width 0 and no "
                      "meaning; run more seeds before claiming a difference", SingleSeedWarning,
                      stacklevel=2)
        return mean_ci_from_summary(float(sample[0]), 0.0, 1, ci)
    return mean_ci_from_summary(float(sample.mean()), float(sample.std(ddof=1)), sample.size, ci)


def spearman(a, b) -> float:
    """Spearman rank correlation of two paired samples (e.g. judge score vs oracle per edit).

    Returns NaN, with a warning naming the constant input, when one side never varies (a judge
    that always says "yes" has no ranking to correlate).
    """
    x, y = _sample(a, "a", min_size=2), _sample(b, "b", min_size=2)
    if x.size != y.size:
        raise BadInputError("a, b", f"lengths differ ({x.size} vs {y.size})",
                            "pass one value per item in each, in the same item order")
    for name, side in (("a", x), ("b", y)):
        if np.all(side == side[0]):
            warnings.warn(f"spearman: {name} is constant ({side[0]:g} for all {side.size} items); "
                          "the rank correlation is undefined and returned as NaN", RuntimeWarning,
                          stacklevel=2)
            return float("nan")
    return float(scipy_stats.spearmanr(x, y).statistic)


def paired_bootstrap_diff(a, b, n_boot: int = 1000, ci: float = 0.95, seed: int = 0,
                          stat: Callable = np.mean) -> PairedDiff:
    """Paired percentile bootstrap of ``stat(a) - stat(b)`` where ``a[i]`` and ``b[i]`` score item i.

    Use it for "method A above method B": claim it when ``result.a_above`` (the interval excludes 0).
    """
    x, y = _sample(a, "a"), _sample(b, "b")
    if x.size != y.size:
        raise BadInputError("a, b", f"lengths differ ({x.size} vs {y.size}); a paired test needs "
                            "both methods on the same items", "evaluate both methods on one item list")
    _check_level(ci, n_boot)
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, x.size, size=(n_boot, x.size))  # same items for both: keeps pairing
    diffs = _resampled_stat(x[indices], stat) - _resampled_stat(y[indices], stat)
    tail = (1.0 - ci) / 2.0
    low, high = np.quantile(diffs, [tail, 1.0 - tail])
    return PairedDiff(float(stat(x) - stat(y)), float(low), float(high), float(np.mean(diffs <= 0.0)))


def paired_seed_bootstrap(a: dict, b: dict, factor: float = 1.0, n_boot: int = 2000, ci: float = 0.95,
                          seed: int = 0) -> PairedDiff:
    """Two-level paired bootstrap of ``mean(a) - factor * mean(b)`` over seeds and items.

    ``a`` and ``b`` map a training seed to one score per item, the same items in the same order
    for both. The effect is the mean over seeds of the per-seed difference of means. Each resample
    draws the seeds with replacement (the second level: training noise) and, within each drawn
    seed, the items with replacement, the same indices for ``a`` and ``b`` (the pairing: item
    difficulty cancels). A side measured once (one seed: a shipped model, which training seeds do
    not change) is paired with every seed of the other. Items NaN on either side are left out.
    """
    _check_level(ci, n_boot)
    if len(a) > 1 and len(b) == 1:
        b = {s: next(iter(b.values())) for s in a}
    elif len(b) > 1 and len(a) == 1:
        a = {s: next(iter(a.values())) for s in b}
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise BadInputError("a, b", f"no seed in common ({sorted(a)} vs {sorted(b)})",
                            "score both methods with the same training seeds")
    pairs = []
    for s in seeds:
        x, y = np.asarray(a[s], dtype=np.float64), np.asarray(b[s], dtype=np.float64)
        if x.shape != y.shape or x.ndim != 1:
            raise BadInputError("a, b", f"seed {s}: {x.shape} vs {y.shape} items; a paired test needs both "
                                "methods on the same items", "evaluate both methods on one item list")
        keep = np.isfinite(x) & np.isfinite(y)
        if not keep.any():
            raise BadInputError("a, b", f"seed {s}: no item scored on both sides", "check the per-item scores")
        pairs.append(x[keep] - factor * y[keep])
    rng = np.random.default_rng(seed)
    k = len(pairs)
    drawn = rng.integers(0, k, size=(n_boot, k)) if k > 1 else np.zeros((n_boot, 1), dtype=int)
    # slot (draw, position) holds seed drawn[draw, position] with items resampled afresh for it
    means = np.stack([d[rng.integers(0, d.size, size=(n_boot, k, d.size))].mean(axis=2) for d in pairs])
    diffs = np.take_along_axis(means, drawn[None], axis=0)[0].mean(axis=1)
    tail = (1.0 - ci) / 2.0
    low, high = np.quantile(diffs, [tail, 1.0 - tail])
    effect = float(np.mean([d.mean() for d in pairs]))
    return PairedDiff(effect, float(low), float(high), float(np.mean(diffs <= 0.0)))
