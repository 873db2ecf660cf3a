"""BTHome adverts on the virtual radio, read by Home Assistant's parser; replays refused."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from bleak import BleakScanner
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData
from bthome_ble import BTHomeBluetoothDeviceData
from habluetooth import BluetoothServiceInfoBleak

from lantern.agent import bthome as gw_bthome
from lantern.agent import protocol

from .bleak_bumble import Adapter
from .harness import BleNode, World, ble_metrics, check_exported, until

pytestmark = pytest.mark.ble_virtual

BTHOME = gw_bthome.UUID
# canonical name → (bthome-ble entity key prefix, factor from its unit to ours, our resolution)
HA_NAMES = {"temperature": ("temperature", 1, 0.01), "humidity": ("humidity", 1, 0.01),
            "pressure": ("pressure", 100, 1), "illuminance": ("illuminance", 1, 0.01),
            "lamp_power": ("power", 1, 0.01), "battery": ("voltage", 1, 0.001),
            "pm2_5": ("pm25", 1, 1), "pm10": ("pm10", 1, 1), "co2": ("carbon_dioxide", 1, 1),
            "lamp_current": ("current", 1, 0.001), "lamp_voltage": ("voltage", 1, 0.1)}


class Listener:
    """A receiver that is not the gateway (a Home Assistant host): records every advert."""

    def __init__(self, world: World) -> None:
        self.adapter = Adapter(world.link, "F0:00:00:00:00:AA")
        self.adverts: list[tuple[str, AdvertisementData]] = []
        scanner_cls, _ = self.adapter.backend()
        self.scanner = BleakScanner(self._on, scanning_mode="passive", backend=scanner_cls)

    def _on(self, device: BLEDevice, adv: AdvertisementData) -> None:
        self.adverts.append((device.address, adv))

    def bthome(self, address: str) -> list[bytes]:
        return [a.service_data[BTHOME] for addr, a in self.adverts
                if addr == address and BTHOME in a.service_data]

    def raw(self, address: str) -> list[bytes]:
        """The advertising data as sent (to replay it byte for byte)."""
        out = []
        for addr, a in self.adverts:
            if addr == address:
                out.append(a.platform_data[0].data_bytes)
        return out


def ha_decode(address: str, data: bytes, bindkey: bytes | None) -> tuple[dict[str, Any], bool]:
    """Home Assistant's reading of one advert: (entity key → value, bindkey verified)."""
    dev = BTHomeBluetoothDeviceData(bindkey)
    info = BluetoothServiceInfoBleak(
        name="node", address=address, rssi=-50, manufacturer_data={},
        service_data={BTHOME: data}, service_uuids=[], source="local",
        device=BLEDevice(address, "node", None), advertisement=None, connectable=True,
        time=time.monotonic(), tx_power=None)
    update = dev.update(info)
    values = {k.key: v.native_value for k, v in update.entity_values.items()
              if k.key not in ("signal_strength", "packet_id")}
    return values, dev.bindkey_verified


def sampled(node: BleNode) -> dict[str, float]:
    """What the node measured: the values of its newest sealed pack."""
    seq = node.outbox.seqs()[-1]
    records = protocol.resolve_pack(protocol.parse_mac0(node.outbox.get(seq)).payload,
                                     node=node.node_id)
    prefix = f"urn:dev:lantern:{node.node_id}:"
    return {r["n"][len(prefix):]: r["v"] for r in records if "v" in r}


def check_same(values: dict[str, float], decoded: list[dict[str, Any]]) -> list[str]:
    """Every value the node sampled that BTHome carries is in some advert, within resolution."""
    checked = []
    for name, (key, factor, res) in HA_NAMES.items():
        if name not in values:
            continue
        want = values[name]
        seen = [v * factor for d in decoded for k, v in d.items()
                if k == key or k.startswith(key + "_")]
        assert any(abs(v - want) <= res / 2 + 1e-9 for v in seen), (name, want, seen)
        checked.append(name)
    return checked


async def sample_once(world: World, mode: str) -> tuple[BleNode, Listener]:
    listener = Listener(world)
    await listener.scanner.start()
    (node,) = world.add_nodes(1, sample_limit=1, street=True,
                              link_cfg={"bthome": mode, "adv_interval_ms": 20, "rotate_ms": 60})
    await node.start(world.link)
    await until(lambda: len(node.outbox) == 1, 60, "the node's first pack")
    return node, listener


@pytest.mark.parametrize("mode", ["plain", "encrypted"])
async def test_home_assistant_reads_the_values_the_node_sampled(world: World, mode: str) -> None:
    node, listener = await sample_once(world, mode)
    values = sampled(node)
    # all pages of the rotation, several times over
    await until(lambda: len(listener.bthome(node.address)) >= 12, 30, "a dozen BTHome adverts")
    await listener.scanner.stop()
    adverts = listener.bthome(node.address)
    key = gw_bthome.derive_bindkey(node.key) if mode == "encrypted" else None
    decoded = []
    for data in adverts:
        got, verified = ha_decode(node.address, data, key)
        assert got, f"bthome-ble read nothing from {data.hex()}"
        assert verified == (mode == "encrypted")
        decoded.append(got)
    checked = check_same(values, decoded)
    # the simulated street's chips: climate, lamp and battery values from the first sample
    # (gas and particle sensors are still warming up then, and send flags, not values)
    assert {"temperature", "humidity", "pressure", "lamp_power", "lamp_voltage", "lamp_current",
            "battery"} <= set(checked), checked
    if mode == "encrypted":
        for data in adverts:
            got, verified = ha_decode(node.address, data, bytes(16))
            assert got == {} and not verified  # the wrong bindkey reads nothing
            got, _ = ha_decode(node.address, data, None)
            assert got == {}  # no bindkey: nothing either
    else:
        # plain adverts carry the packet id, and the page rotates with it
        assert len({d[2] for d in adverts}) > 1


async def test_replayed_adverts_are_rejected_across_gateway_restarts(world: World) -> None:
    world.api = True
    node, listener = await sample_once(world, "encrypted")
    await world.start_gateway()
    ble = world.ble
    await until(lambda: ble.stats["adverts_accepted"] >= 5, 30, "the gateway to accept adverts")
    high = ble.counters.high[node.node_id]
    recorded = listener.raw(node.address)
    assert recorded
    await node.stop()  # the node is taken down; its recorded adverts are played back

    async def replay() -> Any:
        from bluetooth import Chip

        chip = Chip(world.link, node.address)  # same address: a spoofer
        await chip.power_on()
        for ad in recorded * 3:
            await chip.device.start_advertising(advertising_data=ad,
                                                advertising_interval_min=20,
                                                advertising_interval_max=20)
            await asyncio.sleep(0.03)
        await chip.device.stop_advertising()
        chip.power_cut()

    await replay()
    await until(lambda: ble.stats["rejected_advert_replay"] >= 3, 20, "replays to be counted")
    assert ble.counters.high[node.node_id] >= high  # never moved back
    accepted = ble.stats["adverts_accepted"]
    before = dict(ble.stats)
    scraped = ble_metrics(await world.scrape(), ble.name)  # on /metrics too
    check_exported(before, scraped, dict(ble.stats))
    assert scraped["rejected_advert_replay"] >= 3 and scraped["adverts_accepted"] >= 5

    await world.stop_gateway()  # the counters survive a gateway restart
    await world.start_gateway()
    ble2 = world.ble
    assert ble2 is not ble and ble2.counters.high[node.node_id] >= high
    await replay()
    await until(lambda: ble2.stats["rejected_advert_replay"] >= 3, 20,
                "replays to be counted after the restart")
    assert ble2.stats["adverts_accepted"] == 0 and accepted > 0

    # the real node reboots (its counter comes back from flash): accepted, nothing refused
    rejected = ble2.stats["rejected_advert_replay"]
    node.sample_limit = 0
    await node.start(world.link)
    await until(lambda: ble2.stats["adverts_accepted"] >= 5, 30, "the rebooted node's adverts")
    assert ble2.stats["rejected_advert_replay"] == rejected
