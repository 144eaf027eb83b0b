# Two entry points for a fresh machine: `make run` and `make test`. Both are idempotent.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test venv system-deps lint bench clean

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "make: $(PYTHON) not found (agentd needs Python 3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

# The tests need a real mosquitto broker (Debian package), util-linux's unshare, and systemd's
# systemd-analyze to verify the unit file.
system-deps:
	@command -v mosquitto >/dev/null 2>&1 && command -v mosquitto_pub >/dev/null 2>&1 || { \
	  echo "installing mosquitto (Debian package)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq mosquitto mosquitto-clients >/dev/null; }
	@command -v systemd-analyze >/dev/null 2>&1 || { \
	  echo "installing systemd-analyze (Debian package systemd)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq systemd >/dev/null; }

## Set up and start the daemon on the default config, in the foreground (Ctrl-C stops it).
run: venv
	$(BIN)/agentd --config config.toml start

## Set up and run the whole test suite.
test: venv system-deps
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check agentd models sandbox memory_store tests bench

clean:
	rm -rf $(VENV) build *.egg-info
