# Two entry points: `make demo` and `make test`. Both set up .venv/ first (idempotent).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
PY := $(VENV)/bin/python

.PHONY: setup demo test lint browser postgresql clean-venv

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24" "setuptools>=77"
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	touch $(STAMP)

# Headless Chromium and its WebDriver for the browser tests (Debian packages).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null)

# Debian's PostgreSQL server programs: the tests run a team's Label Studio on a real PostgreSQL (started by the
# tests as an ordinary process on a loopback port, never as a system service).
postgresql:
	@ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null)

demo: setup
	$(VENV)/bin/mammo demo

test: setup browser postgresql
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

clean-venv:
	rm -rf $(VENV)
