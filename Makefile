# Two commands: `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint install bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip==25.3
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/tanium-connector demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# unit tests only (no broker, no subprocess of the connector), less the few marked slow: under a minute
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow" tests/unit $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check connector tests pipelines
	$(BIN)/ruff format --check connector tests pipelines
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/tanium-connector bench --repeat 3

clean:
	rm -rf $(VENV) .state build *.egg-info
