"""Lantern: streetlights as an environmental sensing network.

One import package holds the gateway (`lantern.agent`), the field tools
(`lantern.tools.field`), the simulated street (`lantern.tools.street`), and, as package data,
the node's MicroPython sources (`firmware/`) and the board files (`boards/`) that
`lantern provision` deploys. In a checkout these are links to the repository's top-level
folders; in a wheel they are the files themselves.

The version is written once, in the firmware (the one part that cannot read anything else
at run time), and read from there by everything else, the wheel's metadata included.
"""

import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
FIRMWARE = HERE / "firmware"
BOARDS = HERE / "boards"
# The repository, when running from a clone (where `make` builds MicroPython and mpy-cross
# under .build/); None in an installed wheel.
CHECKOUT: Path | None = (HERE.parent if (HERE.parent / "pyproject.toml").is_file()
                         and (HERE.parent / "agent").is_dir() else None)


def _version() -> str:
    text = (FIRMWARE / "node" / "app.py").read_text(encoding="utf-8")
    found = re.search(r'^FIRMWARE_VERSION = "([^"]+)"$', text, re.MULTILINE)
    if found is None:
        raise RuntimeError(f"no FIRMWARE_VERSION in {FIRMWARE / 'node' / 'app.py'}")
    return found.group(1)


__version__ = _version()
