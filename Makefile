# snapbuild: the two fresh-machine commands are `make demo` and `make test`.
VENV    := .venv
PY      := $(VENV)/bin/python

.PHONY: setup demo test test-fast bench clean

setup:
	@ci/setup.sh

demo: setup
	@ci/demo.sh

test: setup
	$(PY) -m pytest -q

# The unit tests alone (well under a minute): no CRIU, registry or Docker started.
test-fast: setup
	$(PY) -m pytest -q tests/unit

bench: setup
	$(PY) tests/bench/bench_pipeline.py

clean:
	rm -rf .snapbuild .pytest_cache
