"""Gateway configuration: TOML, validated at start, errors that name file, line, key and fix."""

from __future__ import annotations

import os
import re
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .errors import ConfigError

NODE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$")


@dataclass(frozen=True)
class SerialLinkConfig:
    port: str
    baud: int = 115200


@dataclass(frozen=True)
class HttpSinkConfig:
    url: str
    timeout_s: float = 10.0
    token_file: Path | None = None
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 60.0


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
    if u.scheme in ("http", "https") and u.netloc:
        return None
    return f"expected an http(s) URL, got {v!r}"


def load_config(path: Path | str) -> Config:
    path = Path(path)
    doc = _Doc(path)
    d = doc.data
    known = {"gateway", "links", "batch", "sinks"}
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
            token_file=base / token if token else None)
        if http.token_file:
            check_secret_file(http.token_file, "sinks.http.token_file")
    if not serial:
        raise doc.error("links", "no link configured; add a [[links.serial]] table with a port")
    if http is None:
        raise doc.error("sinks", "no sink configured; add [sinks.http] with a url")
    return Config(path, state_dir, keys_file, serial, http, max_records, max_age, log_level)


def check_secret_file(path: Path, what: str) -> None:
    """Refuse a secret that other users can read, saying how to fix it."""
    try:
        st = path.stat()
    except OSError as e:
        raise ConfigError(f"{path}: {what}: cannot read: {e.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"{path}: {what}: mode {stat.S_IMODE(st.st_mode):04o} lets other users read a "
            f"secret; run: chmod 600 {path}")


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
    os.replace(tmp, path)
