"""Notebook hygiene: one typed, commented parameters cell, python3 kernel, small files,
consistent execution counts. papermill's own parser must read every parameter."""

import re

import nbformat
import papermill
import pytest

from nb_edit.core import paths

NOTEBOOKS = sorted(paths.notebooks_dir().glob("[0-9][0-9]_*.ipynb"))
PARAM_LINE = re.compile(r"^(\w+): (str|int|float|bool|list|dict)\s*=\s*(.+?)\s+#\s*\S.*$")
SIZE_CAP = 1_000_000


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ holds no NN_*.ipynb"
    assert NOTEBOOKS[0].name == "00_start_here.ipynb"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_hygiene(path):
    assert path.stat().st_size < SIZE_CAP, f"{path.name} is over {SIZE_CAP} bytes: strip large outputs"
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: {len(tagged)} cells tagged 'parameters', want exactly 1"
    lines = [ln for ln in tagged[0].source.splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines, f"{path.name}: empty parameters cell"
    for line in lines:
        assert PARAM_LINE.match(line), f"{path.name}: parameter line not 'name: type = value  # meaning': {line!r}"
    names = set(papermill.inspect_notebook(str(path)))
    assert len(names) == len(lines), f"{path.name}: papermill parses {sorted(names)} of {len(lines)} lines (no ';' in comments)"
    assert {"profile", "seed", "run_id"} <= names, f"{path.name}: missing a standard parameter"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    counts = [c.execution_count for c in nb.cells if c.cell_type == "code" and c.get("outputs")]
    if counts:
        assert None not in counts, f"{path.name}: outputs without execution counts break nbval"
        assert counts == sorted(counts), f"{path.name}: execution counts out of order"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_validates_and_shows_its_results(path):
    """nbformat's schema holds; the committed copy carries the outputs of a tiny run (a figure or
    printed numbers), with no widget state, no papermill residue, and no progress bar stuck at 0%."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert "widgets" not in nb.metadata and "papermill" not in nb.metadata
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not any("injected-parameters" in c.metadata.get("tags", []) for c in code)
    outputs = [o for c in code for o in c.get("outputs", [])]
    assert any(o.output_type == "stream" and o.name == "stdout" or "image/png" in o.get("data", {})
               for o in outputs), f"{path.name}: committed without results; run `make notebooks`"
    for o in outputs:
        assert "application/vnd.jupyter.widget-view+json" not in o.get("data", {}), f"{path.name}: widget output"
        text = o.get("text", "") if o.output_type == "stream" else ""
        assert not re.search(r"^\S.*:\s+0%\|", text, re.M), f"{path.name}: a progress bar saved at 0%: {text[:80]!r}"


def test_readable_progress_writes_a_bar_s_final_state():
    from nb_edit.notebook.outputs import readable_progress

    def model(name, **state):
        return {"model_name": name, "state": state}

    nb = nbformat.v4.new_notebook()
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {
        "box": model("HBoxModel", children=["IPY_MODEL_l", "IPY_MODEL_b", "IPY_MODEL_r"]),
        "l": model("HTMLModel", value="edits:\u2007100%"), "b": model("FloatProgressModel", value=4.0, max=4.0),
        "r": model("HTMLModel", value="\u20074/4\u2007[00:01&lt;00:00]")}}}
    cell = nbformat.v4.new_code_cell("run()", execution_count=1)
    cell.outputs = [nbformat.v4.new_output("display_data", data={
        "application/vnd.jupyter.widget-view+json": {"model_id": "box", "version_major": 2, "version_minor": 0},
        "text/plain": "edits:   0%|          | 0/4"})]
    nb.cells = [cell]
    assert readable_progress(nb) == 1
    assert cell.outputs[0].output_type == "stream" and cell.outputs[0].text == "edits: 100%|██████████| 4/4 [00:01<00:00]\n"
    assert "widgets" not in nb.metadata
    nbformat.validate(nb)

    # a bar tqdm hid on closing (leave=False), finished before its first refresh: its saved text is
    # still "0%", and a live notebook shows nothing, so neither does the saved one
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {
        "box": model("HBoxModel", children=["IPY_MODEL_l", "IPY_MODEL_b", "IPY_MODEL_r"], layout="IPY_MODEL_lay"),
        "lay": model("LayoutModel", visibility="hidden"),
        "l": model("HTMLModel", value="copy:\u2007\u20070%"), "b": model("FloatProgressModel", value=8.0, max=8.0),
        "r": model("HTMLModel", value="\u20070/8\u2007[00:00&lt;?, ?it/s]")}}}
    cell.outputs = [nbformat.v4.new_output("display_data", data={
        "application/vnd.jupyter.widget-view+json": {"model_id": "box", "version_major": 2, "version_minor": 0},
        "text/plain": "copy:   0%|          | 0/8"}), nbformat.v4.new_output("stream", name="stdout", text="done\n")]
    assert readable_progress(nb) == 1
    assert [o.get("text") for o in cell.outputs] == ["done\n"]


def test_small_png_fits_the_budget_and_stays_a_picture():
    import base64
    import io

    import numpy as np
    from PIL import Image

    from nb_edit.notebook.outputs import small_png

    noise = np.random.default_rng(0).integers(0, 256, (600, 800, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    big = base64.b64encode(buffer.getvalue()).decode("ascii")
    small = small_png(big, budget=100_000)
    assert len(base64.b64decode(small)) <= 100_000 < len(buffer.getvalue())
    with Image.open(io.BytesIO(base64.b64decode(small))) as image:
        assert image.format == "PNG" and image.width <= 800 and image.width / image.height == 800 / 600
    assert small_png(small, budget=100_000) == small  # already small: kept as it is
