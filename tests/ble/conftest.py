from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from lantern.agent import api
from lantern.agent.links import ble as ble_link

from .harness import World


@pytest.fixture
async def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[World]:
    w = World(tmp_path)
    init = ble_link.BleLink.__init__

    def capture(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        w.links.append(self)

    monkeypatch.setattr(ble_link.BleLink, "__init__", capture)
    enter = api.ApiServer.__aenter__

    async def served(self: api.ApiServer) -> api.ApiServer:
        out = await enter(self)
        if self.url:
            w.api_urls.append(self.url)
        return out

    monkeypatch.setattr(api.ApiServer, "__aenter__", served)
    yield w
    await w.close()
