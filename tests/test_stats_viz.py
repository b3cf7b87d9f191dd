"""Tests for nb_edit.evaluation.stats, nb_edit.notebook.viz and nb_edit.notebook.widgets (no browser, no downloads)."""

from __future__ import annotations

import datetime
import io
import pickle
import sys

import matplotlib
import numpy as np
import pytest
from PIL import Image
from scipy import stats as scipy_stats

matplotlib.use("Agg")

from nb_edit.core.validation import BadInputError  # noqa: E402
from nb_edit.evaluation import stats  # noqa: E402
from nb_edit.notebook import viz, widgets

SIZE = 16
UPLOAD_TIME = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)  # FileUpload wants a datetime


# ----------------------------------------------------------------------------------- stats


def test_bootstrap_ci_covers_true_mean_and_is_deterministic():
    sample = np.random.default_rng(123).normal(loc=0.7, scale=0.2, size=400)
    mean, low, high = stats.bootstrap_ci(sample, n_boot=2000, seed=5)
    assert low < 0.7 < high
    assert low < mean < high and mean == pytest.approx(sample.mean())
    # standard error 0.2 / sqrt(400) = 0.01, so a 95% interval is about +-0.02
    assert 0.03 < high - low < 0.05
    assert stats.bootstrap_ci(sample, n_boot=2000, seed=5) == (mean, low, high)
    assert stats.bootstrap_ci(sample, n_boot=2000, seed=6) != (mean, low, high)
    # how metrics.json holds it: the key, and its bounds beside it
    assert stats.bootstrap_ci(sample, n_boot=2000, seed=5).as_metrics("models.x.oracle_success") == {
        "models.x.oracle_success": mean, "models.x.oracle_success.ci_low": low,
        "models.x.oracle_success.ci_high": high}


def test_bootstrap_ci_with_a_statistic_without_axis_matches_vectorised_one():
    sample = np.arange(20, dtype=float) ** 2
    vectorised = stats.bootstrap_ci(sample, n_boot=300, seed=1, stat=np.median)
    looped = stats.bootstrap_ci(sample, n_boot=300, seed=1, stat=lambda v: float(np.median(v)))
    assert tuple(vectorised) == pytest.approx(tuple(looped))
    assert vectorised.n == 20 and vectorised.method == "bootstrap"


def test_t_interval_by_hand_for_three_seeds():
    values = [0.30, 0.40, 0.50]
    result = stats.mean_ci_over_seeds(values, ci=0.95)
    standard_error = 0.1 / np.sqrt(3)  # sample sd of (0.3, 0.4, 0.5) is 0.1
    t_975_df2 = 4.302652729911275  # table value of t_{0.975, 2}
    assert scipy_stats.t.ppf(0.975, 2) == pytest.approx(t_975_df2)
    assert result.mean == pytest.approx(0.4)
    assert result.low == pytest.approx(0.4 - t_975_df2 * standard_error)
    assert result.high == pytest.approx(0.4 + t_975_df2 * standard_error)
    assert not result.degenerate and result.n == 3
    restored = pickle.loads(pickle.dumps(result))
    assert restored == result and restored.n == 3 and restored.method == "t"


def test_single_seed_gives_flagged_zero_width_interval():
    with pytest.warns(stats.SingleSeedWarning):
        result = stats.mean_ci_over_seeds([0.25])
    assert tuple(result) == (0.25, 0.25, 0.25)
    assert result.degenerate and result.half_width == 0.0


def test_spearman_sign_and_constant_input():
    a = [0.1, 0.4, 0.2, 0.9, 0.5]
    assert stats.spearman(a, [1, 4, 2, 9, 5]) == pytest.approx(1.0)
    assert stats.spearman(a, [-x for x in a]) == pytest.approx(-1.0)
    assert 0 < stats.spearman(a, [0.2, 0.3, 0.1, 0.8, 0.9]) < 1
    with pytest.warns(RuntimeWarning, match="b is constant"):
        assert np.isnan(stats.spearman(a, [1, 1, 1, 1, 1]))
    with pytest.raises(BadInputError, match="lengths differ"):
        stats.spearman(a, [1, 2])


def test_paired_bootstrap_diff_detects_a_real_gain_and_not_a_null_one():
    rng = np.random.default_rng(0)
    difficulty = rng.uniform(size=300)
    method_b = (difficulty > 0.5).astype(float)
    method_a = (difficulty > 0.4).astype(float)  # A solves everything B solves, and more
    gain = stats.paired_bootstrap_diff(method_a, method_b, seed=0)
    assert gain.a_above and gain.low > 0 and gain.p_not_above < 0.01
    assert gain.diff == pytest.approx(method_a.mean() - method_b.mean())
    null = stats.paired_bootstrap_diff(method_b, method_b.copy(), seed=0)
    assert not null.a_above and null.diff == 0.0 and null.p_not_above == 1.0


@pytest.mark.parametrize("bad, match", [([], "at least 1"), ([1.0, np.nan], "NaN"),
                                         ([[1, 2], [3, 4]], "1-D")])
def test_bad_samples_are_named(bad, match):
    with pytest.raises(BadInputError, match=match):
        stats.bootstrap_ci(bad)


# ------------------------------------------------------------------------------------- viz


def _image(value: int) -> np.ndarray:
    image = np.full((SIZE, SIZE, 3), value, np.uint8)
    image[4:8, 4:8] = (255, 0, 0)
    return image


def test_image_grid_axes_labels_upscaling_and_png(tmp_path):
    rows = [[_image(0), _image(50), _image(100)], [_image(150), None]]  # ragged, with a blank
    figure = viz.image_grid(rows, row_labels=["a", "b"], col_labels=["x", "y", "z"], scale=3)
    assert len(figure.axes) == 2 * 3
    assert figure.axes[0].get_title() == "x" and figure.axes[0].get_ylabel() == "a"
    shown = figure.axes[0].images[0].get_array()
    assert shown.shape == (SIZE * 3, SIZE * 3, 3)  # nearest-neighbour: every pixel a 3x3 block
    assert np.array_equal(np.asarray(shown)[::3, ::3], rows[0][0])
    assert figure.axes[0].images[0].get_interpolation() == "nearest"
    assert not figure.axes[4].images  # the None cell stays blank
    path = tmp_path / "grid.png"
    figure.savefig(path)
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size[0] > 0
    assert figure._repr_png_().startswith(b"\x89PNG")
    import matplotlib.pyplot as plt

    assert plt.get_fignums() == []  # built without pyplot: nothing left open to leak


def test_image_grid_row_labels_across_get_room():
    rows = [[_image(0), _image(50)], [_image(100), _image(150)]]
    labels = ["source", "a rather long method name"]
    upright = viz.image_grid(rows, row_labels=labels, scale=2)
    across = viz.image_grid(rows, row_labels=labels, scale=2, row_label_rotation=0)
    assert upright.axes[2].yaxis.label.get_rotation() == 90 and across.axes[2].yaxis.label.get_rotation() == 0
    assert across.axes[2].yaxis.label.get_horizontalalignment() == "right"
    assert across.get_figwidth() - upright.get_figwidth() == pytest.approx(0.15 + 0.065 * len(labels[1]) - 0.4)
    chain = viz.chain_figure([[_image(0), _image(60)]], titles=["method"], row_label_rotation=0)
    assert chain.axes[0].yaxis.label.get_rotation() == 0


def test_image_grid_writes_a_label_under_each_cell_and_makes_room_for_it():
    from nb_edit.evaluation import harness

    rows = [[_image(0), _image(50)], [_image(100), _image(150)]]
    scores = {"success": np.array([1.0, 0.0]), "followed": np.array([1.0, 0.0]), "preserved": np.array([1.0, 0.0])}
    verdicts = harness.verdict_labels(scores)
    assert verdicts == ["success", "not followed\nrest changed"]
    assert harness.verdict_labels({f"oracle_{k}": v for k, v in scores.items()}, prefix="oracle_") == verdicts
    plain = viz.image_grid(rows, col_labels=["make the red\ncircle blue", "x"], scale=2)
    labelled = viz.image_grid(rows, col_labels=["make the red\ncircle blue", "x"], scale=2,
                              cell_labels=[[None, ""], verdicts])
    assert labelled.axes[2].get_xlabel() == "success" and labelled.axes[3].get_xlabel() == verdicts[1]
    assert labelled.axes[0].get_xlabel() == "" and labelled.axes[0].get_title() == "make the red\ncircle blue"
    assert labelled.get_figheight() - plain.get_figheight() == pytest.approx(2 * 0.15 * 2)  # two lines a row
    with pytest.raises(BadInputError, match="cell_labels"):
        viz.image_grid(rows, cell_labels=[["a", "b", "c"], []])


def test_image_grid_rejects_float_images_with_a_fix():
    with pytest.raises(BadInputError, match=r"rows\[0\]\[1\].*to_uint8"):
        viz.image_grid([[_image(0), np.zeros((SIZE, SIZE, 3), np.float32)]])


def test_chain_curves_and_claim_figures():
    chain = viz.chain_figure([[_image(0), _image(60), _image(120)], [_image(0), _image(60)]],
                             titles=["method a", "method b"])
    assert len(chain.axes) == 6 and [ax.get_title() for ax in chain.axes[:3]] == ["source", "turn 1", "turn 2"]

    records = [{"step": s, "loss": 1.0 / (s + 1)} for s in range(0, 50, 10)]
    records[2]["judge_yes"] = 0.5  # logged only at one step
    figure = viz.curves(records, keys=["loss", "judge_yes"], xlabel="step")
    assert len([ax for ax in figure.axes if ax.get_visible()]) == 2
    assert list(figure.axes[0].lines[0].get_xdata()) == [0, 10, 20, 30, 40]
    assert list(figure.axes[1].lines[0].get_xdata()) == [20]
    columns = viz.curves({"loss": [3, 2, 1], "dmd": [9, 8, 7], "step": [5, 6, 7]})
    assert list(columns.axes[1].lines[0].get_xdata()) == [5, 6, 7]
    with pytest.raises(BadInputError, match="missing"):
        viz.curves({"loss": [1, 2]}, keys=["reward"])

    hacking = viz.judge_vs_oracle([0, 100, 200], [0.1, 0.5, 0.9], [0.1, 0.05, 0.0])
    assert len(hacking.axes) == 1 and len(hacking.axes[0].lines) == 2
    with pytest.raises(BadInputError, match="equal"):
        viz.judge_vs_oracle([0, 1], [0.1], [0.2, 0.3])

    bars = viz.bar_with_ci(["a", "b"], [0.5, 0.3], [0.4, 0.2], [0.6, 0.4], title="oracle success")
    assert len(bars.axes[0].patches) == 2
    with pytest.raises(BadInputError, match="low <= mean <= high"):
        viz.bar_with_ci(["a"], [0.5], [0.6], [0.7])

    turns = viz.success_over_turns({"grpo": [0.9, 0.7, 0.5], "base": [0.8, 0.5, 0.3]},
                                   intervals={"grpo": [(0.85, 0.95), (0.6, 0.8), (0.4, 0.6)]})
    assert len(turns.axes[0].lines) == 2 and len(turns.axes[0].collections) == 1
    many = viz.success_over_turns({f"method {i}": [0.5, 0.4, 0.3] for i in range(6)})
    legend = many.axes[0].get_legend()
    assert len(legend.get_texts()) == 6 and legend.get_bbox_to_anchor().x0 > many.axes[0].bbox.x1  # right of the axes
    assert many.get_figwidth() > turns.get_figwidth()


# --------------------------------------------------------------------------------- widgets


def invert_editor(source, instruction, steps):
    return 255 - source


def fake_judge(source, instruction, edited):
    return {"followed": float(instruction.startswith("invert")),
            "changed": float(np.mean(source != edited))}


@pytest.fixture
def app():
    images = {"dark": _image(0), "light": _image(200)}
    return widgets.EditorApp({"invert": invert_editor, "identity": lambda s, i, n: s}, images,
                             judge=fake_judge, steps=3)


def test_run_edit_is_plain_logic(app):
    edited, scores = app.run_edit("light", "invert the colours", "invert", 2)
    assert np.array_equal(edited, 255 - _image(200))
    assert scores == {"followed": 1.0, "changed": 1.0}
    compared = app.compare_models(_image(0), "invert it", 1)
    assert set(compared) == {"invert", "identity"} and compared["identity"][1]["changed"] == 0.0
    with pytest.raises(BadInputError, match="choose one of"):
        app.run_edit("nope", "invert", "invert", 2)
    with pytest.raises(BadInputError, match="output of model 'bad'"):
        widgets.EditorApp({"bad": lambda s, i, n: s.astype(float)}, {"x": _image(0)}).run_edit(
            "x", "do it", "bad", 1)


def test_button_click_without_a_browser(app):
    assert app.widget.children  # the VBox is built
    app.image_choice.value = "dark"
    app.instruction.value = "invert the picture"
    app.model.value = "invert"
    app.steps.value = 5
    app.button.click()
    assert np.array_equal(app.last_edited, 255 - _image(0))
    assert app.last_scores == {"followed": 1.0, "changed": 1.0}
    with Image.open(io.BytesIO(app.picture.value)) as shown:
        pixels = np.asarray(shown.convert("RGB"))
    scale = app.scale
    assert shown.size == (2 * SIZE * scale + 8, SIZE * scale)  # source | gap | result
    assert np.array_equal(pixels[::scale, : SIZE * scale : scale], _image(0))
    assert np.array_equal(pixels[::scale, SIZE * scale + 8 :: scale], 255 - _image(0))
    assert "followed" in app.scores.value and "1.000" in app.scores.value

    app.instruction.value = "   "  # bad input: a message to fix it, not a crash
    app.button.click()
    assert "instruction" in app.scores.value and "empty" in app.scores.value


def test_button_passes_the_chosen_model_and_steps_and_shows_the_judge(app):
    calls = []

    def darken(source, instruction, steps):  # records what the callback passed
        calls.append(("darken", instruction, steps))
        return (source // (steps + 1)).astype(np.uint8)

    app.editors["darken"] = darken
    app.model.options = list(app.editors)
    app.image_choice.value = "light"
    app.instruction.value = "invert the picture"
    app.model.value = "darken"
    app.steps.value = 3
    app.button.click()
    assert calls == [("darken", "invert the picture", 3)]
    assert np.array_equal(app.last_edited, _image(200) // 4)
    assert app.last_scores == {"followed": 1.0, "changed": float(np.mean(_image(200) != _image(200) // 4))}
    assert "<b>darken</b>, 3 steps" in app.scores.value and f"{app.last_scores['changed']:.3f}" in app.scores.value

    app.model.value = "identity"  # another model on the same image: nothing changes, the judge says so
    app.steps.value = 9
    app.button.click()
    assert len(calls) == 1 and np.array_equal(app.last_edited, _image(200))
    assert app.last_scores["changed"] == 0.0 and "<b>identity</b>, 9 steps" in app.scores.value


def test_uploaded_png_goes_through_the_loader(app, monkeypatch):
    import nb_edit.core.images
    import nb_edit.notebook.widgets

    calls = []
    real_load_image = nb_edit.core.images.load_image

    def spy(path, **kwargs):
        calls.append(kwargs)
        return real_load_image(path, **kwargs)

    monkeypatch.setattr(nb_edit.notebook.widgets, "load_image", spy)
    picture = np.zeros((40, 40, 3), np.uint8)
    picture[:, :20] = (0, 255, 0)
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    content = buffer.getvalue()
    app.upload.value = ({"name": "photo.png", "type": "image/png", "size": len(content),
                         "content": memoryview(content), "last_modified": UPLOAD_TIME},)
    assert calls == [{"size": (SIZE, SIZE)}]
    key = widgets.UPLOAD_PREFIX + "photo.png"
    assert app.image_choice.value == key
    uploaded = app.images[key]
    assert uploaded.shape == (SIZE, SIZE, 3) and uploaded.dtype == np.uint8
    assert tuple(uploaded[SIZE // 2, 0]) == (0, 255, 0) and tuple(uploaded[SIZE // 2, -1]) == (0, 0, 0)

    app.instruction.value = "invert"
    app.button.click()
    assert np.array_equal(app.last_edited, 255 - uploaded)

    app.upload.value = ({"name": "broken.png", "type": "image/png", "size": 3,
                         "content": memoryview(b"abc"), "last_modified": UPLOAD_TIME},)
    assert "broken.png" not in app.image_choice.value and "not a readable image" in app.scores.value


def test_upload_falls_back_to_pil_without_the_images_module(monkeypatch):
    monkeypatch.setitem(sys.modules, "nb_edit.core.images", None)  # makes the import raise ImportError
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 12, 3), 77, np.uint8)).save(buffer, format="PNG")
    decoded = widgets.decode_upload(buffer.getvalue(), "x.png", (SIZE, SIZE))
    assert decoded.shape == (SIZE, SIZE, 3) and np.all(decoded == 77)
    with pytest.raises(BadInputError, match="not a readable image"):
        widgets.decode_upload(b"junk", "junk.png", (SIZE, SIZE))
