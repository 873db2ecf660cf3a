"""Sinks and links as plug-ins: a registry of each, a module loaded only when configured.

Like a fluent-bit output plug-in's descriptor (its name, its `config_map`, its init), each
sink or link module carries one `PLUGIN`: the keys its table accepts, the parser that turns the
table into its own config dataclass, and the factory that builds the sink or link from it.
`config.py` and `gateway.py` (and so `lantern gateway check-config`) loop over the registries
below; adding a sink is its module plus one line here.

A registry names modules, not objects: like bleak choosing its backend, a plug-in is imported
only when its table is in the config, so a gateway without `[[links.ble]]` never imports bleak,
and one without `[sinks.mqtt]` never imports aiomqtt.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .configfile import Doc
    from .health.service import HealthService
    from .ingest import Ingest
    from .ngsi import NodeMeta
    from .queue.store import Store

# [sinks.<name>] → the module that owns it. The order is the order the gateway opens them in.
SINKS: dict[str, str] = {
    "http": "lantern.agent.sinks.http",
    "ngsi_ld": "lantern.agent.sinks.ngsi_ld",
    "mqtt": "lantern.agent.sinks.mqtt",
    "sensorthings": "lantern.agent.sinks.sensorthings",
    "sensor_community": "lantern.agent.sinks.sensor_community",
}
# [[links.<name>]] → the module that owns it (for BLE, its config half: bleak is loaded by the
# factory, once a link is built).
LINKS: dict[str, str] = {
    "serial": "lantern.agent.links.serial",
    "ble": "lantern.agent.links.ble_config",
}


def _default_backoff(_cfg: Any) -> tuple[float, float]:
    return 0.5, 60.0


@dataclass
class SinkContext:
    """What a sink factory may use besides its own table."""

    nodes: dict[str, NodeMeta]  # [nodes."<id>"]: where each node stands
    state_dir: Path = Path(".")  # the gateway's state folder: a sink's own durable state
    # node → the firmware version it last reported (the rollout manager's, kept up to date)
    firmware: Mapping[str, str] = field(default_factory=dict)
    # the health monitor ([health]; agent/health/service.py), None without one
    health: HealthService | None = None


@dataclass(frozen=True)
class SinkPlugin:
    """One sink kind: its [sinks.<name>] table's keys, its parser and its factory."""

    name: str
    keys: frozenset[str]  # every key its table may hold; any other is refused, with its line
    # (the document, the table, its dotted name, the config file's folder) → its config
    parse: Callable[[Doc, dict[str, Any], str, Path], Any]
    # (its config, the context) → the sink, opened and closed by the gateway
    open: Callable[[Any, SinkContext], AbstractAsyncContextManager[Any]]
    where: Callable[[Any], str]  # where it delivers, as check-config shows it
    # (first, longest) retry wait of its forwarder
    backoff: Callable[[Any], tuple[float, float]] = _default_backoff


@dataclass
class LinkContext:
    """What a link factory may use: the gateway's ingest, keys, queue and state folder."""

    ingest: Ingest
    keys: dict[bytes, bytes]
    store: Store
    state_dir: Path
    # stand-ins for a link's radio, by link kind (tests: a virtual BLE controller)
    backends: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LinkPlugin:
    """One link kind: its [[links.<name>]] tables' keys, its parser and its factory."""

    name: str
    keys: frozenset[str]
    # (the document, every [[links.<name>]] table, the config file's folder) → their configs
    parse: Callable[[Doc, list[dict[str, Any]], Path], tuple[Any, ...]]
    make: Callable[[Any, LinkContext], Any]  # (its config, the context) → a link with .run()
    where: Callable[[Any], str]  # the link's name, as check-config shows it


def sink(name: str) -> SinkPlugin:
    plugin = importlib.import_module(SINKS[name]).PLUGIN
    assert isinstance(plugin, SinkPlugin) and plugin.name == name, SINKS[name]
    return plugin


def link(name: str) -> LinkPlugin:
    plugin = importlib.import_module(LINKS[name]).PLUGIN
    assert isinstance(plugin, LinkPlugin) and plugin.name == name, LINKS[name]
    return plugin
