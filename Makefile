# snapbuild: the two fresh-machine commands are `make demo` and `make test`.
VENV    := .venv
PY      := $(VENV)/bin/python

.PHONY: setup demo test test-fast lint bench clean

setup:
	@ci/setup.sh

demo: setup
	@ci/demo.sh

test: setup lint
	$(PY) -m pytest -q

# ruff over everything; mypy over the schema and the node side (pyproject.toml says which).
lint: setup
	$(VENV)/bin/ruff check snapbuild tests ci
	$(VENV)/bin/mypy

# The unit tests alone (well under a minute): no CRIU, registry or Docker started.
test-fast: setup
	$(PY) -m pytest -q tests/unit

bench: setup
	$(PY) tests/bench/bench_pipeline.py

clean:
	rm -rf .snapbuild .pytest_cache
