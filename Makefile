# Two commands on a fresh machine: `make run` (set up and start aegisd) and `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
UNAME  := $(shell uname -s)

ifeq ($(UNAME),Linux)
EXTRAS := dev,systemd
else
EXTRAS := dev
endif

.PHONY: run test lint typecheck unit proto sysdeps bench clean

run: $(STAMP)
	$(BIN)/aegisd

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest -n 2 --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

proto: $(STAMP)
	$(BIN)/python proto/generate.py

bench: $(STAMP)
	$(MAKE) -C bench

$(STAMP): pyproject.toml | sysdeps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[$(EXTRAS)]'
	touch $(STAMP)

# systemd-python builds against libsystemd's headers; install them where we can (Debian/Ubuntu).
sysdeps:
ifeq ($(UNAME),Linux)
	@pkg-config --exists libsystemd 2>/dev/null || { \
	  if command -v apt-get >/dev/null; then \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq libsystemd-dev pkg-config gcc >/dev/null; \
	  else echo "install libsystemd headers and pkg-config (package libsystemd-dev / systemd-devel)"; exit 1; fi; }
endif

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
