"""Write tests/vectors/frames/sl0042-seq5-v2.json from the firmware's own encoder.

  .venv/bin/python tests/vectors/make_frames.py [--check]

The readings go through what a node does to them (node.senml quantize, record, pack; node.cbor;
node.cose; node.frame), so the file records the bytes of docs/protocol.md §4. Regenerate only
with a protocol version change; tests/firmware/test_vectors.py checks the file against the
encoder, the gateway (cbor2, hmac, cobs) and the doc. --check exits 1 if the file is not what
it would write.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "firmware"))

from node import cbor, cose, frame, senml  # noqa: E402

from lantern.agent.units import UNITS  # noqa: E402

PATH = ROOT / "tests/vectors/frames/sl0042-seq5-v2.json"
KEY = bytes(range(32))
NODE = "SL-0042"
SEQ = 5
BT = 1764331200  # 2025-11-28T12:00:00Z
# (name, value as the driver read it, the driver's decimal places or None)
READINGS: list[tuple[str, Any, int | None]] = [
    ("heap_free", 98304, None), ("humidity", 48.25, 2), ("pressure", 101325.31, 0),
    ("temperature", 21.37, 2), ("uptime", 3600, None)]
ACK_TIME_MS = 1764331201234


def _diag(record: dict[int, Any]) -> str:
    """A record in CBOR diagnostic notation, keys in their deterministic order."""
    keys = sorted(record, key=lambda k: cbor.dumps(k))
    return "{" + ", ".join(f"{k}: {json.dumps(record[k])}" for k in keys) + "}"


def vector() -> dict[str, Any]:
    values = {n: senml.quantize(senml.quantize(v, p)) for n, v, p in READINGS}
    records = [senml.record(n, values[n]) for n in sorted(values)]
    pack = senml.pack(None, BT, records)
    payload = cbor.dumps(pack)
    kid = NODE.encode()
    protected = {cose.H_ALG: cose.ALG_HMAC_256_64, cose.H_KID: kid, cose.H_PIV: cose.piv(SEQ)}
    prot = cbor.dumps(protected)
    structure = cbor.dumps(["MAC0", prot, b"", payload])
    mac0 = cose.mac0_create(KEY, payload, protected)
    tag = mac0[-8:]
    wire = frame.encode(frame.DATA, mac0)
    ack_payload = cbor.dumps({1: [SEQ], 2: ACK_TIME_MS})
    ack = cose.mac0_create(KEY, ack_payload, protected)
    bn = senml.base_name(NODE)
    # what the gateway must make of it: the kid's base name, the table's units
    # and a float32 as the decimal the driver read at its places (21.37, not its float32)
    places = {n: p for n, _, p in READINGS}
    read = {n: v for n, v, _ in READINGS}
    resolved = [{"n": bn + r[senml.N], "t": BT, "u": UNITS[r[senml.N]],
                 "v": r[senml.V] if isinstance(r[senml.V], int)
                 else float(f"{read[r[senml.N]]:.{places[r[senml.N]]}f}")}
                for r in records]
    return {
        "description": (
            "Lantern UART DATA and ACK frames for node SL-0042, key 000102..1f, seq 5, protocol "
            "version 2: no bn (the COSE kid names the node), no unit for a canonical name, values "
            "rounded to the sensor's places then to float32. Written by "
            "tests/vectors/make_frames.py from the firmware's encoder; regenerate only with a "
            "protocol version change."),
        "key": KEY.hex(),
        "kid": kid.hex(),
        "seq": SEQ,
        "bt": BT,
        "readings": READINGS,
        "data": {
            "senml_pack_diag": "[" + ", ".join(_diag(r) for r in pack) + "]",
            "senml_pack": payload.hex(),
            "protected": prot.hex(),
            "mac_structure": structure.hex(),
            "tag": tag.hex(),
            "cose_mac0": mac0.hex(),
            "crc16": frame.crc16(bytes((frame.DATA,)) + mac0).to_bytes(2, "big").hex(),
            "wire": wire.hex(),
        },
        "resolved": resolved,
        "ack": {
            "payload_diag": f"{{1: [{SEQ}], 2: {ACK_TIME_MS}}}",
            "payload": ack_payload.hex(),
            "cose_mac0": ack.hex(),
            "wire": frame.encode(frame.ACK, ack).hex(),
        },
    }


def main() -> int:
    text = json.dumps(vector(), indent=2) + "\n"
    if "--check" in sys.argv[1:]:
        return 0 if PATH.read_text() == text else 1
    PATH.write_text(text)
    print(f"wrote {PATH.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
