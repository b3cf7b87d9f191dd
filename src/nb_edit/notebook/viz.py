"""Figures for the notebooks and the run report: image grids, training curves, claims with intervals.

Matplotlib only, and never through ``pyplot``: every function builds a :class:`InlineFigure` (a
``matplotlib.figure.Figure`` that knows how to show itself as PNG), so

- it works under any backend, Agg included, in tests, papermill and scripts;
- no global figure list grows in a training loop (nothing to ``plt.close``);
- a notebook shows a returned figure exactly once (pyplot's inline backend shows a figure at the
  end of the cell *and* again when the cell returns it).

Save with ``nb_edit.core.runs.save_figure(run, fig, name)`` or ``fig.savefig(path)``.

The reward-hacking picture of NP-Edit's ablation (judge "yes" rising while the oracle falls) is
:func:`judge_vs_oracle`; MT-EditFlow's turn-k success (share of chains whose turns 1..k all
succeeded) is :func:`success_over_turns`.
"""

from __future__ import annotations

import io
import math
from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from nb_edit.core.validation import BadInputError

__all__ = ["InlineFigure", "bar_with_ci", "chain_figure", "curves", "image_grid", "judge_vs_oracle",
           "success_over_turns"]

DPI = 100  # figure inches are derived from pixels at this density, so scale=4 means 4 px per pixel


class InlineFigure(Figure):
    """A Figure that Jupyter displays as a PNG without pyplot or an inline backend."""

    def _repr_png_(self) -> bytes:
        buffer = io.BytesIO()
        self.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
        return buffer.getvalue()


def _check_image(image, where: str) -> np.ndarray:
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
        raise BadInputError(where, f"expected a uint8 array (H, W, 3), got dtype {array.dtype} shape "
                            f"{array.shape}", "convert model outputs with nb_edit.core.images.to_uint8")
    return array


def _upscale(image: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour upscaling: a 32 px render stays a grid of crisp squares, never a blur."""
    return np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)


def _bare(ax) -> None:
    """No ticks or frame, but keep the y label (``axis('off')`` would hide the row label too)."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def image_grid(rows: Sequence[Sequence[np.ndarray | None]], row_labels: Sequence[str] | None = None,
               col_labels: Sequence[str] | None = None, scale: int = 4,
               title: str | None = None, row_label_rotation: float = 90.0,
               cell_labels: Sequence[Sequence[str | None]] | None = None) -> InlineFigure:
    """A grid of uint8 (H, W, 3) images, one axes per cell (``len(rows) * longest row``).

    Rows may be ragged, and a cell may be None: such cells stay blank. ``scale`` is the integer
    nearest-neighbour upscaling factor, which also sets the printed size (``H * scale`` pixels).
    ``row_label_rotation=0`` writes the row labels across, left of the row: long labels (method
    names) then never run into the next row. Labels may hold line breaks (a wrapped instruction).
    ``cell_labels`` (rows of strings or None, shaped like ``rows``) writes a short text under each
    image, e.g. the oracle's verdict on an edit.
    """
    # A row is a list of images or a (N, H, W, 3) batch; a bare (H, W, 3) image is not a row.
    if isinstance(rows, np.ndarray) or not isinstance(rows, Sequence) or len(rows) == 0 or not all(
            (isinstance(row, Sequence) and not isinstance(row, str))
            or (isinstance(row, np.ndarray) and row.ndim == 4) for row in rows):
        raise BadInputError("rows", "expected a non-empty list of rows, each a list of images or a "
                            "(N, H, W, 3) batch", "wrap a single row as [[img1, img2, ...]]")
    rows = [list(row) for row in rows]
    if not isinstance(scale, (int, np.integer)) or scale < 1:
        raise BadInputError(f"scale={scale!r}", "not a positive int", "use e.g. scale=4 for 32 px images")
    n_rows, n_cols = len(rows), max(len(row) for row in rows)
    if n_cols == 0:
        raise BadInputError("rows", "every row is empty", "put at least one image in a row")
    for name, labels, count in (("row_labels", row_labels, n_rows), ("col_labels", col_labels, n_cols)):
        if labels is not None and len(labels) != count:
            raise BadInputError(name, f"has {len(labels)} labels for {count} {name[:3]}s",
                                f"pass exactly {count} labels or None")
    if cell_labels is not None and (len(cell_labels) != n_rows
                                    or any(len(labels) > n_cols for labels in cell_labels)):
        raise BadInputError("cell_labels", f"does not fit the grid of {n_rows} rows and {n_cols} columns",
                            "pass one row of labels (strings or None) per row of images")
    images = [[None if image is None else _check_image(image, f"rows[{r}][{c}]")
               for c, image in enumerate(row)] for r, row in enumerate(rows)]
    present = [image for row in images for image in row if image is not None]
    if not present:
        raise BadInputError("rows", "every cell is None", "put at least one image in the grid")
    cell_h = max(image.shape[0] for image in present) * scale / DPI
    cell_w = max(image.shape[1] for image in present) * scale / DPI
    # Room for labels and titles around the images, in inches (labels across: ~0.065 in a character).
    label_room = 0.4 if row_labels else 0.1
    if row_labels and row_label_rotation == 0:
        label_room = 0.15 + 0.065 * max(len(str(label)) for label in row_labels)
    col_lines = max((str(label).count("\n") + 1 for label in col_labels), default=1) if col_labels else 0
    cell_lines = max((str(label).count("\n") + 1 for labels in cell_labels for label in labels if label),
                     default=0) if cell_labels else 0
    figure = InlineFigure(figsize=(n_cols * cell_w + label_room,
                                   n_rows * (cell_h + 0.15 * cell_lines) + (0.15 + 0.15 * col_lines if col_labels else 0.1)
                                   + (0.3 if title else 0)),
                          layout="constrained")
    axes = figure.subplots(n_rows, n_cols, squeeze=False)
    for r in range(n_rows):
        for c in range(n_cols):
            ax = axes[r, c]
            _bare(ax)
            image = images[r][c] if c < len(images[r]) else None
            if image is not None:
                ax.imshow(_upscale(image, scale), interpolation="nearest")
            if row_labels is not None and c == 0:
                across = {"ha": "right", "va": "center"} if row_label_rotation == 0 else {}
                ax.set_ylabel(str(row_labels[r]), fontsize=8, rotation=row_label_rotation, **across)
            if col_labels is not None and r == 0:
                ax.set_title(str(col_labels[c]), fontsize=8)
            if cell_labels is not None and c < len(cell_labels[r]) and cell_labels[r][c]:
                ax.set_xlabel(str(cell_labels[r][c]), fontsize=7)
    if title:
        figure.suptitle(title, fontsize=9)
    return figure


def chain_figure(chains: Sequence[Sequence[np.ndarray]], titles: Sequence[str] | None = None,
                 scale: int = 4, row_label_rotation: float = 90.0) -> InlineFigure:
    """Multi-turn chains, one per row: ``[source, after turn 1, after turn 2, ...]``.

    ``titles`` label the rows (e.g. the instructions, or the method); columns read source, turn 1...
    """
    if not chains:
        raise BadInputError("chains", "is empty", "pass at least one chain [source, turn1, ...]")
    longest = max(len(chain) for chain in chains)
    col_labels = ["source"] + [f"turn {k}" for k in range(1, longest)]
    return image_grid(chains, row_labels=titles, col_labels=col_labels, scale=scale,
                      row_label_rotation=row_label_rotation)


def _series(history: Mapping[str, Sequence[float]] | Sequence[Mapping[str, float]],
            xlabel: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(x per key, y per key) from columns (dict of lists) or records (list of dicts)."""
    if isinstance(history, Mapping):
        columns = {key: np.asarray(values, dtype=float) for key, values in history.items()}
        x_all = columns.pop(xlabel, None)
        xs = {key: x_all if x_all is not None and len(x_all) == len(y) else np.arange(len(y))
              for key, y in columns.items()}
        return xs, columns
    if isinstance(history, Sequence) and all(isinstance(record, Mapping) for record in history):
        keys = sorted({key for record in history for key in record if key != xlabel})
        xs, ys = {}, {}
        for key in keys:  # a record without the key (metric logged every k steps) is skipped
            picked = [(record.get(xlabel, i), record[key]) for i, record in enumerate(history) if key in record]
            xs[key] = np.array([x for x, _ in picked], dtype=float)
            ys[key] = np.array([y for _, y in picked], dtype=float)
        return xs, ys
    raise BadInputError("history", f"expected a dict of lists or a list of dicts, got {type(history).__name__}",
                        "pass e.g. {'loss': [...]} or [{'step': 0, 'loss': 1.2}, ...]")


def curves(history: Mapping[str, Sequence[float]] | Sequence[Mapping[str, float]],
           keys: Sequence[str] | None = None, xlabel: str = "step",
           title: str | None = None) -> InlineFigure:
    """Training curves, one panel per key (losses of very different sizes never share an axis).

    ``history`` is columns ``{"loss": [...], "step": [...]}`` or records ``[{"step": 0, "loss": ..},
    ...]``; the ``xlabel`` entry, when present, gives the x values, otherwise the index does.
    """
    xs, ys = _series(history, xlabel)
    keys = list(keys) if keys is not None else list(ys)
    missing = [key for key in keys if key not in ys]
    if missing or not keys:
        raise BadInputError(f"keys={keys!r}", f"not in the history (missing {missing})" if missing
                            else "nothing to plot", f"choose from {sorted(ys)}")
    n_cols = min(3, len(keys))
    n_rows = math.ceil(len(keys) / n_cols)
    figure = InlineFigure(figsize=(3.2 * n_cols, 2.4 * n_rows + (0.3 if title else 0)), layout="constrained")
    axes = figure.subplots(n_rows, n_cols, squeeze=False).ravel()
    for ax, key in zip(axes, keys):
        ax.plot(xs[key], ys[key], lw=1.2)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    if title:
        figure.suptitle(title, fontsize=10)
    return figure


def _same_length(**named) -> dict[str, np.ndarray]:
    arrays = {name: np.asarray(values, dtype=float) for name, values in named.items()}
    lengths = {name: array.shape for name, array in arrays.items()}
    if len(set(lengths.values())) != 1 or next(iter(lengths.values())) == (0,):
        raise BadInputError(", ".join(arrays), f"need equal, non-empty 1-D lengths, got {lengths}",
                            "pass one value per step / name in each")
    return arrays


def judge_vs_oracle(steps: Sequence[float], judge_values: Sequence[float], oracle_values: Sequence[float],
                    judge_label: str = "judge says yes", oracle_label: str = "oracle success",
                    title: str | None = None) -> InlineFigure:
    """The judge's reward and the oracle's success over training, on one axis.

    When the two part ways (judge up, oracle flat or down) the editor is fooling the judge, the
    failure NP-Edit's judge-only ablation shows.
    """
    data = _same_length(steps=steps, judge_values=judge_values, oracle_values=oracle_values)
    figure = InlineFigure(figsize=(4.8, 3.0), layout="constrained")
    ax = figure.subplots()
    ax.plot(data["steps"], data["judge_values"], marker="o", ms=3, label=judge_label, color="tab:orange")
    ax.plot(data["steps"], data["oracle_values"], marker="s", ms=3, label=oracle_label, color="tab:blue")
    ax.set_xlabel("step")
    ax.set_ylabel("rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return figure


def bar_with_ci(names: Sequence[str], means: Sequence[float], lows: Sequence[float],
                highs: Sequence[float], title: str | None = None, ylabel: str | None = None) -> InlineFigure:
    """One bar per method with its (asymmetric) interval, e.g. from ``nb_edit.evaluation.stats``."""
    data = _same_length(names=np.arange(len(names)), means=means, lows=lows, highs=highs)
    m, lo, hi = data["means"], data["lows"], data["highs"]
    if np.any(lo > m + 1e-12) or np.any(hi < m - 1e-12):
        bad = [str(names[i]) for i in np.flatnonzero((lo > m + 1e-12) | (hi < m - 1e-12))]
        raise BadInputError(f"intervals of {bad}", "low <= mean <= high does not hold",
                            "pass (mean, low, high) in that order, as nb_edit.evaluation.stats returns them")
    figure = InlineFigure(figsize=(max(3.0, 0.9 * len(names) + 1.2), 3.0), layout="constrained")
    ax = figure.subplots()
    positions = np.arange(len(names))
    ax.bar(positions, m, yerr=np.stack([m - lo, hi - m]), capsize=4, color="tab:blue", alpha=0.8)
    for x, value, top in zip(positions, m, hi):
        ax.annotate(f"{value:.2f}", (x, top), textcoords="offset points", xytext=(0, 3),
                    ha="center", fontsize=7)
    ax.set_xticks(positions, [str(name) for name in names], rotation=20 if len(names) > 4 else 0,
                  fontsize=8)
    if ylabel:
        ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return figure


def success_over_turns(success: Mapping[str, Sequence[float]],
                       intervals: Mapping[str, Sequence[tuple[float, float]]] | None = None,
                       title: str | None = None) -> InlineFigure:
    """Turn-k success per method (k = 1, 2, ...): share of chains whose turns 1..k all succeeded.

    ``intervals`` (optional) maps a method to one (low, high) per turn, drawn as a band.
    """
    if not success:
        raise BadInputError("success", "is empty", "pass {method name: [turn-1 success, turn-2 ...]}")
    outside = len(success) > 4  # many methods: the legend goes right of the axes, not over the lines
    figure = InlineFigure(figsize=(4.6 + (1.8 if outside else 0.0), 3.0), layout="constrained")
    ax = figure.subplots()
    longest = 0
    for name, values in success.items():
        values = np.asarray(values, dtype=float)
        turns = np.arange(1, len(values) + 1)
        longest = max(longest, len(values))
        (line,) = ax.plot(turns, values, marker="o", ms=4, label=str(name))
        if intervals is not None and name in intervals:
            band = np.asarray(intervals[name], dtype=float)
            if band.shape != (len(values), 2):
                raise BadInputError(f"intervals[{name!r}]", f"shape {band.shape}, expected ({len(values)}, 2)",
                                    "pass one (low, high) per turn")
            ax.fill_between(turns, band[:, 0], band[:, 1], color=line.get_color(), alpha=0.2)
    ax.set_xticks(np.arange(1, longest + 1))
    ax.set_xlabel("turn k")
    ax.set_ylabel("turn-k success")
    ax.set_ylim(0.0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, **({"loc": "upper left", "bbox_to_anchor": (1.02, 1.0)} if outside else {}))
    if title:
        ax.set_title(title, fontsize=10)
    return figure
