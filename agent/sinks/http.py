"""HTTP sink: POSTs batches of SenML-JSON; retries with backoff; honours Retry-After.

Delivery means a 2xx from the URL configured. No sink ever follows a redirect (aiohttp's
default would, and a 200 from an http→https landing page or a captive portal would mark the
batch delivered): a 3xx is a failed delivery, kept and retried, counted by status in the
sink's `redirects`, and its message says where it pointed and what to change.

The body is a SenML-JSON pack (RFC 8428 §5) of records with absolute names and times. A record
whose unit is a secondary unit (RFC 8798 §3: ppm, ug/m3, ms, ...) carries "bver": 26, the
version with the Secondary Units feature (RFC 9100 §4, feature code 4), which such a unit
needs; the others keep version 10, left out. Per record, not once per batch: each record is
then complete on its own (RFC 8428 §4.6 wants the version in every resolved record that is not
version 10) and the same bytes in every batch it is retried in (docs/upstream.md).

A node's firmware version (its STATUS, kept by the rollout manager), once known, goes with every
batch holding its readings as one more record, `{"n": "urn:dev:lantern:<node>:firmware", "vs":
"<version>", "t": <the node's newest reading time in the batch>, "id":
"<node>:firmware:<version>"}`, the name and id the MQTT sink uses. A regular record with a
string value is how RFC 8428 carries a device parameter (§4: a name under the device's, `vs`);
a new field would need the SenML Labels registry (§12), and receivers ignore fields they do not
know. The record is made from the batch alone (and the version): a batch sent again, after a
restart too, is the same bytes. The Idempotency-Key covers the records added to the readings,
so a body that differs (a version that changed between two attempts across a restart) goes
under another key, never under one already used (docs/updates.md, "Where the version shows").
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import math
import re
import time
from collections import Counter, OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp

from ..config import check_secret_file, http_url, shown_url
from ..configfile import Doc, positive
from ..logsetup import escape_controls
from ..ngsi import split_name
from ..plugins import SinkPlugin
from ..queue.resolve import Batch

# The longest wait a Retry-After is honoured for (the forwarder never waits less than its own
# backoff: queue/forward.py). Ten minutes covers an upstream's planned restart; a longer outage
# answers the next attempt with a Retry-After of its own, so honouring more would only save an
# upstream one request per ten minutes, while a stale or hostile "a year from now" would hold
# the whole queue back that long (docs/upstream.md).
RETRY_AFTER_MAX_S = 600.0
# RFC 9100 §2: the version is a bitmap of features; 10 is the base, feature 4 (Secondary Units)
# adds 2**4
SECONDARY_VERSION = 10 + (1 << 4)
# The IANA "Secondary Units" registry as RFC 8798 §3 created it: names from the SenML units'
# namespace that scale a primary unit (only these need SECONDARY_VERSION)
SECONDARY_UNITS = frozenset((
    "ms", "min", "h", "MHz", "kW", "kVA", "kvar", "Ah", "Wh", "kWh", "varh", "kvarh", "kVAh",
    "Wh/km", "KiB", "GB", "Mbit/s", "B/s", "MB/s", "mV", "mA", "dBm", "ug/m3", "mm/h", "m/h",
    "ppm", "/100", "/1000", "hPa", "mm", "cm", "km", "km/h"))
_UNIT_FIELD = re.compile(r'"u":("(?:[^"\\]|\\.)*")')
FROZEN_MAX = 64  # batches whose firmware records are kept for their retries (one in flight)
BODY_MAX = 1 << 20  # bytes of an answer a sink reads at most (a 207 of 500 entities: ~100 KB)
SHOWN_MAX = 200  # characters of a peer's URL or text a message shows at most


@dataclass(frozen=True)
class HttpSinkConfig:
    url: str
    timeout_s: float = 10.0
    token_file: Path | None = None
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 60.0


class DeliveryError(Exception):
    """A batch was not accepted; retry_after is the server's wish in seconds, if it said one."""

    def __init__(self, msg: str, retry_after: float | None = None) -> None:
        super().__init__(msg)
        self.retry_after = retry_after


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP-date (RFC 9110)."""
    if not value:
        return None
    value = value.strip()
    if re.fullmatch(r"[0-9]+", value):
        return min(float(value), RETRY_AFTER_MAX_S)
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return min(max(0.0, when - (time.time() if now is None else now)), RETRY_AFTER_MAX_S)


def shown_location(base: str, location: str | None) -> str:
    """Where a redirect pointed, fit for a log: resolved, no credentials, query or fragment."""
    if not location:
        return "nowhere (no Location header)"
    try:
        u = urlsplit(urljoin(base, location))
        netloc = u.netloc.rpartition("@")[2]  # user:password@ never reaches a log
        shown = f"{u.scheme}://{netloc}{u.path}" + ("?…" if u.query else "")
    except ValueError:
        shown = "an unreadable Location"
    shown = escape_controls(shown)  # the peer chose these characters
    return shown if len(shown) <= SHOWN_MAX else shown[:SHOWN_MAX] + "…"


def redirect_error(url: str, status: int, location: str | None) -> DeliveryError:
    return DeliveryError(
        f"HTTP {status} redirect from {shown_url(url)} to {shown_location(url, location)}: "
        "not delivered (a sink never follows a redirect); set the sink's url to the final "
        "address")


async def read_bounded(resp: aiohttp.ClientResponse, limit: int = BODY_MAX) -> bytes:
    """The answer's body, at most `limit` bytes: an upstream cannot make the gateway grow."""
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await resp.content.read(limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _versioned(m: re.Match[str]) -> str:
    unit = m.group(1)
    if unit[1:-1] in SECONDARY_UNITS:  # every secondary unit name is plain ASCII: no escapes
        return f'{m.group(0)},"bver":{SECONDARY_VERSION}'
    return m.group(0)


def senml_body(batch: Batch, extra: list[str] | None = None) -> bytes:
    """The batch as a SenML-JSON pack: a record with a secondary unit says its version;
    `extra` records (array items) follow the batch's own."""
    items = batch.json_items + (extra or [])
    return _UNIT_FIELD.sub(_versioned, "[" + ",".join(items) + "]").encode()


def firmware_records(batch: Batch, firmware: Mapping[str, str]) -> dict[str, str]:
    """node → its firmware record (a JSON array item) for each Lantern node with readings in
    batch whose firmware version is known. Made from the batch alone: its time is the node's
    newest reading time in the batch, so the same batch always gives the same record."""
    newest: dict[str, float | None] = {}
    for record in batch.records():
        n = record.get("n")
        if not isinstance(n, str) or not n.startswith("urn:dev:lantern:"):
            continue
        try:
            node, _ = split_name(n)
        except ValueError:
            continue
        if node not in firmware:
            continue
        t = record.get("t")
        if not isinstance(t, int | float) or isinstance(t, bool) or not math.isfinite(t):
            t = None
        was = newest.get(node)
        newest[node] = t if was is None or (t is not None and t > was) else was
    out: dict[str, str] = {}
    for node, t in newest.items():
        fw = firmware[node]
        rec: dict[str, object] = {"n": f"urn:dev:lantern:{node}:firmware", "vs": fw}
        if t is not None:  # RFC 8428 §4.5.3: a record without a time means "now" on arrival
            rec["t"] = t
        rec["id"] = f"{node}:firmware:{fw}"
        out[node] = json.dumps(rec, separators=(",", ":"))
    return out


def idempotency_key(batch: Batch, extra: list[str] | None = None) -> str:
    """The same readings, with the same `extra` records added, always give the same key, so a
    retried POST is recognisable; other added records give another key, so a key never goes
    with two bodies (the Idempotency-Key draft: a key MUST NOT be reused with another
    payload). Without `extra` the key depends on the readings' ids only."""
    h = hashlib.sha256()
    for rid in batch.rids:
        h.update(rid.encode())
        h.update(b"\n")
    for item in extra or ():
        h.update(b"\0")  # never in a reading's id: no ambiguity with them
        h.update(item.encode())
    return h.hexdigest()[:32]


class HttpSink:
    name = "http"

    def __init__(self, cfg: HttpSinkConfig, firmware: Mapping[str, str] | None = None,
                 state_dir: Path | None = None) -> None:
        # state_dir: the plug-in's interface; this sink keeps no state there since review 7
        # (an http-firmware-*.json left by an older gateway is not read)
        self.cfg = cfg
        # node → its firmware version (the rollout manager's, kept up to date by it)
        self.firmware: Mapping[str, str] = {} if firmware is None else firmware
        # the readings' key → the firmware records of that batch at its first attempt here:
        # a version learnt between two attempts changes neither body nor key
        self._frozen: OrderedDict[str, list[str]] = OrderedDict()
        self._session: aiohttp.ClientSession | None = None
        self._headers = {"Content-Type": "application/senml+json"}
        if cfg.token_file:
            self._headers["Authorization"] = "Bearer " + cfg.token_file.read_text().strip()
        self.last_latency_s: float | None = None
        self.redirects: Counter[int] = Counter()  # 3xx answers, by status

    async def __aenter__(self) -> HttpSink:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_s))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def send(self, batch: Batch) -> None:
        assert self._session is not None
        readings = idempotency_key(batch)
        extra = self._frozen.get(readings)
        if extra is None:
            records = firmware_records(batch, self.firmware)
            extra = self._frozen[readings] = [records[n] for n in sorted(records)]
            while len(self._frozen) > FROZEN_MAX:
                self._frozen.popitem(last=False)
        body = senml_body(batch, extra)
        key = idempotency_key(batch, extra)
        headers = dict(self._headers)
        headers["Idempotency-Key"] = key
        t0 = time.monotonic()
        try:
            async with self._session.post(self.cfg.url, data=body, headers=headers,
                                          allow_redirects=False) as resp:
                await read_bounded(resp, SHOWN_MAX)
                self.last_latency_s = time.monotonic() - t0
                if 200 <= resp.status < 300:
                    self._frozen.pop(readings, None)
                    return
                if 300 <= resp.status < 400:
                    self.redirects[resp.status] += 1
                    raise redirect_error(self.cfg.url, resp.status, resp.headers.get("Location"))
                retry_after = None
                if resp.status in (429, 503):
                    retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                raise DeliveryError(f"HTTP {resp.status} from {shown_url(self.cfg.url)}",
                                    retry_after)
        except (aiohttp.ClientError, TimeoutError) as e:
            raise DeliveryError(f"{type(e).__name__} posting to {shown_url(self.cfg.url)}: "
                                f"{e}") from None


# ---------------------------------------------------------------- plug-in ([sinks.http])


def parse(doc: Doc, h: dict[str, Any], key: str, base: Path) -> HttpSinkConfig:
    token = doc.get(h, "token_file", f"{key}.token_file", str, None)
    cfg = HttpSinkConfig(
        url=doc.get(h, "url", f"{key}.url", str, check=http_url),
        timeout_s=float(doc.get(h, "timeout_s", f"{key}.timeout_s", (int, float), 10.0,
                                positive)),
        token_file=base / token if token else None,
        backoff_initial_s=float(doc.get(h, "backoff_initial_s", f"{key}.backoff_initial_s",
                                        (int, float), 0.5, positive)),
        backoff_max_s=float(doc.get(h, "backoff_max_s", f"{key}.backoff_max_s",
                                    (int, float), 60.0, positive)))
    if cfg.token_file:
        check_secret_file(cfg.token_file, f"{key}.token_file")
    return cfg


PLUGIN = SinkPlugin(
    "http", frozenset({"url", "timeout_s", "token_file", "backoff_initial_s", "backoff_max_s"}),
    parse, open=lambda c, ctx: HttpSink(c, ctx.firmware, ctx.state_dir), where=lambda c: c.url,
    backoff=lambda c: (c.backoff_initial_s, c.backoff_max_s))
