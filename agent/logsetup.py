"""Logging for a service: one line per event, journald priority prefixes, noisy input rate-limited.

Under systemd (JOURNAL_STREAM names our stderr) each line starts with `<N>`, the sd-daemon(3)
priority prefix, and carries no timestamp: journald stamps every line itself. From a shell,
lines carry a timestamp and the level name instead.
"""

from __future__ import annotations

import logging
import os
import re
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


# Every character Python does not call printable (str.isprintable: C0, DEL, C1, the line and
# paragraph separators, the bidirectional embeddings, overrides and isolates U+202A-202E and
# U+2066-2069, zero-width and format characters, spaces other than " ", surrogates, unassigned
# code points) as an escape: a node id, a SenML name or an exception's text can come from a
# peer; a newline in it would start a forged log line, a carriage return or a terminal escape
# would hide part of a real one, and a bidi override would reorder how the rest of the line
# shows in a viewer that honours it ("Trojan Source" on logs).
_ASCII_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)}
_ASCII_CONTROLS.update({0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t"})
_ASCII_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def _escape(c: str) -> str:
    """One non-printable character escaped as repr() writes it (\\x1b, \\u202e, \\U000e0041)."""
    o = ord(c)
    if o < 0x80:
        return _ASCII_CONTROLS[o]
    return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"


def escape_controls(text: str) -> str:
    """`text` on one line, every character that is not printable written as an escape."""
    if text.isprintable():  # nearly every line: one pass in C, nothing allocated
        return text
    if text.isascii():  # a control character or two in plain text: leave the rest alone
        return _ASCII_CONTROL_RE.sub(lambda m: _ASCII_CONTROLS[ord(m[0])], text)
    return "".join(c if c.isprintable() else _escape(c) for c in text)


class _OneEventFormatter(logging.Formatter):
    """One event: its message with every non-printable character escaped, then the lines of its
    traceback (ours to break, each escaped too) joined by `joiner`, so that no text from a
    peer can start a line that looks like an event of its own. (Nothing is taken from the
    record's cached exc_text: another handler may have made it unescaped.)"""

    joiner = "\n"

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        parts = [escape_controls(self.formatMessage(record))]
        if record.exc_info:
            parts += super().formatException(record.exc_info).split("\n")
        elif record.exc_text:
            parts += record.exc_text.split("\n")
        if record.stack_info:
            parts += record.stack_info.split("\n")
        return self.joiner.join([parts[0], *map(escape_controls, parts[1:])])


class JournalFormatter(_OneEventFormatter):
    """Under systemd: the sd-daemon priority prefix, no timestamp, one line per event."""

    joiner = " | "

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return f"<{PRIORITY.get(record.levelno, 6)}>" + super().format(record)


class PlainFormatter(_OneEventFormatter):
    """From a shell or into a file: a timestamp and the level name; the lines of a traceback
    indented, so that only the first line of an event starts at the margin."""

    joiner = "\n    "

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")


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
        handler.setFormatter(PlainFormatter())
    handler.addFilter(RateLimit())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
