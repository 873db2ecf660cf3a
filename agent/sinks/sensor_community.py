"""Sensor.Community sink: the latest street values, pushed as their own firmware pushes them.

The push API (POST https://api.sensor.community/v1/push-sensor-data/, as the reference
firmware opendata-stuttgart/sensors-software `airrohr-firmware` sends it): one request per
registered sensor and sensor kind, headers `X-Sensor: <registered id>` and `X-Pin: <kind>`
(1 particulate matter, 11 BME280, 15 DNMS noise), body `{"software_version": …,
"sensordatavalues": [{"value_type": "P1", "value": "12.30"}, …]}` with values as text.

The API has no time field: the server dates a value when it arrives. So a value goes out only
while it is fresh (`max_age_s`), as the mean of the readings since the previous push, and at
most once per `interval_s` (the reference firmware's 145 s) per sensor and pin — across a
gateway restart too (the last push per sensor and pin is kept in the state folder); a backlog
after an outage is not published late (counted as `stale`). Off unless the table exists, and
only the measurements it lists, of the nodes it maps to a registered id. docs/upstream.md.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import aiohttp

from lantern import __version__

from ..config import http_url, shown_url
from ..configfile import Doc, one_of, positive
from ..ngsi import split_name
from ..plugins import SinkContext, SinkPlugin
from ..queue.resolve import Batch
from .http import SHOWN_MAX, DeliveryError, read_bounded
from .session import SessionSink, frame, quality_flags
from .state import SinkState

log = logging.getLogger("lantern.sink.sensor_community")

URL = "https://api.sensor.community/v1/push-sensor-data/"
INTERVAL_S = 145.0  # the reference firmware's sending interval (airrohr-cfg.h), our floor
# measurement → (X-Pin, value_type, decimals): the firmware's pins and value names
# (ext_def.h *_API_PIN; value names after it strips the sensor prefix, e.g. "SDS_P1" → "P1")
VALUES: dict[str, tuple[int, str]] = {
    "pm10": (1, "P1"), "pm2_5": (1, "P2"), "pm1": (1, "P0"), "pm4": (1, "P4"),
    "temperature": (11, "temperature"), "humidity": (11, "humidity"),
    "pressure": (11, "pressure"),  # Pa, as the BME280 library gives it and SenML carries it
    "LAeq": (15, "noise_LAeq"), "LAmax": (15, "noise_LA_max"),
}
# value_type → the range the sensor kind the pin stands for can measure (datasheets): SDS011
# 0.0-999.9 ug/m3, SPS30 0-1000 ug/m3; BME280 -40..85 Cel, 0..100 %RH, 300..1100 hPa; the
# DNMS noise module 0..140 dB(A). A value outside is no reading of that sensor: not published.
PLAUSIBLE: dict[str, tuple[float, float]] = {
    "P0": (0.0, 1000.0), "P1": (0.0, 1000.0), "P2": (0.0, 1000.0), "P4": (0.0, 1000.0),
    "temperature": (-40.0, 85.0), "humidity": (0.0, 100.0), "pressure": (30000.0, 110000.0),
    "noise_LAeq": (0.0, 140.0), "noise_LA_max": (0.0, 140.0),
}
SENSOR_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")
# quality bits that make a value unfit to publish: all but "stale" (4) and "saving" (512)
UNFIT = ~(4 | 512)


@dataclass(frozen=True)
class SensorCommunitySinkConfig:
    sensors: dict[str, str]  # node id → its registered sensor id (X-Sensor)
    measurements: tuple[str, ...]  # what the city publishes
    url: str = URL
    interval_s: float = INTERVAL_S
    max_age_s: float = 300.0
    timeout_s: float = 20.0
    backoff_initial_s: float = 5.0
    backoff_max_s: float = 300.0


@dataclass
class Pending:
    """Readings of one sensor and pin since its last push: value_type → [(time, value)]."""

    values: defaultdict[str, list[tuple[float, float]]] = field(
        default_factory=lambda: defaultdict(list))


class SensorCommunitySink(SessionSink):
    name = "sensor_community"

    def __init__(self, cfg: SensorCommunitySinkConfig, now: Callable[[], float] = time.time,
                 state_dir: Path | None = None) -> None:
        super().__init__(cfg.timeout_s)
        self.cfg = cfg
        self.now = now
        # the last pushes, kept across restarts (None: this run's only)
        self.state = SinkState(state_dir, "sensor_community") if state_dir else None
        self._pending: dict[tuple[str, int], Pending] = {}
        self._last: dict[tuple[str, int], float] = {}  # (sensor id, pin) → last push
        self._batch: tuple[int, int] | None = None
        self._seen: set[str] = set()  # reading ids of the current batch already taken
        self._nodes = {sensor: node for node, sensor in cfg.sensors.items()}  # for messages
        self.pushes = 0
        self.skipped: Counter[str] = Counter()

    async def __aenter__(self) -> Self:
        await super().__aenter__()
        if self.state is not None:
            saved = await self.state.load()
            pins = {(sensor, pin) for sensor in self.cfg.sensors.values()
                    for pin, _ in VALUES.values()}
            last = saved.get("last") if saved.get("url") == self.cfg.url else None
            for key, t in (last.items() if isinstance(last, dict) else ()):
                sensor, _, pin = key.rpartition(":")
                if (pin.isdigit() and (sensor, int(pin)) in pins
                        and isinstance(t, int | float) and not isinstance(t, bool)):
                    self._last[(sensor, int(pin))] = float(t)
        return self

    def _skip(self, reason: str, detail: str, n: int = 1) -> None:
        if not self.skipped[reason]:
            log.info("sensor_community: a reading not published: %s (counted in "
                     "lantern_sink_skipped_readings_total; logged once)", detail)
        self.skipped[reason] += n

    def _take(self, records: list[dict[str, Any]]) -> None:
        now = self.now()
        flags = quality_flags(records)
        for r in records:
            v = r.get("v")
            if r["id"] in self._seen or not isinstance(v, int | float) or isinstance(v, bool):
                continue
            self._seen.add(r["id"])
            try:
                node, measurement = split_name(r["n"])
            except ValueError:
                continue
            if measurement not in self.cfg.measurements:
                continue  # not chosen for publication: not a skip
            sensor = self.cfg.sensors.get(node)
            if sensor is None:
                self._skip("unregistered", f"node {node} has no registered sensor id")
                continue
            if not math.isfinite(v) or flags.get((r["n"], frame(r["id"])), 0) & UNFIT:
                self._skip("flagged", f"{r['n']} carries a quality flag")
                continue
            if not now - self.cfg.max_age_s <= r["t"] <= now + 60:
                self._skip("stale", f"{r['n']} at {r['t']}: the push API dates a value on "
                           "arrival, so only fresh values go out")
                continue
            pin, value_type = VALUES[measurement]
            low, high = PLAUSIBLE[value_type]
            if not low <= v <= high:
                self._skip("range", f"{r['n']} = {v:g}: outside {low:g}..{high:g}, the range "
                           "of the sensor it is published as")
                continue
            self._pending.setdefault((sensor, pin), Pending()).values[value_type].append(
                (r["t"], float(v)))

    async def send(self, batch: Batch) -> None:
        if self._batch != (batch.first_id, batch.last_id):
            self._batch, self._seen = (batch.first_id, batch.last_id), set()
        self._take(batch.records())
        now = self.now()
        try:
            await self._push_due(now)
        finally:
            if self.state is not None:
                await self.state.save({"url": self.cfg.url, "last": {
                    f"{sensor}:{pin}": t for (sensor, pin), t in self._last.items()}})

    async def _push_due(self, now: float) -> None:
        for (sensor, pin), pending in list(self._pending.items()):
            last = self._last.get((sensor, pin))
            # their rate: the next push takes the mean of these too (a last push after now
            # is a clock set back since: it holds nothing back)
            if last is not None and 0 <= now - last < self.cfg.interval_s:
                continue
            values = []
            for value_type, tv in pending.values.items():
                fresh = [v for t, v in tv if t >= now - self.cfg.max_age_s]
                if len(fresh) < len(tv):
                    self._skip("stale", "readings waited past max_age_s", len(tv) - len(fresh))
                if fresh:  # a mean that cannot overflow: each term at most max / n
                    mean = math.fsum(v / len(fresh) for v in fresh)
                    values.append({"value_type": value_type, "value": f"{mean:.2f}"})
            if values and await self._push(sensor, pin, values):
                self._last[(sensor, pin)] = now
            del self._pending[(sensor, pin)]

    async def _push(self, sensor: str, pin: int, values: list[dict[str, str]]) -> bool:
        """Push one sensor and pin: True if accepted, False if their API refused the values.

        A 400 or 422 refuses what was sent: sending it again would be refused again and hold
        every later push of that sensor and pin back, so those values are dropped (counted,
        logged once). Anything else that is not a 2xx (a 403 for a sensor not registered on
        the pin, a 429, a 5xx, no answer) fails the delivery and the values wait for the retry.
        The registered id is all their API asks to publish as that sensor: no message names
        it (the node does).
        """
        assert self._session is not None
        software = f"Lantern-{__version__}"
        headers = {"Content-Type": "application/json", "X-Sensor": sensor, "X-Pin": str(pin),
                   "User-Agent": f"{software}/{sensor}"}
        body = {"software_version": software, "sensordatavalues": values}
        url = self.cfg.url
        t0 = time.monotonic()
        try:
            async with self._session.post(url, json=body, headers=headers,
                                          allow_redirects=False) as resp:
                answer = await read_bounded(resp, SHOWN_MAX)
                self.last_latency_s = time.monotonic() - t0
                if 200 <= resp.status < 300:
                    self.pushes += 1
                    return True
                said = answer.decode(errors="replace").replace(sensor, "<sensor id>")
                what = f"node {self._nodes.get(sensor, '?')} pin {pin}"
                if resp.status in (400, 422):
                    if not self.skipped["refused"]:
                        log.warning("sensor_community: HTTP %d: %s: values refused and dropped "
                                    "(%s; counted in lantern_sink_skipped_readings_total; "
                                    "logged once): %s", resp.status, what,
                                    ", ".join(f"{v['value_type']}={v['value']}" for v in values),
                                    said)
                    self.skipped["refused"] += len(values)
                    return False
                raise self.refused(url, resp, f"{what}: {said}")
        except (aiohttp.ClientError, TimeoutError) as e:
            raise DeliveryError(f"{type(e).__name__} posting to {shown_url(url)}: {e}") \
                from None


# ------------------------------------------------------------ plug-in ([sinks.sensor_community])


def parse(doc: Doc, s: dict[str, Any], key: str, base: Path) -> SensorCommunitySinkConfig:
    measurements = doc.get(s, "measurements", f"{key}.measurements", list,
                           fix=f"list what the city publishes, of {one_of(list(VALUES))}")
    for m in measurements:
        if not isinstance(m, str) or m not in VALUES:
            raise doc.error(f"{key}.measurements", f"{m!r} has no Sensor.Community value; "
                            f"expected {one_of(list(VALUES))}")
    sensors = doc.get(s, "sensors", f"{key}.sensors", dict,
                      fix='map each node to its registered id: { "SL-0001" = "esp32-1234567" }')
    first: dict[str, str] = {}  # registered id → the node it was first given to
    for node, ident in sensors.items():
        if not isinstance(ident, str) or not SENSOR_ID.match(ident):
            raise doc.error(f"{key}.sensors.{node}", "expected the sensor id registered at "
                            'devices.sensor.community, e.g. "esp32-1234567"')
        if ident in first:  # one registered sensor stands at one place
            raise doc.error(f"{key}.sensors.{node}", f"the same registered id as node "
                            f"{first[ident]}: each node needs its own (register it at "
                            "devices.sensor.community)")
        first[ident] = node
    return SensorCommunitySinkConfig(
        sensors=dict(sensors), measurements=tuple(measurements),
        url=doc.get(s, "url", f"{key}.url", str, URL, http_url),
        interval_s=float(doc.get(
            s, "interval_s", f"{key}.interval_s", (int, float), INTERVAL_S,
            lambda v: None if v >= INTERVAL_S else
            f"at least {INTERVAL_S:g} s (the reference firmware's interval)")),
        max_age_s=float(doc.get(s, "max_age_s", f"{key}.max_age_s", (int, float), 300.0,
                                positive)),
        timeout_s=float(doc.get(s, "timeout_s", f"{key}.timeout_s", (int, float), 20.0,
                                positive)),
        backoff_initial_s=float(doc.get(s, "backoff_initial_s", f"{key}.backoff_initial_s",
                                        (int, float), 5.0, positive)),
        backoff_max_s=float(doc.get(s, "backoff_max_s", f"{key}.backoff_max_s",
                                    (int, float), 300.0, positive)))


def _open(cfg: SensorCommunitySinkConfig, ctx: SinkContext) -> SensorCommunitySink:
    return SensorCommunitySink(cfg, state_dir=ctx.state_dir)


PLUGIN = SinkPlugin(
    "sensor_community", frozenset({"url", "measurements", "sensors", "interval_s", "max_age_s",
                                   "timeout_s", "backoff_initial_s", "backoff_max_s"}),
    parse, open=_open, where=lambda c: c.url,
    backoff=lambda c: (c.backoff_initial_s, c.backoff_max_s))
