"""BTHome v2 service data (UUID 0xFCD2): the node's latest values for any BTHome receiver.

Layout (bthome.io, format v2): a device-info byte (bit 0 encrypted, bits 5-7 version 2), then
objects in ascending object-id order, each an id byte and a little-endian integer scaled as
the spec says. Encrypted: AES-CCM (4-byte MIC) over the objects, nonce = MAC | FCD2 |
device-info | counter, followed by the 4-byte counter and the MIC. A legacy advert has 31
bytes, so the readings are split into pages that fit and `packet_id` picks the page: every
reading is on air once per cycle of pages.
"""

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


UUID16 = const(0xFCD2)
_INFO_PLAIN = const(0x40)  # version 2, not encrypted
_INFO_ENCRYPTED = const(0x41)
_PACKET_ID = const(0x00)
MAX_ADV = const(31)
# flags AD (3 bytes) and the service-data AD header (length, type, UUID: 4 bytes)
_SERVICE_DATA_MAX = const(24)  # MAX_ADV - 3 - 4
_MIC_LEN = const(4)

# canonical name (docs/measurements.md) -> BTHome object: id, size, signed, raw = value * mult.
# Units follow from our SenML units: pressure Pa = 0.01 hPa, battery and lamp voltage V.
# Sorted by object id, as the spec wants objects on air.
OBJECTS = (
    ("temperature", 0x02, 2, True, 100),
    ("humidity", 0x03, 2, False, 100),
    ("pressure", 0x04, 3, False, 1),
    ("illuminance", 0x05, 3, False, 100),
    ("lamp_power", 0x0B, 3, False, 100),
    ("battery", 0x0C, 2, False, 1000),
    ("pm2_5", 0x0D, 2, False, 1),
    ("pm10", 0x0E, 2, False, 1),
    ("co2", 0x12, 2, False, 1),
    ("lamp_current", 0x43, 2, False, 1000),
    # mains voltage overflows 0x0C (max 65.535 V): the 0.1 V object holds it
    ("lamp_voltage", 0x4A, 2, False, 10),
)


class BTHomeError(ValueError):
    pass


def _raw(value, size, signed, mult):
    """The scaled integer, or None when the value is missing, not finite or out of range."""
    if value is None or value is True or value is False or not isinstance(value, (int, float)):
        return None
    if value != value or value in (float("inf"), float("-inf")):
        return None
    x = value * mult
    # round half away from zero, the same on single- (ESP32) and double-precision ports
    raw = int(x + 0.5) if x >= 0 else -int(-x + 0.5)
    bits = 8 * size
    if signed:
        if raw < -(1 << (bits - 1)) or raw >= 1 << (bits - 1):
            return None
        raw &= (1 << bits) - 1
    elif raw < 0 or raw >= 1 << bits:
        return None
    return raw


def objects(readings):
    """Every encodable reading as (object id, bytes of the object), ascending by id."""
    out = []
    for name, oid, size, signed, mult in OBJECTS:
        raw = _raw(readings.get(name), size, signed, mult)
        if raw is None:
            continue
        b = bytearray(1 + size)
        b[0] = oid
        for i in range(size):
            b[1 + i] = (raw >> (8 * i)) & 0xFF
        out.append((oid, bytes(b)))
    return out


def pages(objs, budget):
    """Split the objects, in order, into consecutive pages of at most `budget` bytes."""
    out = []
    cur = b""
    for _, b in objs:
        if len(b) > budget:
            continue
        if len(cur) + len(b) > budget:
            out.append(cur)
            cur = b""
        cur += b
    if cur or not out:
        out.append(cur)
    return out


def encode(readings, packet_id, bindkey=None, mac=None, counter=None):
    """BTHome v2 service data (the bytes after the UUID) for the page packet_id selects.

    readings: canonical name -> value. Plain adverts carry the packet id object; encrypted
    ones carry the counter instead (mac: the node's 6-byte address, counter: 32 bits, never
    reused with the same bindkey).
    """
    objs = objects(readings)
    if bindkey is None:
        book = pages(objs, _SERVICE_DATA_MAX - 1 - 2)
        body = book[packet_id % len(book)]
        return bytes((_INFO_PLAIN, _PACKET_ID, packet_id & 0xFF)) + body
    if len(bindkey) != 16:
        raise BTHomeError("bindkey must be 16 bytes")
    if mac is None or len(mac) != 6:
        raise BTHomeError("an encrypted advert needs the 6-byte MAC address")
    if counter is None or not 0 <= counter <= 0xFFFFFFFF:
        raise BTHomeError("an encrypted advert needs a 32-bit counter")
    book = pages(objs, _SERVICE_DATA_MAX - 1 - 4 - _MIC_LEN)
    body = book[packet_id % len(book)]
    ctr = bytes((counter & 0xFF, (counter >> 8) & 0xFF, (counter >> 16) & 0xFF, counter >> 24))
    nonce = bytes(mac) + bytes((UUID16 & 0xFF, UUID16 >> 8, _INFO_ENCRYPTED)) + ctr
    ciphertext, mic = ccm_encrypt(bindkey, nonce, body, _MIC_LEN)
    return bytes((_INFO_ENCRYPTED,)) + ciphertext + ctr + mic


def advert(service_data):
    """Legacy advertising data: flags (LE General Discoverable, no BR/EDR) + service data."""
    ad = b"\x02\x01\x06" + bytes((len(service_data) + 3, 0x16, UUID16 & 0xFF, UUID16 >> 8))
    ad += service_data
    if len(ad) > MAX_ADV:
        raise BTHomeError("advert of %d bytes exceeds %d" % (len(ad), MAX_ADV))
    return ad


def derive_bindkey(node_key):
    """The node's BTHome bindkey: HMAC-SHA256(node key, label)[:16], so nothing new to provision.

    Knowing it lets a receiver read the adverts; it reveals nothing about the node key.
    """
    from .cose import hmac_sha256

    return hmac_sha256(node_key, b"lantern bthome bindkey v1")[:16]


def ccm_encrypt(key, nonce, msg, tag_len):
    """AES-CCM (RFC 3610) without associated data, on the AES block cipher (cryptolib ECB).

    Returns (ciphertext, tag). The nonce is 13 bytes, so the length field L is 2 bytes.
    """
    import cryptolib

    aes = cryptolib.aes(bytes(key), 1)  # mode 1: ECB, a bare block cipher
    n = len(msg)
    lf = 15 - len(nonce)
    if lf != 2 or n >= 1 << 16:
        raise BTHomeError("CCM here takes a 13-byte nonce and < 64 KiB")
    # CBC-MAC over B0 | message blocks (zero-padded); no associated data (Adata flag 0)
    blk = bytearray(16)
    blk[0] = (((tag_len - 2) // 2) << 3) | (lf - 1)
    blk[1:14] = nonce
    blk[14] = n >> 8
    blk[15] = n & 0xFF
    x = aes.encrypt(bytes(blk))
    for i in range(0, n, 16):
        part = msg[i : i + 16]
        blk = bytearray(x)
        for j in range(len(part)):
            blk[j] ^= part[j]
        x = aes.encrypt(bytes(blk))
    # CTR: A_i = flags(L-1) | nonce | i; S_0 masks the tag, S_1.. the message
    a = bytearray(16)
    a[0] = lf - 1
    a[1:14] = nonce
    out = bytearray(n)
    for i in range(0, n, 16):
        c = i // 16 + 1
        a[14] = c >> 8
        a[15] = c & 0xFF
        s = aes.encrypt(bytes(a))
        for j in range(min(16, n - i)):
            out[i + j] = msg[i + j] ^ s[j]
    a[14] = 0
    a[15] = 0
    s0 = aes.encrypt(bytes(a))
    tag = bytearray(tag_len)
    for j in range(tag_len):
        tag[j] = x[j] ^ s0[j]
    return bytes(out), bytes(tag)
