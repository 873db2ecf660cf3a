"""Diagnostics on the link: verify a COMMAND, run it, answer with a REPLY or a STATUS.

The normative description is docs/protocol.md, "Diagnostics". A COMMAND is a COSE_Mac0 under
the node key whose Partial IV is a counter the node requires to increase (kept in flash, so a
recorded command cannot be replayed, not even across a reboot). External AAD = the frame
type byte keeps the three kinds apart from each other and from DATA and ACK.
"""

import gc
import time

from . import cbor, cose, frame, probe
from .outbox import _write_atomic
from .probe import aad, seal  # noqa: F401 - the diagnostics frames, shared with probes

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


PROTOCOL = probe.PROTOCOL

# operations (COMMAND payload key 1)
OP_STATUS = const(1)
OP_SELF_TEST = const(2)
OP_SET_INTERVAL = const(3)
OP_SYNC_TIME = const(4)
OP_REBOOT = const(5)
OP_CLEAR_FAULTS = const(6)
OP_IDENTIFY = const(7)
OP_LATEST = const(8)
OP_UPDATE_OFFER = const(9)  # signed updates (docs/protocol.md "Update transfer"): node/ota.py
OP_UPDATE_CHUNK = const(10)
OP_UPDATE_APPLY = const(11)
OP_UPDATE_ABORT = const(12)
OP_UPDATE_ROTATE = const(13)  # a release-key rotation record (docs/updates.md)
OP_REKEY = const(14)  # key rotation (docs/protocol.md "Key rotation and configuration")
OP_REKEY_COMMIT = const(15)
OP_CONFIG = const(16)  # versioned settings from the gateway: node/netcfg.py

# result codes (REPLY payload key 2)
OK = const(0)
E_OP = const(1)  # unknown operation
E_ARG = const(2)  # missing or out-of-range argument
E_FAIL = const(3)  # the action raised; result {"error": text}
E_BIG = const(4)  # the result does not fit in one frame
E_REFUSED = const(5)  # an update step refused: {1: reason, 2: detail, 3: have}

# why a STATUS was sent instead of a REPLY (STATUS payload key 5)
R_PROBE = const(0)
R_MALFORMED = const(1)
R_BAD_MAC = const(2)
R_REPLAY = const(3)

INTERVAL_MIN_MS = const(1000)
INTERVAL_MAX_MS = const(86400000)
IDENTIFY_MAX_S = const(600)
STATUS_GAP_MS = probe.STATUS_GAP_MS

_ALG = cose.ALG_HMAC_256_64
_CMD_ITEMS = const(64)  # a COMMAND payload is {1: op, 2: {args}}: what its decoding may build


def unseal(key, body, ftype):
    """(kid, counter, payload) of a diagnostic frame body; CoseError if forged or malformed.

    The envelope is read by position (cose.mac0_peek): nothing a peer sent is decoded before
    its MAC matches. With key None only the layout is checked (kid and counter unverified).
    """
    protected, kid, counter, payload, tag = cose.mac0_peek(body, (_ALG,))
    if key is not None:
        cose.mac0_check(key, protected, payload, tag, aad(ftype))
    return kid, counter, payload


class Commands:
    """The node's side of COMMAND / REPLY / STATUS.

    `actions` is the node: identity() → {"id","fw","board"}, status() → dict,
    self_test(index or None) → list, set_interval(ms), sync_time(ms) → the clock it replaced
    (Unix ms), clear_faults() → int,
    identify(seconds), latest() → DATA body or None, reboot() (called once the REPLY is out),
    updater() → node.ota.Updater (loaded with the first update op).
    """

    def __init__(self, node_id, key, state_dir, actions):
        self._kid = node_id.encode()
        self._key = key
        self._path = state_dir + "/cmd_counter"
        self._actions = actions
        # highest counter accepted so far; only larger ones are obeyed
        self.floor = probe.floor(self._path)
        self.accepted = 0
        self.refused = 0
        self.other_node = 0
        self._last_status = None

    def counters(self):
        return {"accepted": self.accepted, "refused": self.refused, "floor": self.floor}

    def handle(self, body):
        """Answer one COMMAND body: [(frame type, body, after or None)], possibly empty.

        The link frames each answer its own way (COBS on the UART, segments on BLE) and calls
        `after` once the answer is on its way. Never raises: the link's receive task must live.
        """
        try:
            return self._handle(body)
        except Exception as e:  # noqa: BLE001 - e.g. flash full while saving the counter
            self.refused += 1
            print("command failed: %r" % (e,))
            return []

    def _handle(self, body):
        if not body:
            return self._status(R_PROBE)
        try:
            # by position only: no decoder sees these bytes before the MAC matches
            protected, kid, counter, payload, tag = cose.mac0_peek(body, (_ALG,))
        except (cose.CoseError, ValueError):
            self.refused += 1
            return self._status(R_MALFORMED)
        if kid != self._kid:
            # addressed to another node (a shared bus, or the wrong one plugged in): stay quiet
            self.other_node += 1
            return []
        prev = False
        try:
            cose.mac0_check(self._key, protected, payload, tag, aad(frame.COMMAND))
        except (cose.CoseError, ValueError):
            prev = self._recommit(protected, payload, tag)
            if not prev:
                self.refused += 1
                return self._status(R_BAD_MAC)
        if not prev:  # a previous-key COMMIT (idempotent) never moves the floor
            if counter <= self.floor:
                self.refused += 1
                return self._status(R_REPLAY)
            # Persist before acting: a reboot or power cut right after cannot reopen the window.
            _write_atomic(self._path, b"%d" % counter)
            self.floor = counter
            p = getattr(self._actions, "key_prev", None)
            if p and p():  # the first command under the new key retires the previous one
                self._actions.fleet(0, None)
        self.accepted += 1
        try:
            msg = cbor.loads(payload, _CMD_ITEMS)
            op = msg[1]
            args = msg.get(2, {})
            if not isinstance(args, dict):
                raise TypeError
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            body = self._reply(counter, 0, E_ARG, {"error": "payload must be {1: op, 2: {}}"})
            return [(frame.REPLY, body, None)]
        after = None
        try:
            code, result, after = self._run(op, args)
            body = self._reply(counter, op, code, result)
        except Exception as e:  # noqa: BLE001 - a failing action is reported, never fatal
            result = None  # a MemoryError leaves little room: free what we can first
            gc.collect()
            body = self._reply(counter, op, E_FAIL, {"error": "%s: %s" % (type(e).__name__, e)})
            after = None
        if len(body) + 3 > frame.MAX_FRAME:  # type byte + body + CRC must fit one frame
            body = self._reply(counter, op, E_BIG, {"bytes": len(body)})
            after = None
        return [(frame.REPLY, body, after)]

    def _recommit(self, protected, payload, tag):
        """Whether a COMMAND MAC'd with the key before the last rotation asks only for that
        rotation's commit again (a gateway that lost its REPLY); nothing else passes."""
        prev = getattr(self._actions, "key_prev", None)
        prev = prev() if prev is not None else None
        if prev is None:
            return False
        try:
            cose.mac0_check(prev, protected, payload, tag, aad(frame.COMMAND))
            msg = cbor.loads(payload, _CMD_ITEMS)
            return msg[1] == OP_REKEY_COMMIT and msg[2][2] == self._actions.key_version()
        except (ValueError, TypeError, KeyError, IndexError):
            return False

    def _run(self, op, args):
        a = self._actions
        if op == OP_STATUS:
            st = a.status()
            st["cmd"] = self.counters()
            return OK, st, None
        if op == OP_SELF_TEST:
            index = args.get(1)
            if index is not None and not isinstance(index, int):
                return E_ARG, {"error": "sensor index must be an integer"}, None
            return OK, {"sensors": a.self_test(index)}, None
        if op == OP_SET_INTERVAL:
            ms = args.get(1)
            if not isinstance(ms, int) or not INTERVAL_MIN_MS <= ms <= INTERVAL_MAX_MS:
                return E_ARG, {"error": "interval must be %d..%d ms" % (
                    INTERVAL_MIN_MS, INTERVAL_MAX_MS)}, None
            a.set_interval(ms)
            return OK, {"interval_ms": ms}, None
        if op == OP_SYNC_TIME:
            ms = args.get(1)
            if not isinstance(ms, int) or ms < 0:
                return E_ARG, {"error": "time must be Unix milliseconds"}, None
            return OK, {"was_ms": a.sync_time(ms), "now_ms": ms}, None
        if op == OP_REBOOT:
            return OK, {"rebooting": True}, a.reboot
        if op == OP_CLEAR_FAULTS:
            return OK, {"cleared": a.clear_faults()}, None
        if op == OP_IDENTIFY:
            s = args.get(1, 10)
            if not isinstance(s, int) or not 0 < s <= IDENTIFY_MAX_S:
                return E_ARG, {"error": "identify for 1..%d s" % IDENTIFY_MAX_S}, None
            return OK, {"identify_s": s, "how": a.identify(s)}, None
        if op == OP_LATEST:
            return OK, {"data": a.latest()}, None
        if OP_UPDATE_OFFER <= op <= OP_UPDATE_ROTATE:
            return self._update(op, args)
        if op == OP_REKEY or op == OP_REKEY_COMMIT or op == OP_CONFIG:
            code, result = a.fleet(op, args)
            key = getattr(a, "key", None)
            if key is not None:
                self._key = key()  # a commit: the REPLY, and all after it, under the new key
            return code, result, None
        return E_OP, {"error": "unknown operation %r" % (op,)}, None

    def _update(self, op, args):
        """One step of an update transfer; a refusal is E_REFUSED with its reason."""
        from .ota import CHUNK_MAX
        from .update import Refused

        u = self._actions.updater()
        a1, a2 = args.get(1), args.get(2)
        try:
            if op == OP_UPDATE_OFFER:
                at = 0 if a2 is None else a2
                if not isinstance(a1, bytes) or not isinstance(at, int) or at < 0:
                    return E_ARG, {"error": "offer is {1: head bytes, 2: offset}"}, None
                have, total = u.offer(a1, at)
                if have is None:  # a head sent in pieces: the next piece goes at `total`
                    return OK, {4: total}, None
                return OK, {1: have, 2: total, 3: CHUNK_MAX}, None
            if op == OP_UPDATE_CHUNK:
                if (not isinstance(a1, int) or a1 < 0 or not isinstance(a2, bytes)
                        or len(a2) > CHUNK_MAX):
                    return E_ARG, {"error": "chunk is {1: offset, 2: <= %d bytes}" % CHUNK_MAX,
                                   1: u.have}, None
                return OK, {1: u.chunk(a1, a2)}, None
            if op == OP_UPDATE_APPLY:
                version = u.apply()
                return OK, {1: version}, self._actions.reboot
            if op == OP_UPDATE_ROTATE:
                if not isinstance(a1, bytes):
                    return E_ARG, {"error": "rotate is {1: record bytes}"}, None
                return OK, {1: u.rotate(a1)}, None
            u.abort()
            return OK, {}, None
        except Refused as e:
            return E_REFUSED, {1: e.reason, 2: e.detail, 3: u.have}, None

    def _reply(self, counter, op, code, result):
        payload = cbor.dumps({1: op, 2: code, 3: result})
        return seal(self._key, self._kid, counter, payload, frame.REPLY)

    def _status(self, reason):
        now = time.ticks_ms()
        last = self._last_status
        if last is not None and time.ticks_diff(now, last) < STATUS_GAP_MS:
            return []
        self._last_status = now
        upd = getattr(self._actions, "upd", None)  # a node's actions have it; a tool's may not
        body = probe.status_body(self._key, self._kid, self.floor, self._actions.identity(),
                                 reason, None if upd is None else upd())
        return [(frame.STATUS, body, None)]


REBOOT_EXIT = const(75)  # the unix board's "reset": the process ends, its supervisor restarts it


class NodeActions:
    """The actions a COMMAND can ask of a node.Node (node/app.py), read from its parts."""

    def __init__(self, node):
        self.n = node
        self.evicted_seen = 0  # evictions already latched as a fault (node/report.py)
        self._updater = None

    def updater(self):
        """The node's update receiver (node/ota.py), loaded with the first update op."""
        if self._updater is None:
            from . import ota

            n = self.n
            self._updater = ota.Updater(n.cfg, n.board.get("name", "?"),
                                        ota.boot_info().get("config") or "node.json", n.hal)
        return self._updater

    def fleet(self, op, args):
        """A rekey, its commit or a configuration (node/rekey.py, node/netcfg.py): (code,
        result); op 0 retires the previous key. Their code is loaded for it, given back after."""
        from . import unload

        try:
            if op == OP_CONFIG:
                from .netcfg import configure

                return configure(self, args.get(1), args.get(2))
            from .rekey import commit, rekey, retire

            if op == OP_REKEY:
                return rekey(self.n, args.get(1), args.get(2))
            if op:  # OP_REKEY_COMMIT
                return commit(self.n, args.get(2))
            return retire(self.n)
        finally:
            unload("netcfg", "rekey", "x25519")

    def key(self):
        return self.n.key

    def key_prev(self):
        return getattr(self.n, "key_prev", None)

    def key_version(self):
        return getattr(self.n, "key_version", 0)

    def upd(self):
        """STATUS "upd": the transfer in progress, else what the boot record says."""
        out = probe.boot_upd()
        u = self._updater
        if u is not None:
            if u.man is not None:
                out.update({"state": "staging", "version": u.version, "have": u.have})
            out["refused"] = u.refused
        return out

    def identity(self):
        n = self.n
        return {"id": n.node_id, "fw": _fw(), "board": n.board.get("name", "?")}

    def status(self):
        """STATUS (op 1): built by node/report.py, loaded for it and given back."""
        from . import report, unload

        try:
            return report.status(self)
        finally:
            unload("report")

    def self_test(self, index=None):
        from . import report, unload

        try:
            return report.self_test(self.n, index)
        finally:
            unload("report")

    def set_interval(self, ms):
        path = self.n.cfg["state_dir"] + "/interval_ms"  # node/app.py reads it at boot
        _write_atomic(path, b"%d" % ms)
        nvs_set = getattr(self.n.hal, "nvs_set", None)
        if nvs_set is not None:  # ESP32: kept through a reflash of the filesystem too
            nvs_set("interval_ms", ms)
        self.n.interval_ms = ms
        if hasattr(self.n.sensors, "interval_ms"):
            self.n.sensors.interval_ms = ms  # cadences and the energy model count in intervals

    def sync_time(self, ms):
        was = self.n.clock.now_ms()
        self.n.clock.set_ms(ms)
        return was

    def clear_faults(self):
        k = len(self.n.faults)
        self.n.faults = {}
        return k

    def identify(self, seconds):
        """Blink the board's LED through the HAL; a board without one says so on its console."""
        blink = getattr(self.n.hal, "identify", None)
        if blink and blink(seconds) is not False:  # False: the board names no LED
            return "led"
        print("identify: node %s is here (%d s)" % (self.n.node_id, seconds))
        return "console"

    def latest(self):
        """The newest sealed DATA body still in the outbox, or None."""
        newest = self.n.outbox.newest()
        return self.n.outbox.get(newest) if newest is not None else None

    def reboot(self):
        print("reboot requested over the link")
        reset = getattr(self.n.hal, "reset", None)
        if reset:
            reset()
        raise SystemExit(REBOOT_EXIT)


def _fw():
    from .app import FIRMWARE_VERSION  # main.py sets a slot's signed version here

    return FIRMWARE_VERSION
