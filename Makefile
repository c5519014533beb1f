# Two entry points (see README): `make app` and `make test`. Everything else is their plumbing.
# TORCH pins the CPU wheel that ships with our dev machines; on a GPU box use `make app TORCH=torch`.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: app test test-fast lint install browser

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)" -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# Debian's chromium for the browser tests; Playwright never downloads a browser here.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# The app on the embedded demo library; it prints its local URL. ARGS passes options, e.g.
# make app ARGS="--registry hf --library alice/skills".
app: $(STAMP)
	$(BIN)/quiver app $(ARGS)

test: $(STAMP) browser lint
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not browser"

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
