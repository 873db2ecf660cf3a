"""What the open-data sinks share: one aiohttp session, a refusal as a DeliveryError, and the
quality flags a batch carries.

A 3xx is counted by status and never followed (agent/sinks/http.py says why); a 429 or 503
carries its Retry-After to the forwarder; anything else that is not the sink's success is a
failed delivery naming the URL without its credentials.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Self

import aiohttp

from ..config import shown_url
from .http import DeliveryError, parse_retry_after, redirect_error


class SessionSink:
    """A sink over one aiohttp session, opened and closed with the sink."""

    def __init__(self, timeout_s: float) -> None:
        self._timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None
        self.last_latency_s: float | None = None
        self.redirects: Counter[int] = Counter()  # 3xx answers, by status

    async def __aenter__(self) -> Self:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._timeout_s))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    def refused(self, url: str, resp: aiohttp.ClientResponse, detail: str = "") -> DeliveryError:
        """The failed delivery an answer that is not the sink's success means."""
        if 300 <= resp.status < 400:
            self.redirects[resp.status] += 1
            return redirect_error(url, resp.status, resp.headers.get("Location"))
        retry_after = None
        if resp.status in (429, 503):
            retry_after = parse_retry_after(resp.headers.get("Retry-After"))
        return DeliveryError(f"HTTP {resp.status} from {shown_url(url)}"
                             + (f": {detail}" if detail else ""), retry_after)


def quality_flags(records: list[dict[str, Any]]) -> dict[tuple[str, str], int]:
    """(reading name, its frame) → the bits of its `<name>.q` record in that frame.

    A frame is its reading ids' `<node>:<seq>` (two packs sealed in the same second share a
    time, never a frame). docs/measurements.md lists the bits.
    """
    return {(r["n"][:-2], frame(r["id"])): r["v"] for r in records
            if str(r.get("n", "")).endswith(".q") and type(r.get("v")) is int}


def frame(rid: str) -> str:
    return rid.rpartition(":")[0]
