"""A spec-following NGSI-LD test broker: batch upsert only, strict about what it accepts.

Checks the content type, the @context of every entity, the batch size and the entity shape,
merges attributes like `options=update`, and can answer 207 for chosen entity ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

MAX_BATCH = 500


@dataclass
class NgsiBroker:
    entities: dict[str, dict[str, Any]] = field(default_factory=dict)
    history: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    requests: int = 0
    rejected: list[str] = field(default_factory=list)  # why requests were refused
    fail_ids: dict[str, int] = field(default_factory=dict)  # entity id → 207 failures left
    down: bool = False
    tenants: set[str] = field(default_factory=set)
    url: str = ""
    _runner: web.AppRunner | None = None

    def _problem(self, status: int, title: str) -> web.Response:
        self.rejected.append(title)
        body = {"type": "https://uri.etsi.org/ngsi-ld/errors/BadRequestData", "title": title}
        return web.json_response(body, status=status, content_type="application/problem+json")

    async def _upsert(self, request: web.Request) -> web.Response:
        if self.down:
            return web.Response(status=503, headers={"Retry-After": "1"})
        self.requests += 1
        if request.query.get("options") != "update":
            return self._problem(400, "expected options=update")
        if request.content_type != "application/ld+json":
            return self._problem(415, f"content type {request.content_type}, "
                                      "expected application/ld+json")
        try:
            ents = json.loads(await request.read())
        except ValueError:
            return self._problem(400, "body is not JSON")
        if not isinstance(ents, list) or not ents:
            return self._problem(400, "expected a non-empty array of entities")
        if len(ents) > MAX_BATCH:
            return self._problem(413, f"{len(ents)} entities in one batch (max {MAX_BATCH})")
        ids = [e.get("id") for e in ents if isinstance(e, dict)]
        if len(ids) != len(ents) or len(set(ids)) != len(ids):
            return self._problem(400, "entities need unique ids within a batch")
        for e in ents:
            ctx = e.get("@context")
            if not ctx or "https://uri.etsi.org/ngsi-ld/v1/ngsi-ld-core-context.jsonld" not in (
                    ctx if isinstance(ctx, list) else [ctx]):
                return self._problem(400, f"{e['id']}: @context missing the core context")
            if not str(e["id"]).startswith("urn:ngsi-ld:") or not e.get("type"):
                return self._problem(400, f"{e['id']}: id must be a urn:ngsi-ld URI with a type")
            for k, v in e.items():
                if k in ("id", "type", "@context"):
                    continue
                if not isinstance(v, dict) or v.get("type") not in (
                        "Property", "GeoProperty", "Relationship"):
                    return self._problem(400, f"{e['id']}: attribute {k} is not normalized")
        tenant = request.headers.get("NGSILD-Tenant")
        if tenant:
            self.tenants.add(tenant)
        errors, success = [], []
        for e in ents:
            left = self.fail_ids.get(e["id"], 0)
            if left:
                self.fail_ids[e["id"]] = left - 1
                errors.append({"entityId": e["id"], "error": {
                    "type": "https://uri.etsi.org/ngsi-ld/errors/InternalError",
                    "title": "simulated failure"}})
                continue
            merged = self.entities.setdefault(e["id"], {})
            merged.update(e)
            self.history.setdefault(e["id"], []).append(e)
            success.append(e["id"])
        if errors:
            return web.json_response({"success": success, "errors": errors}, status=207)
        return web.Response(status=204)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_post("/ngsi-ld/v1/entityOperations/upsert", self._upsert)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        sock = site._server.sockets[0]  # type: ignore[union-attr]
        self.url = f"http://{host}:{sock.getsockname()[1]}"
        return self.url

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()
