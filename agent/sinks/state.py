"""A sink's own state across restarts: one small JSON file in the gateway's state folder.

What a sink keeps here saves work or honours an upstream's rules after a restart (the
SensorThings @iot.ids, the Sensor.Community push times); it is never the only copy of a
reading. So a file that cannot be read or written is said once and survived: the sink then
works as a first run would.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

from ..config import write_secret

log = logging.getLogger("lantern.sink.state")


class SinkState:
    """`<state_dir>/<name>.json`: written whole (mode 0600, atomic, fsynced), off the loop."""

    def __init__(self, state_dir: Path, name: str) -> None:
        self.path = state_dir / f"{name}.json"
        self.failures = 0  # reads and writes that failed (each run of them logged once)
        self._failing = False
        self._saved: str | None = None  # the text on disk, as this run last wrote or read it

    async def load(self) -> dict[str, Any]:
        """The saved object; {} when there is none or it cannot be read (said once)."""
        try:
            text = await asyncio.to_thread(self.path.read_text)
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError) as e:
            self._failed("read", e)
            return {}
        try:
            data = json.loads(text)
        except ValueError as e:
            self._failed("read", e)
            return {}
        if not isinstance(data, dict):
            self._failed("read", "not a JSON object")
            return {}
        self._saved = text
        return data

    async def save(self, data: dict[str, Any]) -> None:
        """Replace the file with `data`, if that changes it."""
        text = json.dumps(data, separators=(",", ":"), sort_keys=True)
        if text == self._saved:
            return
        try:
            await asyncio.to_thread(write_secret, self.path, text)
        except OSError as e:
            self._failed("write", e)
            return
        if self._failing:
            log.info("%s: written again", self.path)
            self._failing = False
        self._saved = text

    def _failed(self, what: str, why: object) -> None:
        if not self._failing:
            self._failing = True
            log.warning("%s: cannot %s it (%s); the sink goes on as after a first start "
                        "(logged once)", self.path, what, why)
        self.failures += 1
