"""HTTP sink: POSTs batches of SenML-JSON; retries with backoff; honours Retry-After."""

from __future__ import annotations

import email.utils
import hashlib
import logging
import re
import time

import aiohttp

from ..config import HttpSinkConfig, shown_url
from ..resolved import Batch

log = logging.getLogger("lantern.sink.http")

RETRY_AFTER_MAX_S = 3600.0


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


def idempotency_key(batch: Batch) -> str:
    """The same readings always give the same key, so a retried POST is recognisable."""
    h = hashlib.sha256()
    for rid in batch.rids:
        h.update(rid.encode())
        h.update(b"\n")
    return h.hexdigest()[:32]


class HttpSink:
    name = "http"

    def __init__(self, cfg: HttpSinkConfig) -> None:
        self.cfg = cfg
        self._session: aiohttp.ClientSession | None = None
        self._headers = {"Content-Type": "application/senml+json"}
        if cfg.token_file:
            self._headers["Authorization"] = "Bearer " + cfg.token_file.read_text().strip()
        self.last_latency_s: float | None = None

    async def __aenter__(self) -> HttpSink:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_s))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def send(self, batch: Batch) -> None:
        assert self._session is not None
        body = batch.body()
        headers = dict(self._headers)
        headers["Idempotency-Key"] = idempotency_key(batch)
        t0 = time.monotonic()
        try:
            async with self._session.post(self.cfg.url, data=body, headers=headers) as resp:
                await resp.read()
                self.last_latency_s = time.monotonic() - t0
                if 200 <= resp.status < 300:
                    return
                retry_after = None
                if resp.status in (429, 503):
                    retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                raise DeliveryError(f"HTTP {resp.status} from {shown_url(self.cfg.url)}",
                                    retry_after)
        except (aiohttp.ClientError, TimeoutError) as e:
            raise DeliveryError(f"{type(e).__name__} posting to {shown_url(self.cfg.url)}: "
                                f"{e}") from None
