"""BTHome v2: the firmware's encoder against Home Assistant's parser, AES-CCM against a library,
the gateway's decoder against both, and the encoder on the MicroPython VM byte for byte."""

from __future__ import annotations

import math
import random
import struct
import subprocess
import time
from pathlib import Path

import pytest
from bleak.backends.device import BLEDevice
from bthome_ble import BTHomeBluetoothDeviceData
from cryptography.hazmat.primitives.ciphers.aead import AESCCM
from habluetooth import BluetoothServiceInfoBleak
from hypothesis import given, settings
from hypothesis import strategies as st

from lantern.agent import bthome as gw
from lantern.agent.errors import FrameError
from lantern.agent.links import ble_session
from tests.ble import mpcompat

mpcompat.install()

from node import bthome, link_ble  # noqa: E402 - firmware, importable after install()

ROOT = Path(__file__).resolve().parents[2]
MICROPYTHON = ROOT / ".build/micropython/unix/micropython"
MAC = bytes.fromhex("F0000000010A")
ADDRESS = "F0:00:00:00:01:0A"
KEY = bytes(range(16))

# name → (object id, size, signed, mult) as the firmware table says
TABLE = {name: (oid, size, signed, mult) for name, oid, size, signed, mult in bthome.OBJECTS}
HA_KEY = {"temperature": "temperature", "humidity": "humidity", "pressure": "pressure",
          "illuminance": "illuminance", "lamp_power": "power", "battery": "voltage",
          "pm2_5": "pm25", "pm10": "pm10", "co2": "carbon_dioxide", "lamp_current": "current",
          "lamp_voltage": "voltage"}


def limits(name: str) -> tuple[float, float]:
    _, size, signed, mult = TABLE[name]
    bits = 8 * size
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    return lo / mult, hi / mult


readings_st = st.fixed_dictionaries({}, optional={
    name: st.floats(*limits(name), allow_nan=False).map(lambda v: round(v, 6))
    for name in TABLE})


def ha(service_data: bytes, bindkey: bytes | None = None) -> dict[str, list[float]]:
    dev = BTHomeBluetoothDeviceData(bindkey)
    info = BluetoothServiceInfoBleak(
        name="n", address=ADDRESS, rssi=-60, manufacturer_data={},
        service_data={gw.UUID: service_data}, service_uuids=[], source="t",
        device=BLEDevice(ADDRESS, "n", None), advertisement=None, connectable=True,
        time=time.monotonic(), tx_power=None)
    out: dict[str, list[float]] = {}
    for k, v in dev.update(info).entity_values.items():
        if k.key in ("signal_strength", "packet_id"):
            continue
        out.setdefault(k.key.rsplit("_", 1)[0] if k.key[-1].isdigit() else k.key, []).append(
            v.native_value)
    return out


def all_pages(readings: dict[str, float], bindkey: bytes | None = None) -> list[bytes]:
    per_page = 23 - 2 if bindkey is None else 23 - 8
    n = len(bthome.pages(bthome.objects(readings), per_page))
    return [bthome.encode(readings, pid, bindkey, MAC, 1000 + pid) for pid in range(n)]


def within(name: str, got: float, want: float) -> bool:
    factor = 100 if name == "pressure" else 1  # HA reports hPa; we send Pa
    return abs(got * factor - want) <= 0.5 / TABLE[name][3] + 1e-9 * max(1.0, abs(want))


@settings(max_examples=60, deadline=None)
@given(readings_st, st.booleans())
def test_home_assistant_decodes_every_reading(readings: dict[str, float], encrypt: bool) -> None:
    key = KEY if encrypt else None
    seen: dict[str, list[float]] = {}
    for sd in all_pages(readings, key):
        assert len(bthome.advert(sd)) <= bthome.MAX_ADV
        for k, v in ha(sd, key).items():
            seen.setdefault(k, []).extend(v)
    for name, want in readings.items():
        assert any(within(name, v, want) for v in seen.get(HA_KEY[name], [])), (name, want, seen)


@settings(max_examples=60, deadline=None)
@given(readings_st, st.booleans())
def test_gateway_decoder_reads_what_the_node_encodes(readings: dict[str, float],
                                                     encrypt: bool) -> None:
    key = KEY if encrypt else None
    got: dict[str, float] = {}
    for pid, sd in enumerate(all_pages(readings, key)):
        adv = gw.decode(sd, MAC, key)
        assert adv.encrypted == encrypt
        assert adv.packet_id == (None if encrypt else pid)
        assert adv.counter == (1000 + pid if encrypt else None)
        ids = [r.object_id for r in adv.readings]
        assert ids == sorted(ids)  # ascending object ids, as the spec asks
        got.update({gw.LANTERN_NAMES[r.object_id]: float(r.value) for r in adv.readings})
    assert set(got) == set(readings)
    for name, want in readings.items():
        assert abs(got[name] - want) <= 0.5 / TABLE[name][3] + 1e-6, name


def test_encrypted_advert_fails_without_the_right_key() -> None:
    sd = bthome.encode({"temperature": 21.37, "humidity": 48.25}, 0, KEY, MAC, 7)
    assert ha(sd, KEY)["temperature"] == [21.37]
    assert ha(sd, bytes(16)) == {}
    assert ha(sd, None) == {}
    with pytest.raises(FrameError) as e:
        gw.decode(sd, MAC, bytes(16))
    assert e.value.kind == "bthome_mic"
    with pytest.raises(FrameError) as e:
        gw.decode(sd, MAC, None)
    assert e.value.kind == "bthome_key"
    with pytest.raises(FrameError):  # the nonce binds the advert to the sender's address
        gw.decode(sd, bytes(6), KEY)


def test_bthome_spec_encryption_example() -> None:
    # bthome.io's encryption example: MAC 5448E68F80A5, bindkey 231d39c1d7cc1ab1aee224cd096db932,
    # counter 0x00112233, objects 02CA09 03BF13 (temperature 25.06 °C, humidity 50.55 %)
    key = bytes.fromhex("231d39c1d7cc1ab1aee224cd096db932")
    mac = bytes.fromhex("5448E68F80A5")
    sd = bthome.encode({"temperature": 25.06, "humidity": 50.55}, 0, key, mac, 0x00112233)
    nonce = mac + b"\xd2\xfc\x41" + bytes.fromhex("33221100")
    ref = AESCCM(key, tag_length=4).encrypt(nonce, bytes.fromhex("02CA0903BF13"), None)
    assert sd == b"\x41" + ref[:-4] + bytes.fromhex("33221100") + ref[-4:]


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=16, max_size=16), st.binary(min_size=13, max_size=13),
       st.binary(max_size=64))
def test_ccm_on_ecb_matches_a_library(key: bytes, nonce: bytes, msg: bytes) -> None:
    ciphertext, tag = bthome.ccm_encrypt(key, nonce, msg, 4)
    assert ciphertext + tag == AESCCM(key, tag_length=4).encrypt(nonce, msg, None)


def test_values_that_do_not_fit_are_left_out() -> None:
    r = {"temperature": float("nan"), "humidity": -1.0, "co2": 70000, "pm10": None,
         "pressure": True, "lamp_voltage": 230.04, "illuminance": float("inf")}
    objs = bthome.objects(r)
    assert [oid for oid, _ in objs] == [0x4A]
    assert objs[0][1] == b"\x4a" + struct.pack("<H", 2300)
    assert bthome.encode({}, 3) == b"\x40\x00\x03"


def test_rounding_is_half_away_from_zero() -> None:
    assert bthome.objects({"temperature": -0.005})[0][1] == b"\x02" + struct.pack("<h", -1)
    assert bthome.objects({"temperature": 0.005})[0][1] == b"\x02" + struct.pack("<h", 1)
    assert bthome.objects({"temperature": -327.68})[0][1] == b"\x02" + struct.pack("<h", -32768)
    assert bthome.objects({"temperature": 327.68}) == []


def test_encrypted_advert_needs_mac_and_counter() -> None:
    with pytest.raises(bthome.BTHomeError):
        bthome.encode({"co2": 400}, 0, KEY, None, 1)
    with pytest.raises(bthome.BTHomeError):
        bthome.encode({"co2": 400}, 0, KEY, MAC, None)
    with pytest.raises(bthome.BTHomeError):
        bthome.encode({"co2": 400}, 0, KEY, MAC, 1 << 32)
    with pytest.raises(bthome.BTHomeError):
        bthome.encode({"co2": 400}, 0, bytes(8), MAC, 1)


def test_both_sides_derive_the_same_bindkey() -> None:
    node_key = bytes(range(32))
    assert bthome.derive_bindkey(node_key) == gw.derive_bindkey(node_key)
    assert len(gw.derive_bindkey(node_key)) == 16 and gw.derive_bindkey(bytes(32)) != \
        gw.derive_bindkey(node_key)


def test_firmware_and_gateway_tables_agree() -> None:
    for name, (oid, size, signed, mult) in TABLE.items():
        obj = gw.OBJECTS[oid]
        assert gw.LANTERN_NAMES[oid] == name
        assert (obj.size, obj.signed) == (size, signed)
        # the gateway reports SenML units: pressure in Pa, i.e. the raw 0.01 hPa steps
        assert math.isclose(obj.factor, 1.0 if name == "pressure" else 1 / mult)
    assert set(gw.LANTERN_NAMES) == {oid for oid, *_ in TABLE.values()}


def test_gateway_decoder_survives_garbage() -> None:
    rng = random.Random(5)  # seeded: a failure reproduces
    for _ in range(5000):
        data = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 30)))
        if data and rng.random() < 0.7:
            data = bytes((rng.choice((0x40, 0x41, 0x42, 0x43)),)) + data[1:]
        try:
            gw.decode(data, MAC, KEY if rng.random() < 0.5 else None)
        except FrameError as e:
            assert e.kind in ("bthome", "bthome_key", "bthome_mic")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=1024), st.integers(min_value=20, max_value=514))
def test_segments_round_trip_both_ways(msg: bytes, size: int) -> None:
    segs = ble_session.segments(msg, size)
    assert all(len(s) <= size for s in segs)
    fw, agent = link_ble.Reassembler(), ble_session.Reassembler()
    out_fw = [m for m in (fw.feed(s) for s in segs) if m is not None]
    out_agent = [m for m in (agent.feed(s) for s in segs) if m is not None]
    assert out_fw == out_agent == [msg]


def test_reassembler_drops_a_broken_message_and_recovers() -> None:
    msg = bytes(range(100))
    segs = ble_session.segments(msg, 21)
    r = ble_session.Reassembler()
    assert r.feed(segs[0]) is None
    with pytest.raises(FrameError):
        r.feed(segs[2])  # segment 1 lost
    assert [m for m in (r.feed(s) for s in segs) if m is not None] == [msg]
    with pytest.raises(FrameError):
        ble_session.Reassembler(limit=50).feed(b"\x80" + bytes(60))


MP_SCRIPT = '''
from node import bthome, link_ble
R = [{"temperature": 21.37, "humidity": 48.25, "pressure": 101325, "illuminance": 12.5,
      "lamp_power": 35.2, "battery": 3.71, "pm2_5": 12, "pm10": 20, "co2": 415,
      "lamp_current": 0.153, "lamp_voltage": 230.4},
     {"temperature": -12.345, "humidity": 99.99, "co2": 5000, "lamp_voltage": 0},
     {}]
KEY = bytes(range(16))
MAC = bytes([0xF0, 0, 0, 0, 1, 0x0A])
for r in R:
    for pid in range(4):
        print(bthome.encode(r, pid).hex())
        print(bthome.encode(r, pid, KEY, MAC, 4000000000 + pid).hex())
print(bthome.derive_bindkey(bytes(range(32))).hex())
print(link_ble.lantern_advert(link_ble.node_tag("SL-0042"), 1234).hex())
r = link_ble.Reassembler()
print([m for m in (r.feed(s) for s in (b"\\x80ab", b"\\x81cd", b"\\x02ef")) if m])
'''


@pytest.mark.micropython
def test_encoder_on_micropython_is_byte_equal(tmp_path: Path) -> None:
    assert MICROPYTHON.exists(), f"{MICROPYTHON} missing: run `make micropython`"
    script = tmp_path / "bthome_check.py"
    script.write_text(MP_SCRIPT)
    env = {"MICROPYPATH": f"{ROOT / 'firmware'}:{ROOT / '.build/micropython/extmod'}"}
    mp = subprocess.run([str(MICROPYTHON), "-X", "heapsize=110K", str(script)], env=env,
                        capture_output=True, text=True, timeout=60, check=True).stdout
    ns: dict[str, object] = {}
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(MP_SCRIPT, "bthome_check", "exec"), ns)  # the very script MicroPython ran
    assert mp == buf.getvalue()
    lines = mp.splitlines()
    assert len(lines) == 3 * 8 + 3
    # the Lantern advert: flags, 128-bit service data, version, backlog 1234, node tag
    lantern = bytes.fromhex(lines[-2])
    assert len(lantern) <= 31 and lantern[5:21][::-1].hex() == ble_session.SERVICE_UUID.replace(
        "-", "") and lantern[21:24] == b"\x01\xd2\x04"
