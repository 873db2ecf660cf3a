"""Logging for a service: one line per event, journald priority prefixes, noisy input rate-limited.

Under systemd (JOURNAL_STREAM names our stderr) each line starts with `<N>`, the sd-daemon(3)
priority prefix, and carries no timestamp: journald stamps every line itself. From a shell,
lines carry a timestamp and the level name instead.
"""

from __future__ import annotations

import logging
import os
import sys
import time

# syslog priorities (sd-daemon.h): err 3, warning 4, notice 5, info 6, debug 7
PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
            logging.DEBUG: 7}


def under_journald(stream: object = None) -> bool:
    """True if `stream` (stderr by default) is the journal's socket (systemd.exec(5))."""
    stream = sys.stderr if stream is None else stream
    want = os.environ.get("JOURNAL_STREAM", "")
    if not want:
        return False
    try:
        st = os.fstat(stream.fileno())  # type: ignore[union-attr]
    except (OSError, AttributeError, ValueError):
        return False
    return want == f"{st.st_dev}:{st.st_ino}"


class JournalFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prio = PRIORITY.get(record.levelno, 6)
        # one event, one line: a traceback or a multi-line message must not split the entry
        return f"<{prio}>" + super().format(record).replace("\n", " | ")


class RateLimit(logging.Filter):
    """At most `burst` lines per message template per `period` seconds; then one summary."""

    def __init__(self, burst: int = 10, period: float = 60.0) -> None:
        super().__init__()
        self.burst = burst
        self.period = period
        self._seen: dict[tuple[str, str], list[float]] = {}  # key → [window start, count, held]

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        now = time.monotonic()
        w = self._seen.get(key)
        if w is None or now - w[0] >= self.period:
            held = int(w[2]) if w else 0
            self._seen[key] = [now, 1, 0]
            if held:
                record.msg = f"{record.msg} ({held} more like this were suppressed)"
            return True
        w[1] += 1
        if w[1] <= self.burst:
            return True
        if w[1] == self.burst + 1:
            record.msg = f"{record.msg} (repeats; suppressing for {self.period:.0f}s)"
            return True
        w[2] += 1
        return False


def setup(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if under_journald():
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RateLimit())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
