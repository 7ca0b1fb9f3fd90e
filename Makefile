# diffusers-grpc: `make demo` (a real image from a real server) and `make test` are the two entry points.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
NODE_STAMP := node_modules/.installed
# checkov (the manifests' policy check) has a venv of its own: it pins many packages the service also uses.
CHECKOV_VENV := .venv-checkov
CHECKOV_STAMP := $(CHECKOV_VENV)/.installed
# Two test files at a time (each file keeps its module fixtures: the servers it starts): 9 minutes, not 11.
PYTEST_ARGS ?= -n 2 --dist loadfile

.PHONY: install demo test pytest unit lint protos check-protos bench soak clean

# The three installs are independent (two venvs and node_modules): run them side by side. pip is mostly one
# core, and checkov alone takes a minute on these machines.
install:
	@$(MAKE) --no-print-directory -j3 $(STAMP) $(NODE_STAMP) $(CHECKOV_STAMP)

# torch first, pinned to the CPU wheel on disk, so nothing later can pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "torch==2.13.0"
	$(PIP) install --quiet -e ".[dev]"
	touch $@

$(CHECKOV_STAMP):
	test -x $(CHECKOV_VENV)/bin/python || $(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install --quiet "checkov==3.3.*"
	touch $@

# buf (proto lint) and the Node.js client of the end-to-end tests; skipped with a note where npm is missing.
# `npm ci` installs exactly package-lock.json and never rewrites it, so a fresh clone stays clean.
$(NODE_STAMP): package.json package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
		npm ci --no-audit --no-fund --loglevel=error && touch $@; \
	else echo "npm not found: the buf lint and Node.js client tests will be skipped"; fi

demo: install
	$(PY) scripts/demo.py --output demo.png

# Lint beside the tests: mypy takes one core for half a minute, while the first tests mostly wait on servers.
test: install
	@$(MAKE) --no-print-directory -j2 lint pytest

pytest: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

unit: install
	$(PY) -m pytest -q tests/unit

lint: install check-protos
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy service model_store batching pipelines
	@if [ -x node_modules/.bin/buf ]; then node_modules/.bin/buf lint && echo "buf lint: ok"; fi

protos: $(STAMP)
	$(PY) scripts/gen_protos.py

check-protos: $(STAMP)
	$(PY) scripts/gen_protos.py --check

bench: install
	$(PY) bench/run.py

# A 10-minute mixed, partly hostile load on a real server, failing on leaks or bad statuses (SOAK_SECONDS, SOAK_CONCURRENCY).
soak: install
	$(PY) bench/soak.py

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) node_modules .pytest_cache .mypy_cache .ruff_cache .diffusers-grpc-home demo.png bench/results
