"""A small SenML-JSON receiver standing in for a city platform: counts, dedupes, reports."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

Listener = Callable[[list[dict[str, Any]]], None]


@dataclass
class Upstream:
    """Accepts POSTed batches; readings are kept by their id, duplicates counted."""

    listener: Listener | None = None
    readings: dict[str, dict[str, Any]] = field(default_factory=dict)
    arrival: dict[str, float] = field(default_factory=dict)
    # the gateway's firmware-version records (docs/updates.md "Where the version shows"):
    # what a node runs, not a reading; kept by id apart from the readings
    firmware: dict[str, dict[str, Any]] = field(default_factory=dict)
    duplicates: int = 0
    conflicting: int = 0
    batches: int = 0
    idempotency_keys: list[str] = field(default_factory=list)
    fail_next: list[int] = field(default_factory=list)  # statuses to answer before accepting
    retry_after: str | None = None
    url: str = ""
    _runner: web.AppRunner | None = None

    async def _post(self, request: web.Request) -> web.Response:
        if self.fail_next:
            status = self.fail_next.pop(0)
            headers = {"Retry-After": self.retry_after} if self.retry_after else {}
            return web.Response(status=status, headers=headers)
        if request.content_type != "application/senml+json":
            return web.Response(status=415, text="expected application/senml+json")
        try:
            records = json.loads(await request.read())
            assert isinstance(records, list)
        except (ValueError, AssertionError):
            return web.Response(status=400, text="expected a SenML-JSON array")
        self.batches += 1
        self.idempotency_keys.append(request.headers.get("Idempotency-Key", ""))
        fresh = []
        now = time.time()
        for r in records:
            rid = r.get("id")
            if str(r.get("n", "")).endswith(":firmware") and "vs" in r:
                self.firmware[str(rid)] = r
                continue
            if rid in self.readings:
                self.duplicates += 1
                if self.readings[rid] != r:
                    self.conflicting += 1
                continue
            self.readings[rid] = r
            self.arrival[rid] = now
            fresh.append(r)
        if self.listener and fresh:
            self.listener(fresh)
        return web.Response(status=204)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        app = web.Application()
        app.router.add_post("/senml", self._post)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        sock = site._server.sockets[0]  # type: ignore[union-attr]
        self.url = f"http://{host}:{sock.getsockname()[1]}/senml"
        return self.url

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()
