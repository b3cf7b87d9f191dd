"""Notebook hygiene: one typed, commented parameters cell, python3 kernel, small files,
consistent execution counts. papermill's own parser must read every parameter."""

import re

import nbformat
import pytest
import papermill

from nb_edit import paths

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
