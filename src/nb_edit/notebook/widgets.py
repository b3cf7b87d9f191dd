"""An interactive editor for the notebooks: pick or upload an image, type an instruction, run a model.

The app knows nothing about the models: an editor is any callable ``(source uint8 (H, W, 3),
instruction, steps) -> edited uint8 (H, W, 3)`` and the judge (optional) any callable ``(source,
instruction, edited) -> {score name: value}``. All the logic is in :meth:`EditorApp.run_edit`, a
plain method that tests and scripts call without a browser; the button only reads the widgets,
calls it and draws the result.

    app = EditorApp({"np-edit": npedit_fn, "supervised": sup_fn}, test_images, judge=judge_fn)
    app.widget                      # the VBox to display in a notebook
"""

from __future__ import annotations

import html
import io
import tempfile
from pathlib import Path
from typing import Callable, Mapping

import ipywidgets as widgets
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from nb_edit.core.images import load_image
from nb_edit.core.validation import BadInputError, check_instruction

__all__ = ["EditorApp", "decode_upload", "side_by_side_png"]

Editor = Callable[[np.ndarray, str, int], np.ndarray]
Judge = Callable[[np.ndarray, str, np.ndarray], Mapping[str, float]]
UPLOAD_PREFIX = "upload: "


def _check_rgb(image, name: str) -> np.ndarray:
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
        raise BadInputError(name, f"expected a uint8 array (H, W, 3), got dtype {array.dtype} shape "
                            f"{array.shape}", "return/pass images as the world renders them "
                            "(nb_edit.core.images.to_uint8 converts model tensors)")
    return array


def decode_upload(content: bytes, filename: str, size: tuple[int, int]) -> np.ndarray:
    """Uploaded file bytes -> uint8 RGB (H, W, 3) of ``size`` = (height, width).

    Goes through ``nb_edit.core.images.load_image``: format, corruption and size checks, EXIF
    rotation, centre crop.
    """
    # load_image reads paths (so it can name the file in its errors): give it a temporary one.
    suffix = Path(filename).suffix or ".png"
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"upload{suffix}"
        path.write_bytes(bytes(content))
        return load_image(path, size=tuple(size))


def side_by_side_png(images: list[np.ndarray], scale: int = 8, gap: int = 8) -> bytes:
    """PNG bytes of images placed left to right (``gap`` white pixels apart), nearest-upscaled so
    small renders stay crisp."""
    height = max(image.shape[0] for image in images) * scale
    tiles = []
    for image in images:
        tile = np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)
        canvas = np.full((height, tile.shape[1], 3), 255, np.uint8)
        canvas[: tile.shape[0]] = tile
        tiles += [canvas, np.full((height, gap, 3), 255, np.uint8)]
    buffer = io.BytesIO()
    Image.fromarray(np.concatenate(tiles[:-1], axis=1)).save(buffer, format="PNG")
    return buffer.getvalue()


class EditorApp:
    """Test image or upload + instruction + model + steps -> source | result, and the judge's scores."""

    def __init__(self, editors: Mapping[str, Editor], test_images: Mapping[str, np.ndarray],
                 judge: Judge | None = None, steps: int = 4, max_steps: int = 50, scale: int = 8):
        if not editors or not all(callable(editor) for editor in editors.values()):
            raise BadInputError("editors", "expected a non-empty {name: callable(source, instruction, "
                                "steps) -> edited}", "wrap each model in such a function")
        if not test_images:
            raise BadInputError("test_images", "is empty", "pass {name: uint8 (H, W, 3) image}")
        if judge is not None and not callable(judge):
            raise BadInputError("judge", f"not callable ({type(judge).__name__})",
                                "pass a function (source, instruction, edited) -> dict, or None")
        self.editors = dict(editors)
        self.judge = judge
        self.scale = scale
        self.images = {str(name): _check_rgb(image, f"test_images[{name!r}]")
                       for name, image in test_images.items()}
        sizes = {image.shape[:2] for image in self.images.values()}
        if len(sizes) != 1:
            raise BadInputError("test_images", f"have different sizes {sorted(sizes)}",
                                "render or load them at one size (load_image(path, size=...))")
        self.image_size: tuple[int, int] = sizes.pop()
        self.last_source: np.ndarray | None = None
        self.last_edited: np.ndarray | None = None
        self.last_scores: dict[str, float] = {}

        self.image_choice = widgets.Dropdown(options=list(self.images), description="image")
        self.upload = widgets.FileUpload(accept="image/*", multiple=False, description="upload")
        self.instruction = widgets.Text(placeholder="e.g. make the circle red", description="instruction")
        self.model = widgets.Dropdown(options=list(self.editors), description="model")
        self.steps = widgets.IntSlider(value=steps, min=1, max=max(max_steps, steps), description="steps")
        self.button = widgets.Button(description="Edit", button_style="primary", icon="magic")
        self.picture = widgets.Image(format="png")
        self.scores = widgets.HTML()
        self.output = widgets.Output()  # messages, and tracebacks of unexpected errors
        self.button.on_click(self.on_click)
        self.upload.observe(self.on_upload, names="value")
        self._box = widgets.VBox([
            widgets.HBox([self.image_choice, self.upload]),
            self.instruction,
            widgets.HBox([self.model, self.steps, self.button]),
            widgets.HBox([self.picture, self.scores]),
            self.output,
        ])

    @property
    def widget(self) -> widgets.VBox:
        return self._box

    def _source(self, image: str | np.ndarray) -> np.ndarray:
        if isinstance(image, str):
            if image not in self.images:
                raise BadInputError(f"image {image!r}", "is not a test image or an upload",
                                    f"choose one of {sorted(self.images)}")
            return self.images[image]
        array = _check_rgb(image, "image")
        if array.shape[:2] != self.image_size:
            raise BadInputError("image", f"size {array.shape[:2]} differs from the test images' "
                                f"{self.image_size}", "resize it, e.g. load_image(path, size=...)")
        return array

    def run_edit(self, image: str | np.ndarray, instruction: str, model: str,
                 steps: int) -> tuple[np.ndarray, dict[str, float]]:
        """Edit ``image`` (a test image's name or an array) with one model; return (edited, scores).

        Scores are the judge's (empty without a judge).
        """
        source = self._source(image)
        instruction = check_instruction(instruction)
        if model not in self.editors:
            raise BadInputError(f"model {model!r}", "unknown", f"choose one of {sorted(self.editors)}")
        if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
            raise BadInputError(f"steps={steps!r}", "not a positive int", "use e.g. steps=4")
        # A copy, so an editor that writes into its input cannot change the test image.
        edited = _check_rgb(self.editors[model](source.copy(), instruction, int(steps)),
                            f"output of model {model!r}")
        scores = {}
        if self.judge is not None:
            scores = {str(key): float(value) for key, value in dict(self.judge(source, instruction, edited)).items()}
        self.last_source, self.last_edited, self.last_scores = source, edited, scores
        return edited, scores

    def compare_models(self, image: str | np.ndarray, instruction: str,
                       steps: int) -> dict[str, tuple[np.ndarray, dict[str, float]]]:
        """Every model on one image and instruction: {model: (edited, scores)}, with a progress bar."""
        return {name: self.run_edit(image, instruction, name, steps)
                for name in tqdm(self.editors, desc="models", leave=False)}

    def on_click(self, _button=None) -> None:
        """Button callback: read the widgets, run the edit, draw source | result and the scores."""
        with self.output:
            self.output.clear_output()
            try:
                edited, scores = self.run_edit(self.image_choice.value, self.instruction.value,
                                               self.model.value, self.steps.value)
            except BadInputError as error:  # the user's input: say what to fix, no traceback
                self.scores.value = f"<span style='color:#b00'>{html.escape(str(error))}</span>"
                return
            self.picture.value = side_by_side_png([self.last_source, edited], scale=self.scale)
            rows = "".join(f"<tr><td>{html.escape(key)}</td><td>{value:.3f}</td></tr>"
                           for key, value in scores.items())
            self.scores.value = (f"<b>{html.escape(self.model.value)}</b>, {self.steps.value} steps"
                                 + (f"<table>{rows}</table>" if rows else "<br>(no judge)"))

    def on_upload(self, change) -> None:
        """Upload callback: decode the file at the test images' size and select it in the dropdown."""
        files = change["new"]
        if not files:
            return
        entry = files[-1]
        name = str(entry.get("name", "image"))
        try:
            image = decode_upload(entry["content"], name, self.image_size)
        except BadInputError as error:
            self.scores.value = f"<span style='color:#b00'>{html.escape(str(error))}</span>"
            return
        key = UPLOAD_PREFIX + name
        self.images[key] = image
        self.image_choice.options = list(self.images)
        self.image_choice.value = key
