"""UART link framing: COBS, 0x00-delimited, a type byte, a body and a CRC-16."""

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


DATA = const(0x01)
ACK = const(0x02)
STATUS = const(0x03)
COMMAND = const(0x04)
REPLY = const(0x05)
TYPES = (DATA, ACK, STATUS, COMMAND, REPLY)

# Largest decoded frame (type + body + CRC) either side accepts; bounds the receive buffer.
MAX_FRAME = const(1024)


class FrameError(ValueError):
    """A frame that cannot be decoded: kind is one of 'cobs', 'crc', 'short', 'type', 'oversize'."""

    def __init__(self, kind, msg=""):
        super().__init__(kind + (": " + msg if msg else ""))
        self.kind = kind


def crc16(data, crc=0xFFFF):
    """CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF, no reflection); check value 0x29B1."""
    for b in data:
        crc ^= b << 8
        for _ in range(8):
            if crc & 0x8000:
                crc = ((crc << 1) ^ 0x1021) & 0xFFFF
            else:
                crc = (crc << 1) & 0xFFFF
    return crc


def cobs_encode(data):
    """Consistent Overhead Byte Stuffing: the result contains no 0x00 byte."""
    n = len(data)
    out = bytearray(n + n // 254 + 2)
    code_at = 0
    o = 1
    code = 1
    for i in range(n):
        b = data[i]
        if b == 0:
            out[code_at] = code
            code_at = o
            o += 1
            code = 1
        else:
            out[o] = b
            o += 1
            code += 1
            # a full block of 254 ends without an implied zero; open the next one only if
            # more data follows (as the reference encoder and the `cobs` package do)
            if code == 0xFF and i + 1 < n:
                out[code_at] = code
                code_at = o
                o += 1
                code = 1
    out[code_at] = code
    return bytes(out[:o])


def cobs_decode(data):
    """Inverse of cobs_encode; raises FrameError('cobs') on a malformed block."""
    out = bytearray()
    i = 0
    n = len(data)
    while i < n:
        code = data[i]
        if code == 0:
            raise FrameError("cobs", "zero byte inside frame")
        end = i + code
        if end > n:
            raise FrameError("cobs", "block runs past end")
        block = data[i + 1 : end]
        if 0 in block:
            raise FrameError("cobs", "zero byte inside frame")
        out.extend(block)
        i = end
        if code != 0xFF and i < n:
            out.append(0)
    return bytes(out)


def encode(ftype, body):
    """Wire bytes of one frame: 00 | COBS(type | body | crc16be) | 00.

    The leading delimiter ends any line noise received before the frame, so noise can
    never merge with it; back-to-back frames simply show an empty chunk in between.
    """
    raw = bytearray(1 + len(body) + 2)
    raw[0] = ftype
    raw[1 : 1 + len(body)] = body
    c = crc16(memoryview(raw)[: 1 + len(body)])
    raw[-2] = c >> 8
    raw[-1] = c & 0xFF
    return b"\x00" + cobs_encode(raw) + b"\x00"


def decode(wire):
    """(type, body) of one COBS-encoded frame without its delimiter."""
    if len(wire) > MAX_FRAME + MAX_FRAME // 254 + 2:
        raise FrameError("oversize", "%d bytes" % len(wire))
    raw = cobs_decode(wire)
    if len(raw) > MAX_FRAME:
        raise FrameError("oversize", "%d bytes decoded" % len(raw))
    if len(raw) < 3:
        raise FrameError("short", "%d bytes" % len(raw))
    if crc16(memoryview(raw)[:-2]) != (raw[-2] << 8) | raw[-1]:
        raise FrameError("crc")
    if raw[0] not in TYPES:
        raise FrameError("type", "0x%02x" % raw[0])
    return raw[0], raw[1:-2]


class Deframer:
    """Splits a byte stream at 0x00 delimiters; drops over-long runs of garbage."""

    def __init__(self, limit=MAX_FRAME + MAX_FRAME // 254 + 2):
        self._buf = bytearray()
        self._limit = limit
        self._overflow = False

    def feed(self, data):
        """Yield each complete COBS chunk (delimiter removed) found after adding data.

        An over-long chunk is yielded as None once, so the caller can count it.
        """
        start = 0
        while True:
            z = data.find(b"\x00", start)
            if z < 0:
                break
            part = data[start:z]
            start = z + 1
            if self._overflow:
                self._overflow = False
                self._buf = bytearray()
                yield None
                continue
            if self._buf:
                self._buf.extend(part)
                chunk = bytes(self._buf)
                self._buf = bytearray()
            else:
                chunk = bytes(part)
            if chunk:
                yield chunk
        rest = data[start:]
        if self._overflow:
            return
        if len(self._buf) + len(rest) > self._limit:
            self._overflow = True
            self._buf = bytearray()
        else:
            self._buf.extend(rest)
