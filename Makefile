# Lantern — every target sets up what it needs on a fresh Debian machine (as root) and caches it.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
BUILD := .build
MP := $(BUILD)/micropython/unix/micropython
APT_PACKAGES := build-essential pkg-config libffi-dev libmbedtls-dev patch xz-utils ca-certificates \
                python3-venv python3-dev mosquitto
# status page tests drive Debian's headless Chromium; the unit is checked by systemd-analyze
APT_PACKAGES += chromium systemd
# reliability scenario 6: the gateway's state on a small ext4 image (mkfs.ext4, e2fsck; unshare)
APT_PACKAGES += e2fsprogs util-linux
# the shipped alert rules are checked and unit-tested by promtool (Debian's prometheus package)
APT_PACKAGES += prometheus
# the cabinet power-cut scenario: the gateway's state on a FUSE filesystem (mfusepy over libfuse3)
APT_PACKAGES += libfuse3-3 fuse3

.PHONY: all demo test test-unit test-hil lint micropython deps venv clean distclean
.PHONY: install uninstall dist lock sbom
.PHONY: bench node-red
.PHONY: qemu-image soak
.PHONY: reliability adversarial

all: test

## demo: simulated streetlight nodes on MicroPython → gateway → upstream (Ctrl-C stops)
demo: venv micropython
	$(BIN)/lantern demo --nodes $(or $(NODES),3)

## test: install everything the tests need, then run every tier that can run here
# Side by side (pytest-xdist): most of the time goes to hil tests waiting on links and timers,
# so a few more workers than cores pay. TEST_JOBS=0 runs in one process.
TEST_JOBS ?= 3
test: venv micropython node-red qemu-image lint
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_JOBS) --dist worksteal

VERSION = $(shell sed -n 's/^FIRMWARE_VERSION = "\(.*\)"$$/\1/p' firmware/node/app.py)
DIST := $(BUILD)/dist

## dist: the gateway's offline bundle (docs/install.md): Lantern's wheel and every locked
## dependency for CPython 3.11 on x86_64, aarch64 and armv7l, the installer, the unit and a
## SHA-256 manifest, in .build/dist/lantern-VERSION/ and lantern-VERSION-gateway.tar.gz.
## Downloads are hash-checked and cached in .build/wheelhouse (a rebuild asks no index).
dist:
	$(PYTHON) packaging/dist.py --out $(DIST)

## install: the gateway from that bundle, as root, with no network (docs/install.md):
## /opt/lantern/releases, /etc/lantern/{gateway,keys}.toml, user lantern, the unit; an
## upgrade keeps config, keys and queue, and rolls back if the new version is not ready
install: dist
	$(DIST)/lantern-$(VERSION)/install.sh

## uninstall: remove the code and the unit; config, keys and queue stay (PURGE=1 removes them)
uninstall:
	packaging/install.sh --uninstall $(if $(PURGE),--purge)

## lock: pin the gateway's dependencies (pyproject.toml) with hashes in packaging/requirements.lock
LOCK_VENV := $(BUILD)/lock-venv
lock:
	test -x $(LOCK_VENV)/bin/pip-compile || { $(PYTHON) -m venv $(LOCK_VENV) && \
	    $(LOCK_VENV)/bin/pip install -q pip-tools==7.7.0; }
	env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null $(LOCK_VENV)/bin/pip-compile --quiet \
	    --generate-hashes --strip-extras --allow-unsafe --no-emit-index-url --no-emit-find-links \
	    --output-file packaging/requirements.lock pyproject.toml packaging/requirements.in

## sbom: a CycloneDX SBOM of the gateway as installed from the bundle plus the node's firmware
## (MicroPython, the modules), validated against the CycloneDX schema (docs/install.md)
sbom: venv dist
	$(BIN)/python packaging/sbom.py --bundle $(DIST)/lantern-$(VERSION) \
	    --out $(DIST)/lantern-$(VERSION).cdx.json

test-unit: venv
	$(BIN)/python -m pytest -q tests

test-hil: venv micropython
	$(BIN)/python -m pytest -q hil_tests

## adversarial: only the adversarial tier (part of `make test`; docs/security.md)
adversarial: venv micropython
	$(BIN)/python -m pytest -q -p no:cacheprovider -m adversarial tests hil_tests

## reliability: every reliability scenario at full size (lossy line, gateway SIGKILLs, a day
## without upstream under a disk cap, node power cuts, 200,000 fuzz cases, disk full and
## read-only, 100 cabinet power cuts that drop every unflushed write); prints a JSON table
## and writes it into docs/reliability.md
reliability: venv micropython
	$(BIN)/python -m lantern.tools.street.reliability

## bench: throughput, latency, memory and bytes on the wire, side by side with Node-RED and
## the line rate (docs/performance.md); prints one JSON object, writes bench/results.json
bench: venv micropython node-red
	@$(BIN)/python -m bench.run --out bench/results.json

## node-red: the benchmark's peer, from npm with the machine's Node.js, cached in .build/node-red
NODE_RED := $(BUILD)/node-red/node_modules/node-red/red.js
node-red: $(NODE_RED)
$(NODE_RED): bench/node-red/package.json $(BUILD)/stamp-apt
	@command -v npm >/dev/null || { export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -qq -o DPkg::Lock::Timeout=300 nodejs npm >/dev/null 2>&1 || \
	    { apt-get update -qq && apt-get install -y -qq -o DPkg::Lock::Timeout=300 nodejs npm; }; }
	mkdir -p $(BUILD)/node-red
	cp bench/node-red/package.json $(BUILD)/node-red/package.json
	cd $(BUILD)/node-red && npm install --no-audit --no-fund --omit=dev --loglevel=error
	@touch $@

## the firmware against the ESP32 port's API: micropython-esp32-stubs (the MicroPython release
## we build) over micropython-stdlib-stubs, assembled as a typeshed so CPython's stdlib stays out
## (an import of a CPython-only module fails). The unix and qemu HALs are the simulated boards':
## they are followed silently. [misc] is off for the `const` fallback every module defines.
MPY_TYPESHED := $(BUILD)/mpy-typeshed
FIRMWARE_TYPED = firmware/main.py $(filter-out firmware/node/hal/unix.py firmware/node/hal/qemu.py,\
                 $(shell find firmware/node -name '*.py'))
$(MPY_TYPESHED)/.stamp: $(BIN)/.stamp
	rm -rf $(MPY_TYPESHED) && mkdir -p $(MPY_TYPESHED)/stubs
	sp=$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	cp -r $$sp/stdlib $(MPY_TYPESHED)/stdlib && \
	cp -r $$sp/mypy/typeshed/stubs/mypy-extensions $(MPY_TYPESHED)/stubs/ && \
	record=$$(ls $$sp/micropython_esp32_stubs-*.dist-info/RECORD) && \
	for f in $$(grep -o '^[^,]*\.pyi' $$record); do \
	    mkdir -p $(MPY_TYPESHED)/stdlib/$$(dirname $$f) && cp $$sp/$$f $(MPY_TYPESHED)/stdlib/$$f; \
	done && \
	for m in $$(grep -o '^[^,]*\.pyi' $$record | sed 's#/.*##; s#\.pyi$$##' | sort -u); do \
	    grep -q "^$$m:" $(MPY_TYPESHED)/stdlib/VERSIONS || echo "$$m: 3.0-" >> $(MPY_TYPESHED)/stdlib/VERSIONS; \
	done
	@touch $@

lint: venv $(MPY_TYPESHED)/.stamp
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/mypy --config-file= --custom-typeshed-dir $(MPY_TYPESHED) --python-version 3.11 \
	    --no-site-packages --follow-imports=silent --disable-error-code misc $(FIRMWARE_TYPED)

## qemu-image: the node firmware frozen into MicroPython's qemu port (mps2-an385, Cortex-M3,
## ESP32-sized heap), .build/qemu/firmware.elf (docs/qemu.md)
qemu-image: $(MP) $(BUILD)/stamp-apt-qemu
	@if [ -e $(QEMU_UNAVAILABLE) ]; then \
	    echo "!!!!!! qemu-image NOT BUILT, THE QEMU TIER WILL BE SKIPPED: $$(cat $(QEMU_UNAVAILABLE))"; \
	else scripts/build-qemu-image.sh; fi

## soak: 30 minutes of compressed operation on the QEMU board (slow: not part of `make test`)
soak: venv qemu-image
	$(BIN)/python -m pytest -q -p no:cacheprovider -m slow -rP hil_tests/test_qemu.py

# The QEMU tier's tools, apart from APT_PACKAGES: where apt cannot provide them, every other
# tier still runs, and the QEMU tier is skipped saying why (hil_tests/test_qemu.py).
QEMU_APT_PACKAGES := qemu-system-arm gcc-arm-none-eabi libnewlib-arm-none-eabi
QEMU_UNAVAILABLE := $(BUILD)/qemu/UNAVAILABLE
$(BUILD)/stamp-apt-qemu: $(BUILD)/stamp-apt
	@mkdir -p $(BUILD)/qemu
	@missing=$$(for p in $(QEMU_APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
	    | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	    echo "installing Debian packages: $$missing"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -qq -o DPkg::Lock::Timeout=300 $$missing >/dev/null 2>&1 || \
	    { apt-get update -qq && apt-get install -y -qq -o DPkg::Lock::Timeout=300 $$missing; } || \
	    { echo "apt-get could not install $$missing" > $(QEMU_UNAVAILABLE); \
	      echo "!!!!!! apt-get could not install $$missing: THE QEMU TIER WILL BE SKIPPED"; \
	      exit 0; }; \
	fi; rm -f $(QEMU_UNAVAILABLE); touch $@

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
