"""Executed notebooks that read well without a kernel: progress bars as their last line of text,
and the copies committed in ``notebooks/`` made from a run.

A progress bar of ``tqdm.auto`` in a kernel is an ipywidget: the saved output holds only the
widget's first text ("0%|") and its final state lives in the notebook's widget metadata, which a
viewer without the widget manager ignores. :func:`readable_progress` writes each bar's final
state as plain text in place of the widget and drops the widget state, so a saved notebook shows
"100%| 256/256 [00:03<00:00]" where it showed "0%". :func:`publish` turns a run's executed
notebook into the committed copy: papermill's injected parameters and timings removed, execution
counts kept (nbval needs them next to outputs), figures re-encoded as small PNGs
(:func:`small_png`: a 256-colour palette, then halved until under a size), schema-validated.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import nbformat
from PIL import Image

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


def _bar_text(models: dict, model_id: str) -> str | None:
    """The final text of a tqdm widget (an HBox of HTML, FloatProgress, HTML), "" for a bar that
    tqdm hid when it closed (``leave=False``: a viewer with widgets shows nothing; its saved text
    may still be the first one, "0%", when it ended before its first refresh), or None."""
    box = models.get(model_id, {})
    children = [models.get(child.replace("IPY_MODEL_", ""), {}) for child in box.get("state", {}).get("children", [])]
    kinds = [child.get("model_name") for child in children]
    if kinds != ["HTMLModel", "FloatProgressModel", "HTMLModel"]:
        return None
    layout = models.get(str(box.get("state", {}).get("layout", "")).replace("IPY_MODEL_", ""), {})
    if layout.get("state", {}).get("visibility") == "hidden":
        return ""
    left, bar, right = (child.get("state", {}) for child in children)
    value, most = bar.get("value") or 0.0, bar.get("max") or 0.0
    filled = int(round(10 * value / most)) if most else 0
    text = f"{left.get('value', '')}|{'█' * filled}{' ' * (10 - filled)}|{right.get('value', '')}"
    return html.unescape(text).replace("\u2007", " ")


def readable_progress(notebook: nbformat.NotebookNode) -> int:
    """Replace widget progress bars by their final text (hidden ones by nothing) and drop the
    widget state; returns how many bars it replaced."""
    state = notebook.metadata.pop("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    replaced = 0
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        outputs = []
        for output in cell.get("outputs", []):
            # a widget shown by display() or as a cell's value (the interactive editor is the latter)
            shown = output.get("output_type") in ("display_data", "execute_result")
            view = output.get("data", {}).get(WIDGET_VIEW) if shown else None
            if view is None:
                outputs.append(output)
                continue
            text = _bar_text(state, view.get("model_id", ""))
            if text is None:  # another widget (the interactive editor): keep its text fallback only
                plain = output["data"].get("text/plain")
                if plain:
                    outputs.append(nbformat.v4.new_output("display_data", data={"text/plain": plain}))
                continue
            if text:  # a hidden bar (leave=False) leaves no text, as in a live notebook
                outputs.append(nbformat.v4.new_output("stream", name="stderr", text=text + "\n"))
            replaced += 1
        cell.outputs = outputs
    return replaced


def clean_file(path: str | Path) -> int:
    """:func:`readable_progress` on a saved notebook, in place."""
    notebook = nbformat.read(str(path), as_version=4)
    replaced = readable_progress(notebook)
    nbformat.write(notebook, str(path))
    return replaced


PNG_BUDGET = 120_000  # bytes per figure in a committed notebook; the run folder keeps the original


def small_png(data: str, budget: int = PNG_BUDGET) -> str:
    """A base64 PNG re-encoded to fit ``budget`` bytes: first as a 256-colour palette (plots and
    the world's flat-coloured shapes lose nothing visible), then halved in size until it fits."""
    raw = base64.b64decode(data)
    if len(raw) <= budget:
        return data
    with Image.open(io.BytesIO(raw)) as opened:
        image = opened.convert("RGB")
    while True:
        buffer = io.BytesIO()
        image.quantize(colors=256).save(buffer, format="PNG", optimize=True)
        if buffer.tell() <= budget or min(image.size) <= 64:
            return base64.b64encode(buffer.getvalue()).decode("ascii")
        image = image.resize((image.width // 2, image.height // 2), Image.LANCZOS)


def publish(executed: str | Path, destination: str | Path) -> None:
    """Write a run's executed notebook to ``destination`` as the committed copy with outputs."""
    notebook = nbformat.read(str(executed), as_version=4)
    readable_progress(notebook)
    notebook.cells = [cell for cell in notebook.cells if "injected-parameters" not in cell.metadata.get("tags", [])]
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if "image/png" in output.get("data", {}):
                output["data"]["image/png"] = small_png(output["data"]["image/png"])
    for cell in notebook.cells:
        for key in ("papermill", "execution"):
            cell.metadata.pop(key, None)
        if not cell.metadata.get("tags"):
            cell.metadata.pop("tags", None)
    notebook.metadata.pop("papermill", None)
    notebook.metadata.setdefault("kernelspec", {"display_name": "Python 3", "language": "python"})["name"] = "python3"
    nbformat.validate(notebook)
    nbformat.write(notebook, str(destination))
