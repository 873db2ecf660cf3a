"""The BLE link's plug-in half without bleak: its config ([[links.ble]]), parser and factory.

The factory imports the link itself (agent/links/ble.py, and with it bleak) only when a
[[links.ble]] table is there to build: like bleak choosing its backend inside the selection.
docs/ble.md explains each setting.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import NODE_ID, check_secret_file
from ..configfile import Doc, positive
from ..plugins import LinkContext, LinkPlugin


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
    max_command_session_s: float = 600.0  # a session kept for the gateway's commands, at most
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 120.0
    scan_stall_s: float = 60.0
    require_encrypted_adverts: bool = True
    repeat_s: float = 60.0
    devices: tuple[BleDeviceConfig, ...] = ()


_BLE_ADDRESS = re.compile(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}\Z")
_BLE_FLOATS = ("connect_timeout_s", "idle_timeout_s", "max_session_s", "max_command_session_s",
               "backoff_initial_s", "backoff_max_s", "scan_stall_s", "repeat_s")
KEYS = frozenset({"adapter", "max_connections", "scanning_mode", "require_encrypted_adverts",
                  "devices", *_BLE_FLOATS})
DEVICE_KEYS = ("address", "name", "bindkey_file")


def parse(doc: Doc, tables: list[dict[str, Any]], base: Path) -> tuple[BleLinkConfig, ...]:
    """[[links.ble]] tables, each with optional [[links.ble.devices]] (third-party BTHome)."""
    out = []
    ndev = 0  # device tables are numbered across all [[links.ble]] tables, as in the file
    for i, b in enumerate(tables):
        key = f"links.ble[{i}]"
        floats = {k: float(doc.get(b, k, f"{key}.{k}", (int, float), getattr(BleLinkConfig, k),
                                   positive)) for k in _BLE_FLOATS}
        devices = []
        for dv in doc.get(b, "devices", f"{key}.devices", list, []):
            dkey = f"links.ble.devices[{ndev}]"
            ndev += 1
            if not isinstance(dv, dict):
                raise doc.error(dkey, "expected a table ([[links.ble.devices]])")
            doc.only(dv, dkey, DEVICE_KEYS)
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


def make(cfg: BleLinkConfig, ctx: LinkContext) -> Any:  # a BleLink
    from .ble import BleLink  # bleak: loaded only for a gateway that has a BLE link

    return BleLink(cfg, ctx.ingest, ctx.keys, ctx.store, ctx.state_dir, ctx.backends.get("ble"))


PLUGIN = LinkPlugin("ble", KEYS, parse, make, where=lambda c: f"ble:{c.adapter}")
