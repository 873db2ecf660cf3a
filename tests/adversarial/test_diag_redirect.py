"""`lantern diag gateway` never follows a redirect: the bearer token stays with the URL given."""

from __future__ import annotations

from aiohttp import web

from lantern.tools.field import diag_gateway as dg


async def test_a_redirect_is_not_followed_with_the_token() -> None:
    seen: list[str | None] = []

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPFound("/elsewhere/" + request.match_info["tail"])

    async def elsewhere(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/elsewhere/{tail:.*}", elsewhere)
    app.router.add_get("/{tail:.*}", moved)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        rep = await dg.diagnose(f"http://127.0.0.1:{port}/", "s3cret-token", 2.0)
    finally:
        await runner.cleanup()
    assert seen == []
    assert rep["exit"] == 2
    assert "redirect" in rep["problems"][0] and "s3cret" not in rep["problems"][0]
