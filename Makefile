# Two commands a newcomer needs: `make demo` and `make test`. Each creates .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# extra options for `make demo` / `make bench`, e.g. make demo DEMO_ARGS="--threads 1"
DEMO_ARGS ?=
BENCH_ARGS ?=

.PHONY: demo test bench compat install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/condensevit demo --out demo_out $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -n 2

# timm's own generic model tests (tests/test_models.py of the installed timm's sdist) on our models
compat: $(STAMP)
	$(PY) compat/run_timm_tests.py

bench: $(STAMP)
	$(VENV)/bin/condensevit bench --models deit_small_patch16_224,stvit_deit_small_patch16_224,lookupvit_small_patch16_224 --batch-size 32 $(BENCH_ARGS)

clean:
	rm -rf $(VENV) demo_out .pytest_cache build/timm-compat
