# The two commands of the README: `make run` (the whole tiny pipeline, headless, with its
# report) and `make test` (unit tests + nbval over notebooks/). Both set up everything
# themselves on a fresh machine and are quick when already set up.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN_ID ?= $(shell date +%Y%m%d-%H%M%S)
# a RUN_ID that already holds a run is refused (its metrics would mix into the new report):
# RUN_FLAGS=--resume runs more notebooks into it with the same parameters, --overwrite replaces it
RUN_FLAGS ?=
PROFILE ?= tiny
PARAMS ?= papermill_runs/$(PROFILE).yaml

.PHONY: setup run test unit nbval lab notebooks pretrain clean-cache

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (nb-edit)" >/dev/null
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(PY) -m nb_edit run --run-id $(RUN_ID) -f $(PARAMS) $(RUN_FLAGS)

# pytest exits 5 when it collects nothing: said aloud, not taken for a failure.
PYTEST_OK = rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; else exit $$rc; fi

test: $(STAMP)
	$(PY) -m pytest -q tests || { $(PYTEST_OK); }
	NB_EDIT_SMOKE=1 $(PY) -m pytest -q -p no:python --nbval-lax --nbval-current-env \
	  --nbval-sanitize-with notebooks/nbval_sanitize.cfg --nbval-cell-timeout 900 notebooks \
	  || { $(PYTEST_OK); }

unit: $(STAMP)
	$(PY) -m pytest -q tests

# The committed notebooks carry the outputs of a tiny run: run the main job, then copy its
# executed notebooks (progress bars as text, no widget state) into notebooks/.
notebooks: $(STAMP)
	$(PY) -m nb_edit run --run-id $(RUN_ID) -f $(PARAMS) $(RUN_FLAGS)
	$(PY) -m nb_edit publish --run-id $(RUN_ID)

lab: $(STAMP)
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks

# WORLD=small makes the stand-ins for another world of the ladder than the profile's
pretrain: $(STAMP)
	$(PY) -m nb_edit pretrain $(if $(WORLD),--world $(WORLD))

clean-cache:
	rm -rf data/cache
