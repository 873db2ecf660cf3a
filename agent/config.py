"""Gateway configuration: TOML, validated at start, errors that name file, line, key and fix."""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .errors import ConfigError
from .ngsi import MAX_BATCH, NodeMeta

# \Z, never $: "$" also matches before a final newline ("SL-1\n" would pass)
NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}\Z")


@dataclass(frozen=True)
class SerialLinkConfig:
    port: str
    baud: int = 115200


@dataclass(frozen=True)
class BleDeviceConfig:
    """A third-party BTHome sensor whose adverts become readings ([[links.ble.devices]])."""

    address: str
    name: str
    bindkey: bytes | None = None


@dataclass(frozen=True)
class BleLinkConfig:
    """One Bluetooth adapter ([[links.ble]]); docs/ble.md explains each setting."""

    adapter: str = "hci0"
    max_connections: int = 3
    scanning_mode: str = "passive"
    connect_timeout_s: float = 15.0
    idle_timeout_s: float = 10.0
    max_session_s: float = 120.0
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 120.0
    scan_stall_s: float = 60.0
    require_encrypted_adverts: bool = True
    repeat_s: float = 60.0
    devices: tuple[BleDeviceConfig, ...] = ()


@dataclass(frozen=True)
class HttpSinkConfig:
    url: str
    timeout_s: float = 10.0
    token_file: Path | None = None
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 60.0


@dataclass(frozen=True)
class NgsiLdSinkConfig:
    url: str  # broker base URL, e.g. http://orion:1026
    tenant: str | None = None
    token_file: Path | None = None
    timeout_s: float = 10.0
    batch_entities: int = MAX_BATCH
    partial_retries: int = 5


@dataclass(frozen=True)
class MqttSinkConfig:
    host: str
    port: int = 1883
    client_id: str = "lantern-gateway"
    topic: str = "lantern/{node}/{measurement}"
    payload: str = "senml+json"  # or "senml+cbor"
    username: str | None = None
    password_file: Path | None = None
    tls: bool = False
    ca_file: Path | None = None
    timeout_s: float = 10.0


@dataclass(frozen=True)
class ApiConfig:
    """The local API and status page ([api])."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8470
    token_file: Path | None = None
    allowed_hosts: tuple[str, ...] = ()  # Host names served besides the listen address


@dataclass(frozen=True)
class QueueConfig:
    """The queue's disk cap ([queue]): bytes on disk, and what happens when they run out."""

    max_mb: float = 1024.0
    policy: str = "pause_intake"  # or "evict_oldest"

    @property
    def max_bytes(self) -> int:
        return int(self.max_mb * (1 << 20))


@dataclass(frozen=True)
class HistoryConfig:
    """Delivered readings kept for the status page and /api ([history])."""

    keep_hours: float = 24.0
    max_samples: int = 50_000  # one sample: a node's readings at one time (one frame)


@dataclass(frozen=True)
class Config:
    path: Path
    state_dir: Path
    keys_file: Path
    serial: list[SerialLinkConfig] = field(default_factory=list)
    http: HttpSinkConfig | None = None
    batch_max_records: int = 500
    batch_max_age_s: float = 1.0
    log_level: str = "info"
    ngsi_ld: NgsiLdSinkConfig | None = None
    mqtt: MqttSinkConfig | None = None
    nodes: dict[str, NodeMeta] = field(default_factory=dict)
    api: ApiConfig = field(default_factory=ApiConfig)
    history: HistoryConfig = field(default_factory=HistoryConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    ble: tuple[BleLinkConfig, ...] = ()


class _Doc:
    """A parsed TOML file that can say on which line a key stands."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.text = path.read_text()
        except OSError as e:
            raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
        try:
            self.data = tomllib.loads(self.text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None

    def _lines(self) -> dict[str, int]:
        """Dotted path (tables of arrays indexed, like links.serial[1].baud) → its line."""
        where: dict[str, int] = {}
        table = ""
        counts: dict[str, int] = {}
        for i, line in enumerate(self.text.splitlines(), 1):
            m = re.match(r"\s*\[\[\s*([^\]]+?)\s*\]\]", line)
            if m:
                name = m.group(1)
                counts[name] = counts.get(name, -1) + 1
                table = f"{name}[{counts[name]}]"
                where.setdefault(name, i)
                where[table] = i
                continue
            m = re.match(r"\s*\[\s*([^\]]+?)\s*\]", line)
            if m:
                table = m.group(1).replace('"', "")
                where.setdefault(table, i)
                continue
            m = re.match(r'\s*(?:"([^"]*)"|([A-Za-z0-9_-]+))\s*=', line)
            if m:
                key = m.group(1) if m.group(1) is not None else m.group(2)
                where.setdefault(f"{table}.{key}" if table else key, i)
        return where

    def line_of(self, key: str) -> int | None:
        """The key's line, or else the line of the nearest table that holds it."""
        where = self._lines()
        while key:
            if key in where:
                return where[key]
            key = key.rsplit(".", 1)[0] if "." in key else ""
        return None

    def error(self, key: str, msg: str) -> ConfigError:
        line = self.line_of(key)
        where = f"{self.path} line {line}" if line else str(self.path)
        return ConfigError(f"{where}: {key}: {msg}")

    def get(self, table: dict[str, Any], key: str, dotted: str, kind: type | tuple[type, ...],
            default: Any = ..., check: Any = None, fix: str = "") -> Any:
        if key not in table:
            if default is ...:
                raise self.error(dotted, f"missing; {fix}" if fix else "missing")
            return default
        value = table[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            kinds = (kind,) if isinstance(kind, type) else kind
            names = " or ".join(k.__name__ for k in kinds)
            raise self.error(dotted, f"expected {names}, got {value!r}")
        if check is not None:
            problem = check(value)
            if problem:
                raise self.error(dotted, problem)
        return value


def _positive(v: float) -> str | None:
    return None if v > 0 else f"must be > 0, got {v!r}"


def _url(v: str) -> str | None:
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
    doc = _Doc(path)
    d = doc.data
    known = {"gateway", "links", "batch", "sinks", "nodes", "api", "history", "queue"}
    for k in d:
        if k not in known:
            raise doc.error(k, f"unknown section; expected one of {', '.join(sorted(known))}")
    gw = doc.get(d, "gateway", "gateway", dict, {})
    base = path.parent
    state_dir = base / doc.get(gw, "state_dir", "gateway.state_dir", str, "/var/lib/lantern")
    keys_file = base / doc.get(gw, "keys_file", "gateway.keys_file", str,
                               fix="the node key file, e.g. keys_file = \"keys.toml\"")
    log_level = doc.get(gw, "log_level", "gateway.log_level", str, "info",
                        lambda v: None if v in ("debug", "info", "warning", "error")
                        else "expected debug, info, warning or error")
    links = doc.get(d, "links", "links", dict, {})
    serial = []
    for i, s in enumerate(doc.get(links, "serial", "links.serial", list, [])):
        key = f"links.serial[{i}]"
        if not isinstance(s, dict):
            raise doc.error(key, "expected a table ([[links.serial]])")
        serial.append(SerialLinkConfig(
            port=doc.get(s, "port", f"{key}.port", str, fix='the device, e.g. "/dev/ttyUSB0"'),
            baud=doc.get(s, "baud", f"{key}.baud", int, 115200, _positive)))
    batch = doc.get(d, "batch", "batch", dict, {})
    max_records = doc.get(batch, "max_records", "batch.max_records", int, 500,
                          lambda v: None if 1 <= v <= 10000 else "must be 1..10000")
    max_age = float(doc.get(batch, "max_age_s", "batch.max_age_s", (int, float), 1.0, _positive))
    sinks = doc.get(d, "sinks", "sinks", dict, {})
    http = None
    if "http" in sinks:
        h = doc.get(sinks, "http", "sinks.http", dict)
        token = doc.get(h, "token_file", "sinks.http.token_file", str, None)
        http = HttpSinkConfig(
            url=doc.get(h, "url", "sinks.http.url", str, check=_url),
            timeout_s=float(doc.get(h, "timeout_s", "sinks.http.timeout_s", (int, float), 10.0,
                                    _positive)),
            token_file=base / token if token else None,
            backoff_initial_s=float(doc.get(h, "backoff_initial_s", "sinks.http.backoff_initial_s",
                                            (int, float), 0.5, _positive)),
            backoff_max_s=float(doc.get(h, "backoff_max_s", "sinks.http.backoff_max_s",
                                        (int, float), 60.0, _positive)))
        if http.token_file:
            check_secret_file(http.token_file, "sinks.http.token_file")
    ngsi_ld = _ngsi_ld(doc, sinks, base)
    mqtt = _mqtt(doc, sinks, base)
    for k in sinks:
        if k not in ("http", "ngsi_ld", "mqtt"):
            raise doc.error(f"sinks.{k}", "unknown sink; expected http, ngsi_ld or mqtt")
    nodes = _nodes(doc, doc.get(d, "nodes", "nodes", dict, {}))
    api, history = _api(doc, d, base), _history(doc, d)
    ble = _ble(doc, links, base)
    if not serial and not ble:
        raise doc.error("links", "no link configured; add a [[links.serial]] table with a port "
                        "(or [[links.ble]])")
    if http is None and ngsi_ld is None and mqtt is None:
        raise doc.error("sinks", "no sink configured; add [sinks.http] with a url "
                        "(or [sinks.ngsi_ld], [sinks.mqtt])")
    return Config(path, state_dir, keys_file, serial, http, max_records, max_age, log_level,
                  ngsi_ld, mqtt, nodes, api=api, history=history, queue=_queue(doc, d), ble=ble)


_BLE_ADDRESS = re.compile(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}\Z")
_BLE_FLOATS = ("connect_timeout_s", "idle_timeout_s", "max_session_s", "backoff_initial_s",
               "backoff_max_s", "scan_stall_s", "repeat_s")


def _ble(doc: _Doc, links: dict[str, Any], base: Path) -> tuple[BleLinkConfig, ...]:
    """[[links.ble]] tables, each with optional [[links.ble.devices]] (third-party BTHome)."""
    out = []
    ndev = 0  # device tables are numbered across all [[links.ble]] tables, as in the file
    for i, b in enumerate(doc.get(links, "ble", "links.ble", list, [])):
        key = f"links.ble[{i}]"
        if not isinstance(b, dict):
            raise doc.error(key, "expected a table ([[links.ble]])")
        known = {"adapter", "max_connections", "scanning_mode", "require_encrypted_adverts",
                 "devices", *_BLE_FLOATS}
        for k in b:
            if k not in known:
                raise doc.error(f"{key}.{k}", f"unknown key; expected one of "
                                f"{', '.join(sorted(known))}")
        floats = {k: float(doc.get(b, k, f"{key}.{k}", (int, float), getattr(BleLinkConfig, k),
                                   _positive)) for k in _BLE_FLOATS}
        devices = []
        for dv in doc.get(b, "devices", f"{key}.devices", list, []):
            dkey = f"links.ble.devices[{ndev}]"
            ndev += 1
            if not isinstance(dv, dict):
                raise doc.error(dkey, "expected a table ([[links.ble.devices]])")
            addr = doc.get(dv, "address", f"{dkey}.address", str,
                           check=lambda v: None if _BLE_ADDRESS.match(v)
                           else f"expected an address like \"A4:C1:38:00:11:22\", got {v!r}")
            name = doc.get(dv, "name", f"{dkey}.name", str,
                           check=lambda v: None if NODE_ID.match(v)
                           else "1-32 letters, digits, '.', '_' or '-'")
            kf = doc.get(dv, "bindkey_file", f"{dkey}.bindkey_file", str, None)
            bindkey = None
            if kf:
                text = check_secret_file(base / kf, f"{dkey}.bindkey_file")
                try:
                    bindkey = bytes.fromhex(text.strip())
                except ValueError:
                    bindkey = b""
                if len(bindkey) != 16:
                    raise doc.error(f"{dkey}.bindkey_file",
                                    f"{base / kf}: expected 32 hex digits (a BTHome bindkey)")
            devices.append(BleDeviceConfig(addr.upper(), name, bindkey))
        out.append(BleLinkConfig(
            adapter=doc.get(b, "adapter", f"{key}.adapter", str, "hci0"),
            max_connections=doc.get(b, "max_connections", f"{key}.max_connections", int, 3,
                                    lambda v: None if 1 <= v <= 16 else "must be 1..16"),
            scanning_mode=doc.get(b, "scanning_mode", f"{key}.scanning_mode", str, "passive",
                                  lambda v: None if v in ("passive", "active")
                                  else f"expected \"passive\" or \"active\", got {v!r}"),
            require_encrypted_adverts=doc.get(b, "require_encrypted_adverts",
                                              f"{key}.require_encrypted_adverts", bool, True),
            devices=tuple(devices), **floats))
    return tuple(out)


def _queue(doc: _Doc, d: dict[str, Any]) -> QueueConfig:
    q = doc.get(d, "queue", "queue", dict, {})
    for k in q:
        if k not in ("max_mb", "policy"):
            raise doc.error(f"queue.{k}", "unknown key; expected max_mb or policy")
    return QueueConfig(
        max_mb=float(doc.get(q, "max_mb", "queue.max_mb", (int, float), 1024.0,
                             lambda v: None if 1 <= v <= 1 << 20
                             else f"must be 1..1048576 (MiB), got {v}")),
        policy=doc.get(q, "policy", "queue.policy", str, "pause_intake",
                       lambda v: None if v in ("pause_intake", "evict_oldest")
                       else f"expected \"pause_intake\" or \"evict_oldest\", got {v!r}"))


def _api(doc: _Doc, d: dict[str, Any], base: Path) -> ApiConfig:
    a = doc.get(d, "api", "api", dict, {})
    for k in a:
        if k not in ("enabled", "host", "port", "token_file", "allowed_hosts"):
            raise doc.error(f"api.{k}", "unknown key; expected enabled, host, port, token_file "
                            "or allowed_hosts")
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


def _allowed_hosts(doc: _Doc, a: dict[str, Any]) -> tuple[str, ...]:
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


def _history(doc: _Doc, d: dict[str, Any]) -> HistoryConfig:
    h = doc.get(d, "history", "history", dict, {})
    for k in h:
        if k not in ("keep_hours", "max_samples"):
            raise doc.error(f"history.{k}", "unknown key; expected keep_hours or max_samples")
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


def _ngsi_ld(doc: _Doc, sinks: dict[str, Any], base: Path) -> NgsiLdSinkConfig | None:
    if "ngsi_ld" not in sinks:
        return None
    n = doc.get(sinks, "ngsi_ld", "sinks.ngsi_ld", dict)
    token = doc.get(n, "token_file", "sinks.ngsi_ld.token_file", str, None)
    cfg = NgsiLdSinkConfig(
        url=doc.get(n, "url", "sinks.ngsi_ld.url", str, check=_url,
                    fix='the broker base URL, e.g. "http://orion-ld:1026"'),
        tenant=doc.get(n, "tenant", "sinks.ngsi_ld.tenant", str, None),
        token_file=base / token if token else None,
        timeout_s=float(doc.get(n, "timeout_s", "sinks.ngsi_ld.timeout_s", (int, float), 10.0,
                                _positive)),
        batch_entities=doc.get(n, "batch_entities", "sinks.ngsi_ld.batch_entities", int,
                               MAX_BATCH, lambda v: None if 1 <= v <= MAX_BATCH
                               else f"must be 1..{MAX_BATCH}"))
    if cfg.token_file:
        check_secret_file(cfg.token_file, "sinks.ngsi_ld.token_file")
    return cfg


def _mqtt(doc: _Doc, sinks: dict[str, Any], base: Path) -> MqttSinkConfig | None:
    if "mqtt" not in sinks:
        return None
    m = doc.get(sinks, "mqtt", "sinks.mqtt", dict)
    pw = doc.get(m, "password_file", "sinks.mqtt.password_file", str, None)
    ca = doc.get(m, "ca_file", "sinks.mqtt.ca_file", str, None)

    def topic_ok(v: str) -> str | None:
        try:
            v.format(node="n", measurement="m")
        except (KeyError, IndexError, ValueError):
            return "may only use {node} and {measurement}"
        return None

    cfg = MqttSinkConfig(
        host=doc.get(m, "host", "sinks.mqtt.host", str, fix='the broker, e.g. "localhost"'),
        port=doc.get(m, "port", "sinks.mqtt.port", int, 1883,
                     lambda v: None if 0 < v < 65536 else "must be 1..65535"),
        client_id=doc.get(m, "client_id", "sinks.mqtt.client_id", str, "lantern-gateway"),
        topic=doc.get(m, "topic", "sinks.mqtt.topic", str, "lantern/{node}/{measurement}",
                      topic_ok),
        payload=doc.get(m, "payload", "sinks.mqtt.payload", str, "senml+json",
                        lambda v: None if v in ("senml+json", "senml+cbor")
                        else "expected senml+json or senml+cbor"),
        username=doc.get(m, "username", "sinks.mqtt.username", str, None),
        password_file=base / pw if pw else None,
        tls=doc.get(m, "tls", "sinks.mqtt.tls", bool, False),
        ca_file=base / ca if ca else None,
        timeout_s=float(doc.get(m, "timeout_s", "sinks.mqtt.timeout_s", (int, float), 10.0,
                                _positive)))
    if cfg.password_file:
        check_secret_file(cfg.password_file, "sinks.mqtt.password_file")
    return cfg


def _nodes(doc: _Doc, nodes: dict[str, Any]) -> dict[str, NodeMeta]:
    """Where each node stands: [nodes."SL-0042"] pole = "42", location = [lat, lon]."""
    out = {}
    for node, t in nodes.items():
        key = f"nodes.{node}"
        if not isinstance(t, dict):
            raise doc.error(key, 'expected a table: [nodes."SL-0042"]')
        loc = doc.get(t, "location", f"{key}.location", list, None,
                      lambda v: None if len(v) == 2 and all(
                          isinstance(x, int | float) and not isinstance(x, bool) for x in v)
                      and -90 <= v[0] <= 90 and -180 <= v[1] <= 180
                      else "expected [latitude, longitude] in degrees")
        out[node] = NodeMeta(
            pole=str(doc.get(t, "pole", f"{key}.pole", (str, int), "")),
            lat=float(loc[0]) if loc else None, lon=float(loc[1]) if loc else None,
            interval_s=float(doc.get(t, "interval_s", f"{key}.interval_s", (int, float), 60.0,
                                     _positive)))
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
        return path.read_bytes().decode()
    except OSError as e:
        raise ConfigError(f"{path}: {what}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: {what}: not UTF-8 text") from None


def load_keys(path: Path) -> dict[bytes, bytes]:
    """Node keys (kid bytes → 32-byte key) from a 0600 TOML file: [nodes] "SL-0001" = "hex"."""
    check_secret_file(path, "node key file")
    doc = _Doc(path)
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


def write_secret(path: Path, text: str) -> None:
    """Create or replace a secret file with mode 0600 from the start (no window at 0644)."""
    tmp = path.with_name(path.name + ".tmp")
    # a stale temp file would keep its old mode: O_EXCL after removing it guarantees 0600
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
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
