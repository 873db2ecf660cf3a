"""install.sh run into a DESTDIR from this clone, for the packaging tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LANTERN = Path(sys.executable).with_name("lantern")


def install(dest: Path) -> subprocess.CompletedProcess[str]:
    """Lay the gateway out under `dest` (unit, config, keys, docs, rules) as root would."""
    env = dict(os.environ, DESTDIR=str(dest), LANTERN_BIN=str(LANTERN))
    return subprocess.run(["bash", str(ROOT / "packaging" / "install.sh")], env=env,
                          capture_output=True, text=True, timeout=300)
