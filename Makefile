# ddim-inversion developer entry points.
#   make setup                 host ComfyUI 0.3.75 + .venv + link the pack (tools/setup.sh, idempotent)
#   make test                  (setup, then) lint (ruff), python tests (pytest), js unit tests (node --test); fails if any fails
#   make test PYTEST_ARGS="tests/host -k flux"    pass arguments through to pytest (default: tests)
#   make test-fast             unit tier without the tests marked slow (bench smoke runs, .ci scripts) + js
#   make test-precision        the tests marked `precision` again on another MKL code path (PRECISION_ENV,
#                              default MKL_CBWR=COMPATIBLE), so a bar tuned to one CPU's kernels fails here too
#   make lint                  ruff (configured in pyproject.toml)
#   make demo [CKPT=name]      (setup, then) end-to-end demo (tools/demo.py)
#   make bench                 fidelity benchmark (bench/fidelity.py)
PY ?= .venv/bin/python
NODE ?= node
PYTEST_ARGS ?= tests
# pytest-xdist: one worker per logical CPU, at most 4 (each boots its own ComfyUI); PYTEST_WORKERS=0 runs in one
# process. The tests run one torch thread each (tests/conftest.py), so one process leaves the other cores idle.
PYTEST_WORKERS ?= logical
# (only when the venv has pytest-xdist: test-fast/test-py/test-precision do not run setup, which installs it; to
# run in one process use PYTEST_WORKERS=0, not -p no:xdist)
XDIST = $(shell $(PY) -c "import xdist" >/dev/null 2>&1 && echo "-n $(PYTEST_WORKERS) --maxprocesses 4")
# optional: file that receives pytest's exit code (used by .ci/run to tell "no tests collected" apart)
PYTEST_RC_FILE ?=
# the environment test-precision runs under: MKL's SSE2 branch, which differs from the default kernels of every
# current x86 CPU, Intel or AMD (MKL_ENABLE_INSTRUCTIONS=SSE4_2 changed nothing on an AMD EPYC: default kernels)
PRECISION_ENV ?= MKL_CBWR=COMPATIBLE

.PHONY: setup test test-fast test-precision test-py test-js lint demo bench

setup:
	bash tools/setup.sh

test: setup
	@lrc=0; $(PY) -m ruff check . || lrc=$$?; \
	rc=0; \
	$(PY) -m pytest -q $(XDIST) --durations=30 --durations-min=5 $(PYTEST_ARGS) || rc=$$?; \
	if [ -n "$(PYTEST_RC_FILE)" ]; then echo $$rc > "$(PYTEST_RC_FILE)"; fi; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5)" >&2; fi; \
	jrc=0; \
	if command -v $(NODE) >/dev/null 2>&1; then \
	  $(NODE) --test js/tests/ || jrc=$$?; \
	else \
	  echo "make test: node not found (Node.js >= 18 is needed for js/tests)" >&2; jrc=127; \
	fi; \
	if [ $$lrc -ne 0 ] || [ $$rc -ne 0 ] || [ $$jrc -ne 0 ]; then \
	  echo "make test: FAILED (ruff exit $$lrc, pytest exit $$rc, node --test exit $$jrc)" >&2; exit 1; \
	fi; \
	echo "make test: OK (ruff, pytest and node --test passed)"

test-precision:
	@rc=0; env $(PRECISION_ENV) $(PY) -m pytest -q $(XDIST) -m precision $(PYTEST_ARGS) || rc=$$?; \
	if [ -n "$(PYTEST_RC_FILE)" ]; then echo $$rc > "$(PYTEST_RC_FILE)"; fi; \
	if [ $$rc -ne 0 ]; then echo "make test-precision: FAILED (pytest exit $$rc, $(PRECISION_ENV))" >&2; exit 1; fi; \
	echo "make test-precision: OK ($(PRECISION_ENV))"

test-fast:
	$(PY) -m pytest -q $(XDIST) -m "not slow" tests/unit
	$(NODE) --test js/tests/

lint:
	$(PY) -m ruff check .

test-py:
	$(PY) -m pytest -q $(XDIST) $(PYTEST_ARGS)

test-js:
	$(NODE) --test js/tests/

demo: setup
	$(PY) tools/demo.py $(if $(CKPT),--ckpt $(CKPT))

bench:
	$(PY) bench/fidelity.py
