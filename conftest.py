"""Repository-wide pytest setup."""

import sys
from pathlib import Path

from hypothesis import settings

# The node's packages (node, sim) import on CPython as on the VM, where MICROPYPATH holds
# firmware/: tests that run firmware modules on CPython need nothing more.
FIRMWARE = Path(__file__).resolve().parent / "firmware"
if str(FIRMWARE) not in sys.path:
    sys.path.insert(0, str(FIRMWARE))

# Reproducible property tests: the same examples on every run and every machine, so CI never
# flips on a newly drawn case (a new case found locally is added as an explicit test instead).
settings.register_profile("lantern", derandomize=True, print_blob=True)
settings.load_profile("lantern")
