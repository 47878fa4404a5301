# Two commands on a fresh machine: `make run` (set up and start aegisd) and `make test`.
# The first Python 3.11 or newer on PATH (pyproject's floor); PYTHON=/path/to/python overrides it.
ifeq ($(origin PYTHON),undefined)
PYTHON := $(firstword $(foreach p,python3.11 python3.12 python3.13 python3.14 python3,\
            $(shell $(p) -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1 && echo $(p))))
endif
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
UNAME  := $(shell uname -s)

ifeq ($(UNAME),Linux)
EXTRAS := dev,systemd
else
EXTRAS := dev
endif

.PHONY: run test lint typecheck unit proto sysdeps bench benchdeps clean

run: $(STAMP)
	$(BIN)/aegisd

test: $(STAMP)
	@$(MAKE) --no-print-directory benchdeps || echo "wrk/nginx/node missing: the benchmark smoke test will skip"
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest -n 3 --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

proto: $(STAMP)
	$(BIN)/python proto/generate.py

# The gate's benchmark (docs/performance.md); BENCH_ARGS passes options, e.g. BENCH_ARGS=--smoke.
bench: $(STAMP) benchdeps
	$(BIN)/python -m bench $(BENCH_ARGS)

# Load generator and upstreams for `make bench`: wrk, nginx and Node (Debian packages).
benchdeps:
	@{ command -v wrk && { command -v nginx || test -x /usr/sbin/nginx; } && command -v node; } >/dev/null || { \
	  if command -v apt-get >/dev/null; then \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    had_nginx=$$(command -v nginx || test -x /usr/sbin/nginx && echo yes); \
	    $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq wrk nginx-light nodejs >/dev/null || exit 1; \
	    if [ -z "$$had_nginx" ] && [ -d /run/systemd/system ] && systemctl is-enabled --quiet nginx 2>/dev/null; then \
	      echo "benchdeps: the benchmark runs its own nginx; disabling the system nginx service the package started"; \
	      $$SUDO systemctl disable --now --quiet nginx; fi; \
	  else echo "install wrk, nginx and node to run the benchmark"; exit 1; fi; }

# sysdeps runs only when the virtualenv is (re)built: an installed one needs no compiler or headers.
$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "aegis needs Python 3.11 or newer on PATH; or run: make PYTHON=/path/to/python3.11"; exit 1; }
	@$(MAKE) --no-print-directory sysdeps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[$(EXTRAS)]'
	touch $(STAMP)

# systemd-python is compiled here (gcc, against libsystemd's and Python's headers), and Debian's Python needs its
# -venv package for `python -m venv`; install what is missing where we can (Debian/Ubuntu).
PYVER = $(shell $(PYTHON) -c 'import sys; print(*sys.version_info[:2], sep=".")' 2>/dev/null)
PYINCLUDE = $(shell $(PYTHON) -c 'import sysconfig; print(sysconfig.get_paths()["include"])' 2>/dev/null)
sysdeps:
ifeq ($(UNAME),Linux)
	@test -z "$(PYTHON)" || $(PYTHON) -c 'import ensurepip' 2>/dev/null || ! command -v apt-get >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq "python$(PYVER)-venv" >/dev/null; }
	@missing=""; \
	pkg-config --exists libsystemd 2>/dev/null || missing="libsystemd-dev pkg-config"; \
	command -v gcc >/dev/null || missing="$$missing gcc"; \
	test -z "$(PYTHON)" || test -f "$(PYINCLUDE)/Python.h" || missing="$$missing python$(PYVER)-dev"; \
	test -z "$$missing" || { \
	  if command -v apt-get >/dev/null; then \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	  else echo "install a C compiler and the libsystemd and Python headers (Debian: $$missing)"; exit 1; fi; }
endif

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
