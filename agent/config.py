"""Gateway configuration: TOML, validated at start, errors that name file, line, key and fix.

This module holds the shared sections ([gateway], [batch], [api], [queue], [history], [nodes])
and the secret-file helpers; every parser reads the file through configfile.Doc (lines, types,
bounds, unknown keys refused). Each sink's and link's table belongs to its plug-in
(agent/plugins.py): load_config loops over the registries.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from . import plugins
from .configfile import MAX_BYTES, Doc, one_of, positive
from .errors import ConfigError
from .ngsi import NodeMeta

# \Z, never $: "$" also matches before a final newline ("SL-1\n" would pass)
NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}\Z")


@dataclass(frozen=True)
class ApiConfig:
    """The local API and status page ([api])."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8470
    token_file: Path | None = None
    allowed_hosts: tuple[str, ...] = ()  # Host names served besides the listen address


# [queue] commit_window_ms is at most this: a node resends an unacknowledged frame from 1 s
# on (UART rto_ms), doubling up to 30 s; 10 s is issue 22's bound on the added ACK delay
COMMIT_WINDOW_MAX_MS = 10_000
DELIVER_EVERY_MAX_S = 3600


@dataclass(frozen=True)
class QueueConfig:
    """The queue ([queue]): its disk cap, what happens when that runs out, and how its writes
    are paced for an SD card (docs/performance.md, disk_wear)."""

    max_mb: float = 1024.0
    policy: str = "pause_intake"  # or "evict_oldest"
    # a group commit waits this long for the frames of other (slow) nodes (agent/ingest.py)
    commit_window_ms: int = 9000
    # confirmed deliveries are recorded in the queue this often (agent/queue/store.py)
    deliver_every_s: float = 600.0

    @property
    def max_bytes(self) -> int:
        return int(self.max_mb * (1 << 20))


@dataclass(frozen=True)
class HistoryConfig:
    """Delivered readings kept for the status page and /api ([history])."""

    keep_hours: float = 24.0
    max_samples: int = 50_000  # one sample: a node's readings at one time (one frame)


@dataclass(frozen=True)
class UpdatesConfig:
    """Staged rollouts of signed update bundles ([updates]; docs/rollout.md)."""

    release_key: Path  # the release PUBLIC key (NAME.pub.pem) bundles must be signed by
    canary: int | tuple[str, ...] = 1  # how many nodes (the first ones), or which, go first
    step: int = 5  # nodes updated at once after the canary
    node_timeout_s: float = 1800.0  # one node: transfer, switch and proof of the new version


@dataclass(frozen=True)
class HealthConfig:
    """Lamp faults, energy and health alerts ([health]; docs/alerts.md), and where the
    gateway delivers its alerts itself: a webhook (Alertmanager's format) and/or MQTT."""

    settings: Any  # lantern.agent.health.settings.Settings: thresholds and lamps
    webhook_url: str | None = None
    webhook_token_file: Path | None = None  # a bearer token for the webhook (mode 0600)
    webhook_timeout_s: float = 10.0
    mqtt_topic: str | None = None  # through [sinks.mqtt]'s broker, a client of its own
    receiver: str = "lantern"  # the notifications' "receiver"
    external_url: str = ""  # their "externalURL" (the status page, as operators reach it)

    def describe(self) -> str:
        """One line for `lantern gateway check-config`."""
        # without its query either: a receiver's token may ride there
        hook = shown_url(self.webhook_url).split("?")[0] if self.webhook_url else ""
        to = [f"webhook {hook}" if hook else "",
              f"MQTT topic {self.mqtt_topic}" if self.mqtt_topic else ""]
        lamps = len(self.settings.lamps)
        return (f"  health:  lamp faults, energy ({self.settings.grid_g_per_kwh:g} gCO2e/kWh) "
                f"and alerts; {self.settings.default_lamp.rating_w:g} W lamps"
                + (f", {lamps} configured by node" if lamps else "") + "; alerts to "
                + (", ".join(t for t in to if t) or "/metrics and the status page only"))


@dataclass(frozen=True)
class ClockConfig:
    """The gateway's own clock ([clock]; docs/time.md): "kernel" hands nodes its time only
    while the kernel says a time daemon has synchronised it; "trust" always (a host whose clock
    is kept right by means the kernel does not see: a container, simulated streets)."""

    mode: str = "kernel"


@dataclass(frozen=True)
class Config:
    path: Path
    state_dir: Path
    keys_file: Path
    # each configured link kind → its tables' configs; each configured sink → its config (the
    # classes are the plug-ins' own: agent/plugins.py), both in the registries' order
    links: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    sinks: dict[str, Any] = field(default_factory=dict)
    batch_max_records: int = 500
    batch_max_age_s: float = 1.0
    log_level: str = "info"
    nodes: dict[str, NodeMeta] = field(default_factory=dict)
    api: ApiConfig = field(default_factory=ApiConfig)
    history: HistoryConfig = field(default_factory=HistoryConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    updates: UpdatesConfig | None = None  # no [updates]: the gateway refuses rollouts
    health: HealthConfig | None = None  # no [health]: no lamp faults, energy or alerts
    clock: ClockConfig = field(default_factory=ClockConfig)

    # one kind by name (its plug-in's class: typed there, not here, so that this module
    # depends on no plug-in, not even for types)
    @property
    def serial(self) -> list[Any]:
        return list(self.links.get("serial", ()))

    @property
    def ble(self) -> tuple[Any, ...]:
        return self.links.get("ble", ())

    @property
    def http(self) -> Any:
        return self.sinks.get("http")

    @property
    def ngsi_ld(self) -> Any:
        return self.sinks.get("ngsi_ld")

    @property
    def mqtt(self) -> Any:
        return self.sinks.get("mqtt")


def http_url(v: str) -> str | None:
    u = urlparse(v)
    if u.username is not None or u.password is not None:
        # secrets never sit in gateway.toml (it is shown, logged and readable): said without
        # repeating the URL, which would print the password
        return ("a URL must not carry credentials (user:password@); put a bearer token in "
                "the sink's token_file (mode 0600) instead")
    if u.scheme in ("http", "https") and u.netloc:
        return None
    return f"expected an http(s) URL, got {v!r}"


def shown_url(url: str) -> str:
    """The URL as logs and messages may show it: without any user:password@."""
    u = urlparse(url)
    if u.username is None and u.password is None:
        return url
    return u._replace(netloc="***@" + u.netloc.rpartition("@")[2]).geturl()


def load_config(path: Path | str) -> Config:
    path = Path(path)
    doc = Doc(path)
    d = doc.data
    known = {"gateway", "links", "batch", "sinks", "nodes", "api", "history", "queue",
             "updates", "health", "clock"}
    for k in d:
        if k not in known:
            raise doc.error(k, f"unknown section; expected one of {', '.join(sorted(known))}")
    gw = doc.table(d, "gateway", "gateway", ("state_dir", "keys_file", "log_level"), {})
    base = path.parent
    state_dir = base / doc.get(gw, "state_dir", "gateway.state_dir", str, "/var/lib/lantern")
    keys_file = base / doc.get(gw, "keys_file", "gateway.keys_file", str,
                               fix="the node key file, e.g. keys_file = \"keys.toml\"")
    log_level = doc.get(gw, "log_level", "gateway.log_level", str, "info",
                        lambda v: None if v in ("debug", "info", "warning", "error")
                        else "expected debug, info, warning or error")
    links = _links(doc, doc.get(d, "links", "links", dict, {}), base)
    batch = doc.table(d, "batch", "batch", ("max_records", "max_age_s"), {})
    max_records = doc.get(batch, "max_records", "batch.max_records", int, 500,
                          lambda v: None if 1 <= v <= 10000 else "must be 1..10000")
    max_age = float(doc.get(batch, "max_age_s", "batch.max_age_s", (int, float), 1.0, positive))
    sinks = _sinks(doc, doc.get(d, "sinks", "sinks", dict, {}), base)
    nodes = _nodes(doc, doc.get(d, "nodes", "nodes", dict, {}))
    api, history = _api(doc, d, base), _history(doc, d)
    if not links:
        raise doc.error("links", "no link configured; add a [[links.serial]] table with a port "
                        "(or [[links.ble]])")
    if not sinks:
        raise doc.error("sinks", "no sink configured; add [sinks.http] with a url "
                        "(or [sinks.ngsi_ld], [sinks.mqtt])")
    return Config(path, state_dir, keys_file, links, sinks, max_records, max_age, log_level,
                  nodes, api=api, history=history, queue=_queue(doc, d),
                  updates=_updates(doc, d, base), health=_health(doc, d, base, sinks),
                  clock=_clock(doc, d))


def _links(doc: Doc, links: dict[str, Any], base: Path) -> dict[str, tuple[Any, ...]]:
    """Each [[links.<kind>]] by its plug-in (agent/plugins.py), in the registry's order."""
    for k in links:
        if k not in plugins.LINKS:
            raise doc.error(f"links.{k}", f"unknown link; expected {one_of(list(plugins.LINKS))}")
    out = {}
    for name in plugins.LINKS:
        if name not in links:
            continue
        tables = doc.get(links, name, f"links.{name}", list)
        plugin = plugins.link(name)
        for i, t in enumerate(tables):
            if not isinstance(t, dict):
                raise doc.error(f"links.{name}[{i}]", f"expected a table ([[links.{name}]])")
            doc.only(t, f"links.{name}[{i}]", plugin.keys)
        if configs := plugin.parse(doc, tables, base):
            out[name] = configs
    return out


def _sinks(doc: Doc, sinks: dict[str, Any], base: Path) -> dict[str, Any]:
    """Each [sinks.<name>] by its plug-in (agent/plugins.py), in the registry's order."""
    out = {}
    for name in plugins.SINKS:
        if name in sinks:
            plugin = plugins.sink(name)
            table = doc.table(sinks, name, f"sinks.{name}", plugin.keys)
            out[name] = plugin.parse(doc, table, f"sinks.{name}", base)
    for k in sinks:
        if k not in plugins.SINKS:
            raise doc.error(f"sinks.{k}", f"unknown sink; expected {one_of(list(plugins.SINKS))}")
    return out


def _queue(doc: Doc, d: dict[str, Any]) -> QueueConfig:
    q = doc.table(d, "queue", "queue", ("max_mb", "policy", "commit_window_ms",
                                        "deliver_every_s"), {})
    return QueueConfig(
        commit_window_ms=doc.get(
            q, "commit_window_ms", "queue.commit_window_ms", int, 9000,
            lambda v: None if 0 <= v <= COMMIT_WINDOW_MAX_MS
            else f"must be 0..{COMMIT_WINDOW_MAX_MS} (milliseconds; 0: commit every frame at "
                 f"once), got {v}"),
        deliver_every_s=float(doc.get(
            q, "deliver_every_s", "queue.deliver_every_s", (int, float), 600.0,
            lambda v: None if 0 <= v <= DELIVER_EVERY_MAX_S
            else f"must be 0..{DELIVER_EVERY_MAX_S} (seconds; 0: record each delivery at "
                 f"once), got {v}")),
        max_mb=float(doc.get(q, "max_mb", "queue.max_mb", (int, float), 1024.0,
                             lambda v: None if 1 <= v <= 1 << 20
                             else f"must be 1..1048576 (MiB), got {v}")),
        policy=doc.get(q, "policy", "queue.policy", str, "pause_intake",
                       lambda v: None if v in ("pause_intake", "evict_oldest")
                       else f"expected \"pause_intake\" or \"evict_oldest\", got {v!r}"))


def _api(doc: Doc, d: dict[str, Any], base: Path) -> ApiConfig:
    a = doc.table(d, "api", "api", ("enabled", "host", "port", "token_file", "allowed_hosts"),
                  {})
    token = doc.get(a, "token_file", "api.token_file", str, None)
    cfg = ApiConfig(
        enabled=doc.get(a, "enabled", "api.enabled", bool, True),
        host=doc.get(a, "host", "api.host", str, "127.0.0.1", _host),
        port=doc.get(a, "port", "api.port", int, 8470,
                     lambda v: None if 0 <= v <= 65535 else f"must be 0..65535, got {v}"),
        token_file=base / token if token else None,
        allowed_hosts=_allowed_hosts(doc, a))
    if cfg.token_file:
        if not check_secret_file(cfg.token_file, "api.token_file").strip():
            raise doc.error("api.token_file", f"{cfg.token_file} is empty; put a long random "
                            "token in it (e.g. `openssl rand -hex 32`)")
    elif cfg.enabled and not _loopback(cfg.host):
        raise doc.error("api.host", f"{cfg.host!r} exposes node data beyond this machine "
                        "without a token; set api.token_file, or bind 127.0.0.1")
    return cfg


_HOST_NAME = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)(\.(?!-)[a-z0-9_-]{1,63}(?<!-))*")


def _allowed_hosts(doc: Doc, a: dict[str, Any]) -> tuple[str, ...]:
    """[api] allowed_hosts: names (or addresses) the API answers to, lower-case, no port."""
    hosts = doc.get(a, "allowed_hosts", "api.allowed_hosts", list, [])
    out = []
    for i, h in enumerate(hosts, 1):
        name = h.lower().rstrip(".") if isinstance(h, str) else ""
        try:
            name = str(ipaddress.ip_address(name.removeprefix("[").removesuffix("]")))
        except ValueError:
            if not (_HOST_NAME.fullmatch(name) and len(name) <= 253):
                raise doc.error("api.allowed_hosts", f"entry {i}: expected a host name or IP "
                                f"address (no scheme, port or wildcard: the name a browser "
                                f"shows, e.g. \"gateway-7.example\"), got {h!r}") from None
        out.append(name)
    return tuple(out)


def _updates(doc: Doc, d: dict[str, Any], base: Path) -> UpdatesConfig | None:
    """[updates]: the release public key and how a rollout proceeds (docs/rollout.md)."""
    if "updates" not in d:
        return None
    u = doc.table(d, "updates", "updates", ("release_key", "canary", "step", "node_timeout_s"))
    key = base / doc.get(u, "release_key", "updates.release_key", str,
                         fix='the release public key, e.g. release_key = "release.pub.pem"')
    canary = doc.get(u, "canary", "updates.canary", (int, list), 1, _canary)
    cfg = UpdatesConfig(
        release_key=key,
        canary=tuple(canary) if isinstance(canary, list) else canary,
        step=doc.get(u, "step", "updates.step", int, 5,
                     lambda v: None if 1 <= v <= 1000 else f"must be 1..1000, got {v}"),
        node_timeout_s=float(doc.get(u, "node_timeout_s", "updates.node_timeout_s",
                                     (int, float), 1800.0,
                                     lambda v: positive(v) or (
                                         None if v <= 7 * 86400 else
                                         f"must be at most a week of seconds, got {v}"))))
    try:
        check_public_key_file(key, "updates.release_key")
    except ConfigError as e:
        raise doc.error("updates.release_key", str(e)) from None
    return cfg


def _clock(doc: Doc, d: dict[str, Any]) -> ClockConfig:
    c = doc.table(d, "clock", "clock", ("mode",), {})
    return ClockConfig(mode=doc.get(
        c, "mode", "clock.mode", str, "kernel",
        lambda v: None if v in ("kernel", "trust")
        else f"expected \"kernel\" (nodes get the time once a time daemon has synchronised "
             f"this machine's clock) or \"trust\" (always), got {v!r}"))


HEALTH_TARGETS = ("webhook", "mqtt")



# the unit's TimeoutStopSec is 30 s: a stop waits out one delivery (timeout + 1 s), so a
# longer timeout would get the gateway killed mid-delivery and the alert sent twice
WEBHOOK_TIMEOUT_MAX_S = 20.0


def _webhook_timeout(v: float) -> str | None:
    why = positive(v)
    if why is None and v > WEBHOOK_TIMEOUT_MAX_S:
        why = (f"must be at most {WEBHOOK_TIMEOUT_MAX_S:g} s (the service stops within 30 s "
               f"and waits out a delivery), got {v!r}")
    return why

def _health(doc: Doc, d: dict[str, Any], base: Path, sinks: dict[str, Any]
            ) -> HealthConfig | None:
    """[health] (thresholds, lamps: agent/health/settings.py), [health.webhook] and
    [health.mqtt] (where the gateway delivers its alerts)."""
    if "health" not in d:
        return None
    from .health import settings

    h = doc.get(d, "health", "health", dict)
    parsed = settings.parse(doc, h, "health", extra=(*HEALTH_TARGETS, "receiver",
                                                     "external_url"))
    w = doc.table(h, "webhook", "health.webhook", ("url", "token_file", "timeout_s"), {})
    url = doc.get(w, "url", "health.webhook.url", str, check=http_url,
                  fix='the receiver\'s URL, e.g. "https://ops.example/hooks/lantern" '
                      '(Alertmanager\'s webhook JSON is POSTed to it)') if "webhook" in h else None
    token = doc.get(w, "token_file", "health.webhook.token_file", str, None)
    token_file = base / token if token else None
    if token_file and not check_secret_file(token_file, "health.webhook.token_file").strip():
        raise doc.error("health.webhook.token_file", f"{token_file} is empty")
    m = doc.table(h, "mqtt", "health.mqtt", ("topic",), {})
    topic = doc.get(m, "topic", "health.mqtt.topic", str, "lantern/alerts",
                    lambda v: None if v and not set(v) & {"+", "#", "\0"}
                    else "expected a topic name without + # or NUL") if "mqtt" in h else None
    if topic is not None and "mqtt" not in sinks:
        raise doc.error("health.mqtt", "alerts go to the broker of [sinks.mqtt], which is not "
                        "configured; add [sinks.mqtt] with its host, or remove [health.mqtt]")
    return HealthConfig(
        parsed, webhook_url=url, webhook_token_file=token_file,
        webhook_timeout_s=float(doc.get(w, "timeout_s", "health.webhook.timeout_s",
                                        (int, float), 10.0, _webhook_timeout)),
        mqtt_topic=topic,
        receiver=doc.get(h, "receiver", "health.receiver", str, "lantern"),
        external_url=doc.get(h, "external_url", "health.external_url", str, "",
                             lambda v: None if not v else http_url(v)))


def _canary(v: int | list[Any]) -> str | None:
    if isinstance(v, int):
        return None if 0 <= v <= 1000 else f"a count 0..1000 or a list of node ids, got {v}"
    if not v or not all(isinstance(x, str) and NODE_ID.match(x) for x in v):
        return 'a count, or a list of node ids, e.g. ["SL-0001", "SL-0007"]'
    if len(set(v)) != len(v):
        return "a node id is listed twice"
    return None


def check_public_key_file(path: Path, what: str) -> None:
    """A release public key file, checked like a secret file except that others may
    read it: nobody but its owner may change it (whoever can, chooses what the gateway
    carries), and it must be an Ed25519 key the nodes would take. ConfigError otherwise."""
    try:
        st = path.stat()
    except OSError as e:
        raise ConfigError(f"{path}: {what}: cannot read: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{path}: {what}: not a regular file")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(f"{path}: {what}: mode {stat.S_IMODE(st.st_mode):04o} lets other "
                          f"users replace the release key; run: chmod go-w {path}")
    if st.st_size > MAX_BYTES:
        raise ConfigError(f"{path}: {what}: larger than {MAX_BYTES >> 20} MiB, not a key file")
    from lantern.tools.field.release import ReleaseError, load_public

    try:
        load_public(path)
    except ReleaseError as e:
        raise ConfigError(f"{what}: {e} (the .pub.pem that `lantern release keygen` wrote)"
                          ) from None


def _history(doc: Doc, d: dict[str, Any]) -> HistoryConfig:
    h = doc.table(d, "history", "history", ("keep_hours", "max_samples"), {})
    return HistoryConfig(
        keep_hours=float(doc.get(h, "keep_hours", "history.keep_hours", (int, float), 24.0,
                                 lambda v: None if 0 < v <= 24 * 366 else
                                 f"must be > 0 and at most a year of hours, got {v}")),
        max_samples=doc.get(h, "max_samples", "history.max_samples", int, 50_000,
                            lambda v: None if 100 <= v <= 10_000_000
                            else f"must be 100..10000000, got {v}"))


def _host(v: str) -> str | None:
    try:
        ipaddress.ip_address(v)
    except ValueError:
        if v != "localhost":
            return f"expected an IP address to bind (e.g. \"127.0.0.1\" or \"::1\"), got {v!r}"
    return None


def _loopback(host: str) -> bool:
    return host == "localhost" or ipaddress.ip_address(host).is_loopback


def _nodes(doc: Doc, nodes: dict[str, Any]) -> dict[str, NodeMeta]:
    """Where each node stands: [nodes."SL-0042"] pole = "42", location = [lat, lon]."""
    out = {}
    for node, t in nodes.items():
        key = f"nodes.{node}"
        if not isinstance(t, dict):
            raise doc.error(key, 'expected a table: [nodes."SL-0042"]')
        doc.only(t, key, ("pole", "location", "interval_s"))
        loc = doc.get(t, "location", f"{key}.location", list, None,
                      lambda v: None if len(v) == 2 and all(
                          isinstance(x, int | float) and not isinstance(x, bool) for x in v)
                      and -90 <= v[0] <= 90 and -180 <= v[1] <= 180
                      else "expected [latitude, longitude] in degrees")
        out[node] = NodeMeta(
            pole=str(doc.get(t, "pole", f"{key}.pole", (str, int), "")),
            lat=float(loc[0]) if loc else None, lon=float(loc[1]) if loc else None,
            interval_s=float(doc.get(t, "interval_s", f"{key}.interval_s", (int, float), 60.0,
                                     positive)))
    return out


def check_secret_file(path: Path, what: str) -> str:
    """A secret's text; refused (saying how to fix it) if other users can read it."""
    try:
        st = path.stat()
    except OSError as e:
        raise ConfigError(f"{path}: {what}: cannot read: {e.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"{path}: {what}: mode {stat.S_IMODE(st.st_mode):04o} lets other users read a "
            f"secret; run: chmod 600 {path}")
    # read it now, so `check-config` finds what the service would stumble on later
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)  # a secret is a line or a few KiB, never /dev/zero
    except OSError as e:
        raise ConfigError(f"{path}: {what}: cannot read: {e.strerror}") from None
    if len(raw) > MAX_BYTES:
        raise ConfigError(f"{path}: {what}: larger than {MAX_BYTES >> 20} MiB, not a secret file")
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: {what}: not UTF-8 text") from None


def load_keys(path: Path) -> dict[bytes, bytes]:
    """Node keys (kid bytes → 32-byte key) from a 0600 TOML file: [nodes] "SL-0001" = "hex"."""
    check_secret_file(path, "node key file")
    doc = Doc(path)
    nodes = doc.get(doc.data, "nodes", "nodes", dict,
                    fix='add a [nodes] table: "SL-0001" = "<64 hex digits>"')
    keys: dict[bytes, bytes] = {}
    for node, hexkey in nodes.items():
        if not NODE_ID.match(node):
            raise doc.error(f"nodes.{node}", "a node id is 1-32 letters, digits, '.', '_' or '-'")
        try:
            key = bytes.fromhex(hexkey) if isinstance(hexkey, str) else b""
        except ValueError:
            key = b""
        if len(key) != 32:
            raise doc.error(f"nodes.{node}", "expected 64 hex digits (a 256-bit key)")
        keys[node.encode()] = key
    return keys


def write_secret(path: Path, text: str | bytes) -> None:
    """Create or replace a secret file with mode 0600 from the start (no window at 0644);
    a crash leaves the old file or the new one, never half of one, and the new one on disk
    once this returns (the directory entry too)."""
    tmp = path.with_name(path.name + ".tmp")
    # a stale temp file would keep its old mode: O_EXCL after removing it guarantees 0600
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(text.encode() if isinstance(text, str) else text)
        try:
            # a replaced file keeps its owner: `lantern provision` run as root must not take
            # /etc/lantern/keys.toml away from the gateway's user
            st = path.stat()
            if (st.st_uid, st.st_gid) != (os.getuid(), os.getgid()):
                os.fchown(f.fileno(), st.st_uid, st.st_gid)
        except FileNotFoundError:
            pass  # a new file: ours
        f.flush()
        os.fsync(f.fileno())  # the keys must be on disk before the old file is gone
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)  # the rename itself: a power cut must not bring the old file back
    finally:
        os.close(dfd)
