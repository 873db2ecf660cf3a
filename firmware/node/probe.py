"""The answer to an empty COMMAND (a probe: "who is there?") and the frames both share.

A gateway probes every node it serves to learn its firmware version (agent/gateway.py), so a
probe must not load node/commands.py: once loaded it stays, and on an ESP32 with BLE its
~7.5 KB of bytecode eat the heap's margin. node/app.py answers a probe from here; the rest of
the diagnostics (node/commands.py) load with the first real COMMAND and use the same seal,
status body and update state (docs/protocol.md, "Diagnostics").
"""

import sys

from . import cbor, cose, frame

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


PROTOCOL = const(1)
R_PROBE = const(0)
STATUS_GAP_MS = const(100)  # unauthenticated probes cannot make the node talk faster than this
_ALG = cose.ALG_HMAC_256_64
_TAG = const(8)


def aad(ftype):
    """External AAD of a diagnostic frame: its type byte, so no kind can pose as another."""
    return bytes((ftype,))


def seal(key, kid, counter, payload, ftype):
    """Tagged COSE_Mac0 bytes of one diagnostic frame body."""
    pbstr = cbor.dumps({cose.H_ALG: _ALG, cose.H_KID: kid, cose.H_PIV: cose.piv(counter)})
    tag = cose.hmac_sha256(key, cbor.dumps(["MAC0", pbstr, aad(ftype), payload]))[:_TAG]
    return cbor.dumps(cbor.Tag(cose.TAG_MAC0, [pbstr, {}, payload, tag]))


def boot_upd():
    """STATUS "upd" as the boot record says it (main.py: node.BOOT), no transfer running."""
    rec = (getattr(sys.modules.get("node"), "BOOT", None) or {}).get("rec") or {}
    st = rec.get("state") or "idle"
    return {"state": st, "have": 0, "reason": rec.get("reason"),
            "version": rec.get("cver") if st in ("candidate", "rolled_back") else rec.get("ver")}


def status_body(key, kid, floor, ident, reason, upd):
    """The sealed body of a STATUS frame: who the node is and why it answers so."""
    st = {1: ident["id"], 2: ident["fw"], 3: ident["board"], 5: reason, 6: PROTOCOL}
    if upd is not None:
        st["upd"] = upd
    return seal(key, kid, floor, cbor.dumps(st), frame.STATUS)


def floor(path):
    """The command counter floor kept in flash (node/commands.py keeps it going up)."""
    try:
        with open(path, "rb") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 0
