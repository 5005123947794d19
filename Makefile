# make setup | make test | make demo | make demo-images | make demo-pitch
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup test demo demo-images demo-pitch clean
setup: $(STAMP)

# Idempotent: the venv is (re)installed only when pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest tests --durations=15 $(PYTEST_ARGS)

demo: setup
	$(BIN)/python jobs/demo.py

demo-images: setup
	$(BIN)/python jobs/demo.py --modality image

demo-pitch: setup
	$(BIN)/python jobs/demo_pitch.py

clean:
	rm -rf $(VENV) runs .pytest_cache
