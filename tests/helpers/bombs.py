"""Allocation bombs: ACK-shaped frames whose CBOR would make a careless decoder allocate."""

from __future__ import annotations

from lantern.agent import protocol


def _bstr(n: int) -> bytes:
    return protocol.cbor_head(2, n)


def bombs() -> list[bytes]:
    """Frame bodies (each fits one frame) that cost a general CBOR decoder far more heap than
    their size: the review's, and a few more of the same family."""
    nan = b"\xf9\x7e\x00"
    out = [
        b"\x5f" + b"\x40" * 1000 + b"\xff",  # indefinite bstr of 1000 empty chunks
        b"\x7f" + b"\x60" * 1000 + b"\xff",  # indefinite tstr of 1000 empty chunks
        b"\x81" * 31 + b"\x5f" + b"\x40" * 960 + b"\xff",  # the same, deep inside arrays
        b"\x99\x03\xe0" + b"\x80" * 992,  # 992 empty arrays in one
        b"\x99\x03\xe0" + b"\xa0" * 992,  # 992 empty maps in one
        b"\x9f" * 20 + b"\x80" * 900 + b"\xff" * 20,  # deep indefinite arrays, wide at the bottom
        b"\x99\x01\x4c" + (b"\xa1" + nan + b"\x80") * 332,  # 332 maps keyed by NaN
        b"\xb9\x01\x4c" + b"".join(b"\xfa" + (0x3F800000 + i).to_bytes(4, "big") + b"\xf6"
                                   for i in range(140)) + b"\xa1" + nan + b"\x80",  # float keys
        b"\x5b" + b"\xff" * 8,  # a byte string of 2**64 - 1 bytes, declared
        b"\x9b\x00\x00\x00\x00\xff\xff\xff\xff" + b"\x80" * 900,  # an array of 2**32 - 1 items
        b"\xbb\x7f" + b"\xff" * 7,  # a map of 2**63 pairs
    ]
    # the same bombs where a COSE_Mac0 payload or protected header would be
    env = [b"\xd1\x84" + b"\x43\xa1\x01\x04" + b"\xa0" + _bstr(len(b)) + b + b"\x48" + bytes(8)
           for b in out[:4]]
    env += [b"\xd1\x84" + b"\x5f" + b"\x40" * 990 + b"\xff" + b"\xa0\x40\x48" + bytes(8)]
    return [b for b in out + env if len(b) + 3 <= protocol.MAX_FRAME]
