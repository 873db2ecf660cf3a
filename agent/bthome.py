"""BTHome v2 service data → readings: a table-driven parser over bytes (bthome.io, format v2).

Used for the adverts of Lantern nodes (values on air, encrypted-advert replay check) and, by
configuration, of third-party BTHome sensors whose values become readings. Encrypted adverts
are AES-CCM with a 4-byte MIC; the nonce is MAC | FCD2 | device-info | counter.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESCCM

from .errors import FrameError

UUID = "0000fcd2-0000-1000-8000-00805f9b34fb"
_UUID16_LE = b"\xd2\xfc"
_VAR = -1  # length-prefixed object (text, raw)
_CMD = -2  # command object: length in the low 5 bits of its first byte


@dataclass(frozen=True)
class Obj:
    size: int
    name: str | None = None  # None: parsed for its length only, not a reading
    unit: str | None = None
    factor: float = 1.0
    signed: bool = False
    binary: bool = False


def _o(size: int, name: str | None = None, unit: str | None = None, factor: float = 1.0,
       signed: bool = False) -> Obj:
    return Obj(size, name, unit, factor, signed)


_BINARY = {0x0F: "generic", 0x10: "power_on", 0x11: "opening", 0x15: "battery_low",
           0x16: "battery_charging", 0x17: "co_detected", 0x18: "cold", 0x19: "connectivity",
           0x1A: "door", 0x1B: "garage_door", 0x1C: "gas_detected", 0x1D: "heat", 0x1E: "light",
           0x1F: "lock", 0x20: "moisture_detected", 0x21: "motion", 0x22: "moving",
           0x23: "occupancy", 0x24: "plug", 0x25: "presence", 0x26: "problem", 0x27: "running",
           0x28: "safety", 0x29: "smoke", 0x2A: "sound", 0x2B: "tamper", 0x2C: "vibration",
           0x2D: "window"}

# object id → how to read it; values come out in SenML units (pressure: 0.01 hPa = 1 Pa)
OBJECTS: dict[int, Obj] = {
    0x00: _o(1), 0x01: _o(1, "battery_level", "%"),
    0x02: _o(2, "temperature", "Cel", 0.01, True), 0x03: _o(2, "humidity", "%RH", 0.01),
    0x04: _o(3, "pressure", "Pa"), 0x05: _o(3, "illuminance", "lx", 0.01),
    0x06: _o(2, "mass", "kg", 0.01), 0x07: _o(2), 0x08: _o(2, "dew_point", "Cel", 0.01, True),
    0x09: _o(1, "count"), 0x0A: _o(3, "energy", "kWh", 0.001), 0x0B: _o(3, "power", "W", 0.01),
    0x0C: _o(2, "voltage", "V", 0.001), 0x0D: _o(2, "pm2_5", "ug/m3"),
    0x0E: _o(2, "pm10", "ug/m3"), 0x12: _o(2, "co2", "ppm"), 0x13: _o(2, "tvoc", "ug/m3"),
    0x14: _o(2, "moisture", "%", 0.01), 0x2E: _o(1, "humidity", "%RH"),
    0x2F: _o(1, "moisture", "%"), 0x3A: _o(1), 0x3B: _o(_CMD), 0x3C: _o(2),
    0x3D: _o(2, "count"), 0x3E: _o(4, "count"), 0x3F: _o(2, "rotation", "deg", 0.1, True),
    0x40: _o(2, "distance", "m", 0.001), 0x41: _o(2, "distance", "m", 0.1),
    0x42: _o(3, "duration", "s", 0.001), 0x43: _o(2, "current", "A", 0.001),
    0x44: _o(2, "speed", "m/s", 0.01), 0x45: _o(2, "temperature", "Cel", 0.1, True),
    0x46: _o(1, "uv_index", None, 0.1), 0x47: _o(2, "volume", "l", 0.1),
    0x48: _o(2, "volume", "l", 0.001), 0x49: _o(2, "flow", "m3/h", 0.001),
    0x4A: _o(2, "voltage", "V", 0.1), 0x4B: _o(3, "gas", "m3", 0.001),
    0x4C: _o(4, "gas", "m3", 0.001), 0x4D: _o(4, "energy", "kWh", 0.001),
    0x4E: _o(4, "volume", "l", 0.001), 0x4F: _o(4, "water", "l", 0.001), 0x50: _o(4),
    0x51: _o(2, "acceleration", "m/s2", 0.001), 0x52: _o(2), 0x53: _o(_VAR), 0x54: _o(_VAR),
    0x55: _o(4, "volume_storage", "l", 0.001), 0x56: _o(2, "conductivity"),
    0x57: _o(1, "temperature", "Cel", 1.0, True), 0x58: _o(1, "temperature", "Cel", 0.35, True),
    0x59: _o(1, "count", None, 1.0, True), 0x5A: _o(2, "count", None, 1.0, True),
    0x5B: _o(4, "count", None, 1.0, True), 0x5C: _o(4, "power", "W", 0.01, True),
    0x5D: _o(2, "current", "A", 0.001, True), 0x5E: _o(2, "direction", "deg", 0.01),
    0x5F: _o(2, "precipitation", "mm", 0.1), 0x60: _o(1), 0x61: _o(2, "rotational_speed"),
    0x62: _o(4, "speed", "m/s", 1e-6, True), 0x63: _o(4, "acceleration", "m/s2", 1e-6, True),
    0x64: _o(1), 0x65: _o(1), 0xF0: _o(2), 0xF1: _o(4), 0xF2: _o(3),
    **{oid: Obj(1, name, binary=True) for oid, name in _BINARY.items()},
}


@dataclass(frozen=True)
class Reading:
    object_id: int
    name: str
    value: float | bool
    unit: str | None


@dataclass(frozen=True)
class Advert:
    encrypted: bool
    packet_id: int | None
    counter: int | None  # encrypted adverts only
    readings: tuple[Reading, ...]


def _num(raw: bytes, obj: Obj) -> float:
    v = int.from_bytes(raw, "little", signed=obj.signed)
    # round away binary noise of the decimal factor (0.01 → 21.37, not 21.369999...)
    return v if obj.factor == 1.0 else round(v * obj.factor, 9)


def parse_objects(payload: bytes) -> tuple[int | None, tuple[Reading, ...]]:
    """(packet id, readings) of a plaintext object list; FrameError('bthome') if malformed."""
    i, n = 0, len(payload)
    packet_id = None
    out: list[Reading] = []
    while i < n:
        oid = payload[i]
        obj = OBJECTS.get(oid)
        if obj is None:
            raise FrameError("bthome", f"unknown object id 0x{oid:02x} at byte {i}")
        i += 1
        if obj.size in (_VAR, _CMD):
            if i >= n:
                raise FrameError("bthome", f"object 0x{oid:02x} lacks its length byte")
            # a command's length byte counts its arguments; the opcode byte comes on top
            size = (payload[i] & 0x1F) + 1 if obj.size == _CMD else payload[i]
            i += 1
        else:
            size = obj.size
        if i + size > n:
            raise FrameError("bthome", f"object 0x{oid:02x} truncated")
        raw = payload[i:i + size]
        i += size
        if oid == 0x00:
            packet_id = raw[0]
        elif obj.name is not None:
            value: float | bool = bool(raw[0]) if obj.binary else _num(raw, obj)
            out.append(Reading(oid, obj.name, value, obj.unit))
    return packet_id, tuple(out)


def decode(service_data: bytes, mac: bytes | None = None,
           bindkey: bytes | None = None) -> Advert:
    """An advert's service data (the bytes after UUID 0xFCD2) → Advert.

    mac: the advertiser's address, 6 bytes as displayed (needed to decrypt). FrameError kinds:
    'bthome' (malformed), 'bthome_key' (encrypted, no bindkey), 'bthome_mic' (does not
    decrypt under the bindkey: wrong key or forged).
    """
    if not service_data:
        raise FrameError("bthome", "empty service data")
    info = service_data[0]
    if info >> 5 != 2:
        raise FrameError("bthome", f"BTHome version {info >> 5}, expected 2")
    body = service_data[1:]
    if info & 0x02:  # the MAC travels in the advert (devices with random addresses)
        if len(body) < 6:
            raise FrameError("bthome", "MAC flag set but no MAC")
        mac, body = body[:6][::-1], body[6:]
    if not info & 0x01:
        packet_id, readings = parse_objects(body)
        return Advert(False, packet_id, None, readings)
    if bindkey is None:
        raise FrameError("bthome_key", "encrypted advert and no bindkey")
    if mac is None or len(mac) != 6:
        raise FrameError("bthome", "encrypted advert needs the 6-byte MAC")
    if len(body) < 8:
        raise FrameError("bthome", "encrypted advert too short")
    ciphertext, ctr, mic = body[:-8], body[-8:-4], body[-4:]
    nonce = bytes(mac) + _UUID16_LE + bytes((info,)) + ctr
    try:
        plain = AESCCM(bindkey, tag_length=4).decrypt(nonce, ciphertext + mic, None)
    except InvalidTag:
        raise FrameError("bthome_mic", "does not decrypt under the bindkey") from None
    packet_id, readings = parse_objects(plain)
    return Advert(True, packet_id, int.from_bytes(ctr, "little"), readings)


def derive_bindkey(node_key: bytes) -> bytes:
    """A Lantern node's bindkey, as the node derives it (firmware/node/bthome.py)."""
    return hmac.new(node_key, b"lantern bthome bindkey v1", hashlib.sha256).digest()[:16]


def mac_bytes(address: str) -> bytes:
    """'AA:BB:CC:DD:EE:FF' → 6 bytes in display order (as the BTHome nonce wants them)."""
    b = bytes.fromhex(address.replace(":", "").replace("-", ""))
    if len(b) != 6:
        raise ValueError(f"not a 48-bit Bluetooth address: {address!r}")
    return b


# How a Lantern node puts its canonical measurements on air (firmware/node/bthome.py OBJECTS):
# object id → canonical name, for reading a Lantern advert back in our own terms.
LANTERN_NAMES = {0x02: "temperature", 0x03: "humidity", 0x04: "pressure", 0x05: "illuminance",
                 0x0B: "lamp_power", 0x0C: "battery", 0x0D: "pm2_5", 0x0E: "pm10", 0x12: "co2",
                 0x43: "lamp_current", 0x4A: "lamp_voltage"}
