"""Third-party BTHome sensors accepted as readings by configuration, with replay protection."""

from __future__ import annotations

import asyncio
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESCCM

from lantern.agent.config import write_secret

from .harness import World, until

pytestmark = pytest.mark.ble_virtual

PARK = "F0:00:00:00:03:01"  # encrypted, bindkey configured
KIOSK = "F0:00:00:00:03:02"  # plain
STRANGER = "F0:00:00:00:03:03"  # not configured
KEY = bytes.fromhex("231d39c1d7cc1ab1aee224cd096db932")


def encrypted(address: str, counter: int, temp_c: float, hum: float, key: bytes = KEY) -> bytes:
    """A BTHome v2 encrypted advert made the way the spec describes, with `cryptography`."""
    objects = b"\x02" + struct.pack("<h", round(temp_c * 100)) + b"\x03" + struct.pack(
        "<H", round(hum * 100))
    ctr = struct.pack("<I", counter)
    nonce = bytes.fromhex(address.replace(":", "")) + b"\xd2\xfc\x41" + ctr
    sealed = AESCCM(key, tag_length=4).encrypt(nonce, objects, None)
    return ad(b"\x41" + sealed[:-4] + ctr + sealed[-4:])


def plain(packet_id: int, temp_c: float) -> bytes:
    return ad(b"\x40\x00" + bytes((packet_id,)) + b"\x02" + struct.pack("<h", round(temp_c * 100)))


def ad(service_data: bytes) -> bytes:
    return b"\x02\x01\x06" + bytes((len(service_data) + 3, 0x16, 0xD2, 0xFC)) + service_data


class Sensor:
    def __init__(self, world: World, address: str) -> None:
        from bluetooth import Chip

        self.chip = Chip(world.link, address)

    async def send(self, advert: bytes, times: int = 5) -> None:
        """Advertise one payload for a while (radios repeat each advert many times)."""
        dev = self.chip.device
        await dev.start_advertising(advertising_data=advert, advertising_interval_min=20,
                                    advertising_interval_max=20)
        await asyncio.sleep(0.02 * times)
        await dev.stop_advertising()


def values(world: World, name: str) -> list[float]:
    return sorted(r["v"] for r in world.upstream.readings.values() if r["n"] == name)


async def test_third_party_sensors_become_readings(world: World) -> None:
    write_secret(world.workdir / "park.key", KEY.hex())
    world.ble_extra = (f'[[links.ble.devices]]\naddress = "{PARK}"\nname = "park-1"\n'
                       'bindkey_file = "park.key"\n\n'
                       f'[[links.ble.devices]]\naddress = "{KIOSK}"\nname = "kiosk"\n')
    await world.upstream.start()
    await world.start_gateway()
    ble = world.ble
    park, kiosk, stranger = Sensor(world, PARK), Sensor(world, KIOSK), Sensor(world, STRANGER)
    for s in (park, kiosk, stranger):
        await s.chip.power_on()

    temp, hum = "urn:dev:bthome:park-1:temperature", "urn:dev:bthome:park-1:humidity"
    await park.send(encrypted(PARK, 10, 18.25, 55.5))
    await until(lambda: values(world, temp) == [18.25], 20, "the park sensor's first advert")
    assert values(world, hum) == [55.5]
    rec = next(r for r in world.upstream.readings.values() if r["n"] == temp)
    assert rec["u"] == "Cel" and rec["id"] == "bthome:park-1:10:0"
    await park.send(encrypted(PARK, 11, 18.5, 56.0))
    await until(lambda: values(world, temp) == [18.25, 18.5], 20, "the next counter")

    await park.send(encrypted(PARK, 10, 30.0, 10.0))  # an old counter played back
    await park.send(encrypted(PARK, 12, 30.0, 10.0, key=bytes(16)))  # forged: wrong key
    await park.send(plain(7, 30.0))  # a downgrade to plaintext
    await until(lambda: all(ble.stats[k] for k in (
        "rejected_advert_replay", "rejected_bthome_mic", "rejected_advert_plain")), 20,
        "replay, forgery and downgrade to be refused")

    await kiosk.send(plain(1, 21.0), times=10)
    await kiosk.send(plain(2, 21.5))
    await stranger.send(plain(1, 99.0))
    kiosk_t = "urn:dev:bthome:kiosk:temperature"
    await until(lambda: values(world, kiosk_t) == [21.0, 21.5], 20, "the plain sensor")
    assert ble.stats["advert_duplicates"] > 0 and ble.stats["adverts_foreign"] > 0

    await world.stop_gateway()  # the replay window is in the queue database
    await world.start_gateway()
    ble2 = world.ble
    # 9 was never on air, but it is below the highest counter accepted before the restart
    await park.send(encrypted(PARK, 9, 40.0, 10.0))
    await until(lambda: ble2.stats["rejected_advert_replay"] > 0, 20, "a replay after restart")
    await park.send(encrypted(PARK, 13, 19.0, 57.0))
    await until(lambda: values(world, temp) == [18.25, 18.5, 19.0], 20, "a fresh advert")
    assert not any(v in (30.0, 40.0, 99.0) for r in world.upstream.readings.values()
                   for v in [r.get("v")])
    assert world.upstream.duplicates == 0
