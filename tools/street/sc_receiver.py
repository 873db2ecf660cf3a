"""A Sensor.Community push API stand-in that takes only their documented request, and refuses
anything else.

As the reference firmware (opendata-stuttgart/sensors-software, airrohr-firmware) sends it:
`POST /v1/push-sensor-data/`, `Content-Type: application/json`, `X-Sensor` a registered sensor
id, `X-Pin` the sensor kind's pin, a body of exactly `software_version` (text) and
`sensordatavalues` (a non-empty list of `{"value_type", "value"}` with the value as decimal
text and a value_type that pin carries, each at most once). A sensor must be registered for
the pin; one sensor and pin may push at most once per `min_interval_s` (429 otherwise). A
push accepted answers 201, as the live API does.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

PATH = "/v1/push-sensor-data/"
# pin → the value types the API takes on it (firmware ext_def.h pins and its value names)
PIN_VALUES: dict[int, set[str]] = {
    1: {"P0", "P1", "P2", "P4", "N05", "N1", "N25", "N4", "N10", "TS"},  # SDS011, PMS, SPS30
    3: {"temperature", "pressure"},  # BMP180, BMP280
    5: {"durP1", "ratioP1", "P1", "durP2", "ratioP2", "P2"},  # PPD42NS
    7: {"temperature", "humidity"},  # DHT22, HTU21D, SHT3x
    11: {"temperature", "humidity", "pressure"},  # BME280
    13: {"temperature"},  # DS18B20
    15: {"noise_LAeq", "noise_LA_min", "noise_LA_max"},  # DNMS
    17: {"temperature", "humidity", "co2_ppm"},  # SCD30
}


@dataclass
class ScReceiver:
    registered: dict[str, set[int]] = field(default_factory=dict)  # sensor id → its pins
    min_interval_s: float = 145.0
    clock: Callable[[], float] = time.time
    down: bool = False
    refuse: set[str] = field(default_factory=set)  # value types answered 400 (as a bad value)
    accepted: list[tuple[str, int, dict[str, str]]] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    url: str = ""
    _last: dict[tuple[str, int], float] = field(default_factory=dict)
    _runner: web.AppRunner | None = None

    def _refuse(self, status: int, reason: str) -> web.Response:
        self.rejected.append(reason)
        return web.json_response({"detail": reason}, status=status)

    async def _push(self, request: web.Request) -> web.Response:
        if self.down:
            return web.Response(status=503, headers={"Retry-After": "1"})
        if request.content_type != "application/json":
            return self._refuse(400, f"content type {request.content_type!r}")
        sensor, pin_text = request.headers.get("X-Sensor"), request.headers.get("X-Pin")
        if not sensor or sensor not in self.registered:
            return self._refuse(403, f"sensor {sensor!r} is not registered")
        if not pin_text or not pin_text.isdigit() or int(pin_text) not in PIN_VALUES:
            return self._refuse(400, f"X-Pin {pin_text!r} is not a sensor pin")
        pin = int(pin_text)
        if pin not in self.registered[sensor]:
            return self._refuse(403, f"sensor {sensor} has no sensor on pin {pin}")
        try:
            body: Any = json.loads(await request.read())
        except ValueError:
            return self._refuse(400, "body is not JSON")
        if not isinstance(body, dict) or set(body) != {"software_version", "sensordatavalues"} \
                or not isinstance(body["software_version"], str):
            return self._refuse(400, "body must hold software_version and sensordatavalues")
        values = body["sensordatavalues"]
        if not isinstance(values, list) or not values:
            return self._refuse(400, "sensordatavalues must be a non-empty list")
        got: dict[str, str] = {}
        for v in values:
            if not isinstance(v, dict) or set(v) != {"value_type", "value"}:
                return self._refuse(400, f"{v!r}: expected value_type and value")
            vt, val = v["value_type"], v["value"]
            if vt not in PIN_VALUES[pin] or vt in got:
                return self._refuse(400, f"{vt!r} is not a valid choice on pin {pin}, or twice")
            if not isinstance(val, str) or not _decimal(val):
                return self._refuse(400, f"{vt}: value {val!r} is not decimal text")
            if vt in self.refuse:
                return self._refuse(400, f"{vt}: value {val!r} refused")
            got[vt] = val
        now = self.clock()
        last = self._last.get((sensor, pin))
        if last is not None and now - last < self.min_interval_s:
            return self._refuse(429, f"sensor {sensor} pin {pin} pushed {now - last:.0f} s "
                                "after its previous push")
        self._last[(sensor, pin)] = now
        self.accepted.append((sensor, pin, got))
        return web.json_response(values, status=201)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        app = web.Application()
        app.router.add_post(PATH, self._push)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        sock = site._server.sockets[0]  # type: ignore[union-attr]
        self.url = f"http://{host}:{sock.getsockname()[1]}{PATH}"
        return self.url

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()


def _decimal(text: str) -> bool:
    try:
        return math.isfinite(float(text)) and text.strip() == text and "_" not in text
    except ValueError:
        return False
