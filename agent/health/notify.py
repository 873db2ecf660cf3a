"""Alert notifications in Alertmanager's webhook format, and the targets that deliver them.

Each event becomes one notification of one alert (version "4": receiver, status, alerts[]
with labels, annotations, startsAt, endsAt, fingerprint; groupLabels, commonLabels,
commonAnnotations, externalURL, groupKey, truncatedAlerts), so anything that takes
Alertmanager's webhooks takes the gateway's. A target raises on any failure; the outbox
(store.py) keeps the notification and `Delivery` (service.py) tries it again.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from .alerts import RULES, Event, fingerprint

ZERO_TIME = "0001-01-01T00:00:00Z"  # Alertmanager's endsAt of an alert still firing


def rfc3339(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def payload(e: Event, receiver: str = "lantern", external_url: str = "") -> dict[str, Any]:
    labels = e.labels()
    annotations = {"summary": f"{e.node}: {e.summary}" if e.summary else e.node,
                   "description": RULES[e.alert][1]}
    group = {"alertname": e.alert, "node": e.node}
    alert = {"status": e.status, "labels": labels, "annotations": annotations,
             "startsAt": rfc3339(e.starts_at),
             "endsAt": ZERO_TIME if e.ends_at is None else rfc3339(e.ends_at),
             "generatorURL": external_url, "fingerprint": fingerprint(e.key)}
    group_key = "{}:{" + ", ".join(f'{k}="{v}"' for k, v in group.items()) + "}"
    return {"version": "4", "groupKey": group_key, "truncatedAlerts": 0, "status": e.status,
            "receiver": receiver, "groupLabels": group, "commonLabels": labels,
            "commonAnnotations": annotations, "externalURL": external_url, "alerts": [alert]}


def body(e: Event, receiver: str = "lantern", external_url: str = "") -> str:
    return json.dumps(payload(e, receiver, external_url), separators=(",", ":"),
                      sort_keys=True)


class Target(Protocol):
    name: str

    async def send(self, body: str) -> None:
        """Deliver one notification; raise if it was not taken."""


class DeliveryError(Exception):
    """A target did not take a notification (kept and tried again)."""


class Webhook:
    """POST to a URL (an Alertmanager-compatible receiver); any 2xx is a delivery. A redirect
    is not followed (the notification stays and is tried again): where alerts go is the
    operator's configuration, not the receiver's."""

    def __init__(self, url: str, session: Any, name: str = "webhook",
                 timeout_s: float = 10.0, headers: dict[str, str] | None = None) -> None:
        self.url = url
        self.session = session  # an aiohttp.ClientSession, owned by the caller
        self.name = name
        self.timeout_s = timeout_s
        self.headers = {"Content-Type": "application/json", **(headers or {})}

    @property
    def shown(self) -> str:
        """The URL as logs show it: no query (a receiver's token may ride there)."""
        u = urlsplit(self.url)
        return urlunsplit((u.scheme, u.netloc.rpartition("@")[2], u.path, "", ""))

    async def send(self, body: str) -> None:
        import aiohttp

        try:
            async with self.session.post(
                    self.url, data=body.encode(), headers=self.headers, allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as r:
                if 300 <= r.status < 400:
                    raise DeliveryError(f"{self.shown}: HTTP {r.status}, a redirect (not "
                                        "followed: set the URL it names in [health.webhook])")
                if not 200 <= r.status < 300:
                    raise DeliveryError(f"{self.shown}: HTTP {r.status}")
        except (aiohttp.ClientError, TimeoutError) as e:
            detail = no_url(str(e.message) if isinstance(e, aiohttp.ClientResponseError)
                             else str(e))
            raise DeliveryError(f"{self.shown}: {type(e).__name__}"
                                + (f": {detail}" if detail else "")) from None


# a URL in an error's text, however the client spelt it (yarl normalises %7E to ~, drops
# default ports...): only its scheme, host and path are ever shown
_URL = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://)(?:[^/\s@'\"]*@)?([^?#\s'\"]*)[^\s'\")]*")


def no_url(text: str) -> str:
    """`text` with every URL in it cut to scheme://host/path: no query, no userinfo."""
    return _URL.sub(r"\1\2", text)


class Mqtt:
    """Publish to a topic through the caller's MQTT client (QoS 1, not retained): `publish`
    is e.g. an aiomqtt client's publish bound to the gateway's [sinks.mqtt] connection."""

    def __init__(self, publish: Callable[[str, bytes], Awaitable[Any]],
                 topic: str = "lantern/alerts", name: str = "mqtt") -> None:
        self.publish = publish
        self.topic = topic
        self.name = name

    async def send(self, body: str) -> None:
        await self.publish(self.topic, body.encode())


class MqttPublisher:
    """A QoS 1 publisher of the gateway's own on [sinks.mqtt]'s broker (its settings, its
    client id + "-alerts"): connected when a notification is due, again after a failure."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg  # the MQTT sink's config (agent/sinks/mqtt.py MqttSinkConfig)
        self._client: Any = None
        self._password = (cfg.password_file.read_text().strip() if cfg.password_file
                          else None)

    async def publish(self, topic: str, payload: bytes) -> None:
        import aiomqtt

        try:
            if self._client is None:
                tls = None
                if self.cfg.tls:
                    import ssl

                    tls = ssl.create_default_context(
                        cafile=str(self.cfg.ca_file) if self.cfg.ca_file else None)
                client = aiomqtt.Client(self.cfg.host, self.cfg.port,
                                        identifier=self.cfg.client_id + "-alerts",
                                        username=self.cfg.username, password=self._password,
                                        tls_context=tls, timeout=self.cfg.timeout_s)
                await client.__aenter__()
                self._client = client
            await self._client.publish(topic, payload, qos=1)
        except (aiomqtt.MqttError, OSError) as e:
            await self.aclose()
            raise DeliveryError(f"MQTT {self.cfg.host}:{self.cfg.port}: {e}") from None

    async def aclose(self) -> None:
        import aiomqtt

        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(aiomqtt.MqttError, OSError):
                await client.__aexit__(None, None, None)
