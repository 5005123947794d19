# make setup | make test | make demo
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test demo demo-images clean
setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest tests

demo: setup
	$(BIN)/python jobs/demo.py

demo-images: setup
	$(BIN)/python jobs/demo.py --modality image

clean:
	rm -rf $(VENV) runs .pytest_cache
