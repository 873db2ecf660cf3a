"""The gateway's own clock: is it synchronised, what time nodes may be given (docs/time.md).

A Raspberry Pi has no battery-backed clock: after a cabinet power cut without network it
runs from the last time systemd saved until NTP answers. The kernel knows whether a time
daemon (systemd-timesyncd, chrony, ntpd) has disciplined it: adjtimex(2) with no mode set
only reads its state — `TIME_ERROR` or the status bit `STA_UNSYNC` mean "not synchronised".
While it is not, ACKs carry no time (key 2 left out: nodes keep their readings until they
get one), /healthz, /metrics and the status page say so, and the times the gateway itself
stamps (when a frame came) are corrected by the step the clock takes once it syncs — the
kernel's monotonic clock does not jump, so the gap between the two is the correction.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from . import protocol

log = logging.getLogger("lantern.timesync")

# adjtimex(2): clock states and the status bit a time daemon clears once it has synced
TIME_ERROR = 5
STA_UNSYNC = 0x0040
TIMESYNCD_FLAG = Path("/run/systemd/timesync/synchronized")  # touched by timesyncd on sync
CLOCK_FILE = "clock.json"  # in the state directory: the unsynchronised spans, across restarts
CHECK_S = 1.0  # how long one reading of the kernel's state is reused
SPANS_MAX = 64  # unsynchronised spans remembered (each: start, end, step)
STATE_MAX = 16 * 1024  # bytes of clock.json read: SPANS_MAX spans take about 4 KiB
TIME_LIMIT = float(protocol.TIME_MAX)  # a span's times and step are within 0..this (9999)
RELATIVE_BELOW = 1 << 28  # RFC 8428 §4.5.3: a time below 2**28 is relative to "now"
# bits of a pack's time.q record (docs/time.md); the node sets 1 and 2, the gateway 4
TIME_Q = "time.q"
RELATIVE = 1
BEFORE = 2
GATEWAY_UNSYNCED = 4


@dataclass(frozen=True)
class ClockState:
    """One reading of the system clock's synchronisation."""

    synchronized: bool
    source: str  # "adjtimex", "timesyncd", "assumed" (mode "trust"), "unknown"
    maxerror_s: float | None = None  # the kernel's bound on the clock's error
    detail: str = ""


class _Timex(ctypes.Structure):
    # struct timex (linux/timex.h): the fields up to tai, then the reserved padding
    _fields_ = [("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
                ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long),
                ("status", ctypes.c_int), ("constant", ctypes.c_long),
                ("precision", ctypes.c_long), ("tolerance", ctypes.c_long),
                ("time_sec", ctypes.c_long), ("time_usec", ctypes.c_long),
                ("tick", ctypes.c_long), ("ppsfreq", ctypes.c_long), ("jitter", ctypes.c_long),
                ("shift", ctypes.c_int), ("stabil", ctypes.c_long), ("jitcnt", ctypes.c_long),
                ("calcnt", ctypes.c_long), ("errcnt", ctypes.c_long),
                ("stbcnt", ctypes.c_long), ("tai", ctypes.c_int),
                ("reserved", ctypes.c_int * 11)]


_libc: Any = None


def read_adjtimex() -> ClockState:
    """The kernel's view (adjtimex with modes 0: read only, no privilege needed).

    OSError if the call is not available (not Linux, a sandbox that forbids it)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    tx = _Timex()
    state = _libc.adjtimex(ctypes.byref(tx))
    if state < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"adjtimex: {os.strerror(err)}")
    synced = state != TIME_ERROR and not tx.status & STA_UNSYNC
    return ClockState(synced, "adjtimex", tx.maxerror / 1e6,
                      f"state {state}, status 0x{tx.status:04x}")


def read_timesyncd(flag: Path = TIMESYNCD_FLAG) -> ClockState:
    """systemd-timesyncd's flag file: present once it has synchronised since boot."""
    return ClockState(flag.exists(), "timesyncd", None, str(flag))


def probe() -> ClockState:
    """The kernel's state; timesyncd's flag where adjtimex cannot be read; else unknown."""
    try:
        return read_adjtimex()
    except (OSError, AttributeError) as e:
        if TIMESYNCD_FLAG.parent.is_dir():
            return read_timesyncd()
        return ClockState(False, "unknown", None, f"adjtimex unavailable: {e}")


@dataclass
class _Step:
    """A span the wall clock ran unsynchronised, and the step it took on syncing."""

    start: float  # wall time (unsynchronised scale) of the first reading in the span
    end: float  # the last one
    step: float | None = None  # seconds to add; None while the span is open


class TimeSync:
    """The gateway's clock as nodes and readings see it.

    mode "kernel" (default) believes the probe; "trust" gives nodes the time whatever the
    kernel says (a host whose clock is kept right by other means: a container's host).
    """

    def __init__(self, probe: Callable[[], ClockState] = probe, mode: str = "kernel",
                 wall: Callable[[], float] = time.time,
                 mono: Callable[[], float] = time.monotonic,
                 path: Path | None = None) -> None:
        """path: where the unsynchronised spans are kept across restarts (state_dir/clock.json):
        a frame received in a span that never closed (the gateway stopped first) stays
        flagged, never silently taken for right."""
        if mode not in ("kernel", "trust"):
            raise ValueError(f"clock mode must be 'kernel' or 'trust', got {mode!r}")
        self._probe = probe
        self.mode = mode
        self._wall = wall
        self._mono = mono
        self._path = path
        self._state: ClockState | None = None
        self._checked = -1e18
        self.state_refused = 0  # clock.json files refused (not a state this gateway wrote)
        self._spans: list[_Step] = self._load()  # unsynchronised spans, oldest first (bounded)
        self._open: tuple[_Step, float] | None = None  # the open span, and wall - mono then
        self.withheld = 0  # ACKs sent without a time
        self.corrected = 0  # times corrected by a step (frames' receipt times)
        self.flagged = 0  # packs flagged: stamped unsynchronised, no step known
        self.since: float | None = None  # wall time of the last change of state

    def _load(self) -> list[_Step]:
        if self._path is None:
            return []
        try:
            with self._path.open("rb") as f:
                data = f.read(STATE_MAX + 1)
        except FileNotFoundError:
            return []
        except OSError as e:
            self._refuse(f"cannot be read ({e})", move=False)
            return []
        try:
            spans = _parse_spans(data)
        except ValueError as e:
            self._refuse(str(e), move=True)
            return []
        for span in spans:
            if span.step is None:  # open when the gateway stopped: it lasted until now
                span.end = max(span.end, self._wall())
        return spans

    def _refuse(self, why: str, move: bool) -> None:
        """clock.json is not a state this gateway wrote: said once, counted, set aside."""
        assert self._path is not None
        self.state_refused += 1
        aside = self._path.with_name(self._path.name + ".bad")
        if move:
            try:
                os.replace(self._path, aside)
            except OSError as e:
                why += f"; not set aside ({e})"
                move = False
        log.warning("clock: %s refused: %s; earlier unsynchronised spans forgotten (times "
                    "stamped in them are taken as they are)%s", self._path, why,
                    f"; the file is kept as {aside.name}" if move else "")

    def _save(self) -> None:
        if self._path is None:
            return
        data = json.dumps({"spans": [[s.start, s.end, s.step] for s in self._spans]})
        tmp = self._path.with_name(self._path.name + ".tmp")
        try:
            tmp.write_text(data)
            os.replace(tmp, self._path)
        except OSError as e:
            log.warning("clock: %s not written (%s)", self._path, e)

    def state(self) -> ClockState:
        """The clock's state, read again at most every CHECK_S."""
        now = self._mono()
        if self._state is None or now - self._checked >= CHECK_S:
            self._checked = now
            self._update(self._read())
        assert self._state is not None
        return self._state

    def _read(self) -> ClockState:
        if self.mode == "trust":
            return ClockState(True, "assumed", None, "clock mode trust")
        try:
            return self._probe()
        except Exception as e:
            if self._state is None or self._state.source != "unknown":
                log.warning("clock: cannot read the system clock's state (%r); treated as "
                            "not synchronised", e)
            return ClockState(False, "unknown", None, repr(e))

    def _update(self, st: ClockState) -> None:
        wall = self._wall()
        offset = wall - self._mono()
        was = self._state
        self._state = st
        if was is None or was.synchronized != st.synchronized:
            self.since = wall
            if st.synchronized:
                log.info("clock: synchronised (%s)", st.source)
            else:
                log.warning("clock: NOT synchronised (%s: %s); nodes are not given the time "
                            "until it is", st.source, st.detail)
        if not st.synchronized:
            if self._open is None:
                span = _Step(wall, wall)
                self._open = (span, offset)
                self._spans.append(span)
                del self._spans[:-SPANS_MAX]
                self._save()
            else:
                self._open[0].end = wall
        elif self._open is not None:
            span, before = self._open
            span.step = offset - before  # how far the wall clock jumped against monotonic
            self._open = None
            self._save()
            if abs(span.step) >= 1:
                log.info("clock: stepped %+.3f s on synchronising; times stamped since %s "
                         "are corrected", span.step, _iso(span.start))

    @property
    def synchronized(self) -> bool:
        return self.state().synchronized

    def ack_time_ms(self) -> int | None:
        """The time for an ACK's key 2, or None: an unsynchronised clock is not handed out."""
        if not self.synchronized:
            self.withheld += 1
            return None
        return time.time_ns() // 1_000_000

    def ack(self, nk: protocol.NodeKey, seqs: list[int]) -> bytes:
        """An ACK frame for `seqs`, with the time only when the clock is synchronised."""
        now_ms = self.ack_time_ms()
        if now_ms is not None:
            return nk.ack(seqs, now_ms)
        return ack_without_time(nk, seqs)

    def correct(self, t: float) -> tuple[float, bool]:
        """A wall time this gateway stamped (a frame's receipt), as it should have been:
        (time, True) if it is right or was corrected, (t, False) if it was stamped while
        the clock was unsynchronised and no step is known (yet, or any more)."""
        self.state()
        for span in reversed(self._spans):
            if span.start - CHECK_S <= t <= span.end + CHECK_S:
                if span.step is None:
                    return t, False
                return t + span.step, True
        if self._open is not None or (self._state is not None
                                      and not self._state.synchronized):
            return t, False
        return t, True

    def fix_times(self, records: list[dict[str, Any]], received_at: float
                  ) -> list[dict[str, Any]]:
        """One frame's resolved records with their relative times made absolute.

        RFC 8428 §4.5.3: a time below 2**28 is relative to "now", which for a node's pack is
        when the gateway received it (the node sends such packs only when it had no time:
        time.q bit 1). A receipt stamped while the gateway's clock was unsynchronised is
        corrected by the step it took; if none is known the pack's time.q gets bit 4.
        """
        if not relative_records(records):
            return records
        at, ok = self.correct(received_at)
        final = self.state().synchronized  # else resolved again later (not counted yet)
        if final and ok and abs(at - received_at) >= 0.5:  # (a 0 s step: microseconds)
            self.corrected += 1
        flag = None
        for r in records:
            t = r.get("t")
            if t is not None and _relative(t):
                r["t"] = round(at + t)
            if r.get("n", "").endswith(":" + TIME_Q):
                flag = r
        if not ok:
            self.flagged += final
            if flag is None:
                base = records[0]["n"].rpartition(":")[0]
                flag = {"n": f"{base}:{TIME_Q}", "t": records[0]["t"], "v": 0}
                head = records[-1].get("id")
                if head is not None:  # `<node>:<seq>:<n>` as resolve.py makes them: the next n
                    flag["id"] = f"{head.rpartition(':')[0]}:{len(records)}"
                records.append(flag)
            flag["v"] = int(flag.get("v", 0)) | GATEWAY_UNSYNCED
        return records

    def health(self) -> dict[str, Any]:
        """For /healthz, /api/status and the status page."""
        st = self.state()
        return {"synchronized": st.synchronized, "source": st.source,
                "maxerror_s": st.maxerror_s, "detail": st.detail, "mode": self.mode,
                "since": self.since, "acks_without_time": self.withheld,
                "corrected": self.corrected, "flagged": self.flagged,
                "state_refused": self.state_refused}

    def collector(self) -> Collector:
        """Prometheus families for metrics.registry(extra=...)."""
        return _ClockCollector(self)


class _ClockCollector(Collector):
    def __init__(self, ts: TimeSync) -> None:
        self._ts = ts

    def collect(self) -> Iterator[GaugeMetricFamily]:
        st = self._ts.state()
        yield _gauge("lantern_clock_synchronized", "1 if the gateway's system clock is "
                     "synchronised (adjtimex); while 0, nodes are not given its time",
                     1 if st.synchronized else 0)
        if st.maxerror_s is not None:
            yield _gauge("lantern_clock_maxerror_seconds", "The kernel's bound on the "
                         "system clock's error", st.maxerror_s)
        yield _gauge("lantern_clock_acks_without_time", "ACKs sent without the time "
                     "(the clock was not synchronised)", self._ts.withheld)
        yield _gauge("lantern_clock_state_refused", "clock.json files refused at start (not "
                     "a state this gateway wrote; set aside as clock.json.bad)",
                     self._ts.state_refused)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc)
    g.add_metric([], value)
    return g


def _parse_spans(data: bytes) -> list[_Step]:
    """clock.json's spans as this gateway writes them; ValueError naming what is not."""
    if len(data) > STATE_MAX:
        raise ValueError(f"larger than {STATE_MAX} bytes")
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as e:  # (UnicodeDecodeError is a ValueError)
        raise ValueError(f"not JSON ({e})") from None
    raw = doc.get("spans") if isinstance(doc, dict) else None
    if not isinstance(raw, list):
        raise ValueError('no "spans" list')
    if len(raw) > SPANS_MAX:
        raise ValueError(f"{len(raw)} spans, at most {SPANS_MAX} are ever written")
    out = []
    for i, span in enumerate(raw):
        if not (isinstance(span, list) and len(span) == 3):
            raise ValueError(f"span {i} is not [start, end, step]")
        start, end, step = span
        if not (_time_ok(start) and _time_ok(end) and start <= end):
            raise ValueError(f"span {i}: start and end must be times, in order: {span!r:.80}")
        if step is not None and not (_finite(step) and _time_ok(start + step)
                                     and _time_ok(end + step)):
            raise ValueError(f"span {i}: step {step!r:.40} is not a finite step to a time "
                             "between 1970 and 9999")
        out.append(_Step(float(start), float(end), None if step is None else float(step)))
    return out


def _finite(v: Any) -> bool:
    return type(v) is int or (type(v) is float and math.isfinite(v))


def _time_ok(v: Any) -> bool:
    return _finite(v) and 0 <= v <= TIME_LIMIT


def ack_without_time(nk: protocol.NodeKey, seqs: list[int]) -> bytes:
    """An ACK frame (docs/protocol.md §3) whose payload is {1: [seqs]}: no key 2.

    Nodes set their clock only from key 2; without it they keep what they have not timed.
    Older nodes already ignore an ACK without an integer key 2 (node/link_uart.py)."""
    p = protocol.piv(max(seqs))
    protected = (b"\xa3\x01\x04\x04" + protocol.cbor_head(2, len(nk.kid)) + nk.kid
                 + b"\x06" + protocol.cbor_head(2, len(p)) + p)
    payload = b"".join((b"\xa1\x01", protocol.cbor_head(4, len(seqs)),
                        *(protocol.cbor_head(0, s) for s in seqs)))
    body = b"".join((b"\xd1\x84", protocol.cbor_head(2, len(protected)), protected, b"\xa0",
                     protocol.cbor_head(2, len(payload)), payload, b"\x48",
                     nk.tag(protected, payload)))
    return protocol.encode_frame(protocol.ACK, body)


def relative_records(records: Iterable[dict[str, Any]]) -> bool:
    """Whether any resolved record's time is relative (below 2**28)."""
    return any(_relative(r.get("t")) for r in records)


def _relative(t: Any) -> bool:
    return _finite(t) and bool(t < RELATIVE_BELOW)


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
