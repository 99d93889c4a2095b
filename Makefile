# snapbuild: the two fresh-machine commands are `make demo` and `make test`.
VENV    := .venv
PY      := $(VENV)/bin/python

.PHONY: setup demo test bench clean

setup:
	@ci/setup.sh

demo: setup
	@ci/demo.sh

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) tests/bench/bench_pipeline.py

clean:
	rm -rf .snapbuild .pytest_cache
