# Lantern — every target sets up what it needs on a fresh Debian machine (as root) and caches it.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
BUILD := .build
MP := $(BUILD)/micropython/unix/micropython
APT_PACKAGES := build-essential pkg-config libffi-dev libmbedtls-dev patch xz-utils ca-certificates \
                python3-venv python3-dev mosquitto

.PHONY: all demo test test-unit test-hil lint micropython deps venv clean distclean

all: test

## demo: simulated streetlight nodes on MicroPython → gateway → upstream (Ctrl-C stops)
demo: venv micropython
	$(BIN)/lantern demo --nodes $(or $(NODES),3)

## test: install everything the tests need, then run every tier that can run here
test: venv micropython lint
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-unit: venv
	$(BIN)/python -m pytest -q tests

test-hil: venv micropython
	$(BIN)/python -m pytest -q hil_tests

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy

micropython: $(MP)
$(MP): scripts/build-micropython.sh $(BUILD)/stamp-apt
	scripts/build-micropython.sh

deps: $(BUILD)/stamp-apt
$(BUILD)/stamp-apt:
	@mkdir -p $(BUILD)
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
	    | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	    echo "installing Debian packages: $$missing"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -qq -o DPkg::Lock::Timeout=300 $$missing >/dev/null 2>&1 || \
	    { apt-get update -qq && apt-get install -y -qq -o DPkg::Lock::Timeout=300 $$missing; }; \
	fi
	@touch $@

venv: $(BIN)/.stamp
$(BIN)/.stamp: pyproject.toml $(BUILD)/stamp-apt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

clean:
	rm -rf $(BUILD)/demo .pytest_cache .mypy_cache .ruff_cache

distclean: clean
	rm -rf $(VENV) $(BUILD)
