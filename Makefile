# snapbuild: the two fresh-machine commands are `make demo` and `make test`.
VENV    := .venv
PY      := $(VENV)/bin/python
export SNAPBUILD_DEMO_HOME ?= $(CURDIR)/.snapbuild/demo

.PHONY: setup demo test bench clean

setup:
	@ci/setup.sh

demo: setup
	@SNAPBUILD_HOME=$(SNAPBUILD_DEMO_HOME) $(PY) -m snapbuild.demo

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) tests/bench/bench_pipeline.py

clean:
	rm -rf .snapbuild .pytest_cache
