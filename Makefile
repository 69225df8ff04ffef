# optserve: `make serve` starts the server, `make test` runs the test suite. Both create .venv when missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch 2.13.0 is looked up in a local wheel folder first when the machine has one.
WHEELS ?= /opt/wheels
PIP    := $(BIN)/python -m pip
PIP_FLAGS := --disable-pip-version-check $(if $(wildcard $(WHEELS)),--find-links $(WHEELS),)
# tests/test_docs_browser.py drives Debian's Chromium (as root, install-test installs it: ~30 s, 414 MB); it fails
# without one unless OPTSERVE_SKIP_BROWSER_TESTS=1.
CHROMIUM ?= /usr/bin/chromium
APT_CHROMIUM := DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium

.PHONY: serve test bench install install-test lint format clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# `OPTSERVE_STORE=ray make serve` installs the [ray] extra (the server and Ray) and serves on a local Ray.
EXTRAS := $(if $(filter ray,$(OPTSERVE_STORE)),ray,server)

install: $(BIN)/python
	$(PIP) install -q $(PIP_FLAGS) -e '.[$(EXTRAS)]'

install-test: $(BIN)/python
	$(PIP) install -q $(PIP_FLAGS) -e '.[test,dev]'
	@test -x $(CHROMIUM) || [ "$$(id -u)" != 0 ] || { echo "installing Debian's chromium for the browser tests"; \
		$(APT_CHROMIUM) >/dev/null || { apt-get update -qq && $(APT_CHROMIUM) >/dev/null; }; }
	@test -x $(CHROMIUM) || echo "warning: no $(CHROMIUM): tests/test_docs_browser.py will fail; install Debian's" \
		"chromium (make install-test does as root) or set OPTSERVE_SKIP_BROWSER_TESTS=1" >&2

serve: install
	$(BIN)/optserve serve

# The suite on TEST_WORKERS processes (pytest-xdist): the tests on the test process's Ray run on one of them, the
# multi-node cluster's on one, any other file's tests on one (tests/conftest.py); TEST_WORKERS=0 runs it in one.
TEST_WORKERS ?= 2
test: install-test
	$(BIN)/python -m pytest $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder)

# The benchmark needs the server, torch (its comparison points), Ray (table 5) and Debian's wrk (tables 3 and 5:
# installed here as root when missing).
bench: install-test
	@command -v wrk >/dev/null || [ "$$(id -u)" != 0 ] || { echo "installing Debian's wrk for the benchmark"; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }; }
	$(BIN)/python bench/run.py $(ARGS)

lint: install-test
	$(BIN)/ruff check service client tests examples bench locustfile.py
	$(BIN)/ruff format --check service client tests examples bench locustfile.py
	$(BIN)/mypy service client

format: install-test
	$(BIN)/ruff format service client tests
	$(BIN)/ruff check --fix service client tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
