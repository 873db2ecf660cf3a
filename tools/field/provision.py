"""`lantern provision node`: key, config, firmware, flash, deploy, verify, tell the gateway.

Every step says what it does (`--dry-run` prints them all, commands included, and touches
nothing). A failed step says what went wrong and how to resume (`--from STEP`); every step can
be run again safely: files are replaced whole, and an existing key is reused only where the
node shows it still holds that key's counters.

A key must never meet its counters twice: the node's frame sequence, command floor and BTHome
counter restart when its flash is erased or its filesystem is new, and under the same key the
gateway would then refuse its frames while recorded old ACKs, commands and advert keystreams
became valid again. So any run that can reset them issues a new key (docs/security.md), and
starts the new key's frame sequence above every number the node id has used (the gateway's
high mark where the tool can read it, never below Unix time in milliseconds): reading ids
`node:seq:index` then never repeat one the upstream platform already has.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lantern
from lantern.agent.config import NODE_ID, load_config, load_keys, write_secret
from lantern.agent.errors import ConfigError
from lantern.tools.field import provision_steps as ps

# the node's sources and the board files: package data of the wheel, links in a clone
FIRMWARE = lantern.FIRMWARE
BOARDS = lantern.BOARDS
# where a node's files are staged unless --out says: .build/ in a clone, the user's cache
# directory in an installed Lantern (never inside the installed package)
STAGING = (lantern.CHECKOUT / ".build" if lantern.CHECKOUT else Path(
    os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lantern") / "provision"
# flash and device come first: whether the node's counters survive decides the key
STEPS = ("check", "flash", "device", "key", "config", "compile", "deploy", "reset", "verify",
         "gateway")


class StepError(Exception):
    """A step failed: `what` went wrong, `fix` is what the installer can do about it."""

    def __init__(self, what: str, fix: str) -> None:
        super().__init__(what)
        self.what, self.fix = what, fix


def add_parser(sub: Any) -> None:
    p = sub.add_parser("provision", help="prepare a node: key, config, firmware, flash, deploy")
    ps_ = p.add_subparsers(dest="target", required=True)
    n = ps_.add_parser("node", help="provision one node over USB",
                       description="Create the node's key (added to the gateway's key file), "
                       "write its config, compile the firmware with mpy-cross, optionally flash "
                       "MicroPython with esptool, deploy with mpremote, reset, and verify over "
                       "the node's link.")
    n.add_argument("--board", required=True, help="board name (boards/NAME.json) or a path")
    n.add_argument("--id", required=True, help="node id, e.g. SL-0042")
    n.add_argument("--pole", default="", help="lamp post number")
    n.add_argument("--location", help="LAT,LON in degrees")
    n.add_argument("--port", help="the board's USB serial port (REPL), e.g. /dev/ttyUSB0")
    n.add_argument("--link-port", help="the node's link UART as seen from here (to verify); "
                   "default: skip verification unless the link is the USB port")
    n.add_argument("--keys", type=Path,
                   help="the gateway's key file to add the key to (created 0600 if missing, for "
                   "--gateway-config owned as its state_dir; "
                   "default: the keys_file of --gateway-config, else keys.toml)")
    n.add_argument("--gateway-config", type=Path, metavar="TOML",
                   help="the gateway's config, when provisioning on the gateway's host: its "
                   "queue tells the highest frame sequence it has taken from this node id, and "
                   "a new key's sequence starts above it (else above the clock: Unix ms)")
    n.add_argument("--release-pub", type=Path, metavar="NAME.pub.pem",
                   help="the release public key the node checks every update with "
                   "(`lantern release keygen`); default: --gateway-config's [updates] "
                   "release_key. Without one the node refuses every update")
    n.add_argument("--new-key", action="store_true",
                   help="replace an existing key (old unsent frames on the node are dropped)")
    n.add_argument("--keep-key", action="store_true",
                   help="fail rather than issue a new key where the node's counters may have "
                   "been reset (an erase, a fresh filesystem)")
    n.add_argument("--lock-repl", action="store_true",
                   help="ESP32: the node disables Ctrl-C at its USB REPL while it runs "
                   "(re-provisioning it then needs --flash --erase; docs/security.md)")
    n.add_argument("--interval", type=float, default=60.0,
                   help=f"seconds between samples ({ps.INTERVAL_MIN_S:g} to "
                   f"{ps.INTERVAL_MAX_S:g})")
    n.add_argument("--offset", action="append", default=[], metavar="NAME=VALUE",
                   help="a calibration offset the node adds and reports (docs/corrections.md): "
                   "temperature (Cel), humidity (%%RH), LAeq, LAmax or sound (both, dB); "
                   "repeat for each, e.g. --offset temperature=-0.8 --offset sound=1.5")
    n.add_argument("--kappa", metavar="K", help="the street aerosol's "
                   "hygroscopicity for the particulate humidity correction, 0 to 2 (the node's "
                   "default 0.4)")
    n.add_argument("--flash", type=Path, metavar="IMAGE", help="flash this MicroPython image")
    n.add_argument("--erase", action="store_true", help="with --flash: erase the flash first")
    n.add_argument("--firmware", choices=("mpy", "frozen"),
                   help="deploy compiled .mpy files (default), or rely on a firmware frozen "
                   "into the image (default for the qemu board)")
    n.add_argument("--mpy-cross", help="the mpy-cross to use (must match the node's MicroPython)")
    n.add_argument("--out", type=Path, help=f"where to stage the files (default {STAGING}/ID)")
    n.add_argument("--from", dest="start", choices=STEPS, help="resume at this step")
    n.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the node")
    n.add_argument("--dry-run", action="store_true", help="print every step, change nothing")
    from lantern.tools.field import fleet

    fleet.add_parser(ps_)


@dataclass
class Plan:
    args: argparse.Namespace
    board: dict[str, Any]
    board_path: Path
    stage: Path
    location: tuple[float, float] | None
    firmware: str
    key: bytes | None = None
    device: dict[str, Any] | None = None
    status: dict[str, Any] | None = None
    start: int = 0  # index in STEPS of the first step run (--from)
    queue: Path | None = None  # the gateway's queue (--gateway-config)
    gateway_state: Path | None = None  # its state_dir: whose the key file is (--gateway-config)
    release: bytes | None = None  # the release public key, 32 raw bytes (release.pub)
    release_from: str = ""  # where it came from, for the installer
    calibration: dict[str, Any] = field(default_factory=dict)  # node.json offsets, corrections


def board_module() -> Any:
    """firmware/node/board.py: the same validation the node runs."""
    if str(FIRMWARE) not in sys.path:
        sys.path.append(str(FIRMWARE))
    return importlib.import_module("node.board")


def _board(spec: str) -> tuple[Path, dict[str, Any]]:
    path = Path(spec) if spec.endswith(".json") else BOARDS / f"{spec}.json"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in BOARDS.glob("*.json")
                                 if p.name != "board.schema.json"))
        raise StepError(f"no board {spec!r}", f"use one of: {known} (or a path to a board file)")
    bm = board_module()
    try:
        board, warnings = bm.load(str(path))
    except bm.BoardError as e:
        raise StepError(str(e), "fix the board file") from None
    for w in warnings:
        print(f"  warning: {w}")
    return path, board


def _location(text: str | None) -> tuple[float, float] | None:
    if not text:
        return None
    try:
        lat, lon = (float(x) for x in text.split(","))
    except ValueError:
        raise StepError(f"--location {text!r}: expected LAT,LON", "e.g. --location 52.37,4.89"
                        ) from None
    if not (-90 <= lat <= 90 and -180 <= lon <= 180):
        raise StepError(f"--location {text!r}: out of range", "latitude first, then longitude")
    return lat, lon


def plan(args: argparse.Namespace) -> Plan:
    if not NODE_ID.match(args.id):
        raise StepError(f"--id {args.id!r}: a node id is 1-32 letters, digits, '.', '_' or '-'",
                        "e.g. --id SL-0042")
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in args.pole):
        raise StepError(f"--pole {args.pole!r}: a pole number is printable text, without "
                        "control characters", "e.g. --pole 'A12 north'")
    path, board = _board(args.board)
    firmware = args.firmware or ("frozen" if board["hal"] == "qemu" else "mpy")
    if args.flash and board.get("hal") != "esp32":
        raise StepError(f"--flash: board {board['name']} is not flashed with esptool",
                        "drop --flash")
    if args.new_key and args.keep_key:
        raise StepError("--new-key and --keep-key contradict each other", "give one of them")
    if args.lock_repl and board.get("hal") != "esp32":
        raise StepError(f"--lock-repl: board {board['name']} has no REPL lock",
                        "drop --lock-repl (ESP32 boards only)")
    if args.flash and not args.flash.exists() and not args.dry_run:
        raise StepError(f"--flash {args.flash}: no such file", "download the MicroPython image "
                        "for this board (micropython.org/download) and give its path")
    if not ps.INTERVAL_MIN_S <= args.interval <= ps.INTERVAL_MAX_S:
        raise StepError(f"--interval {args.interval:g}: a node samples every "
                        f"{ps.INTERVAL_MIN_S:g} to {ps.INTERVAL_MAX_S:g} s",
                        "e.g. --interval 60 (the node's set-interval command has the same range)")
    try:
        calibration = ps.calibration(getattr(args, "offset", None) or [],
                                     getattr(args, "kappa", None))
    except ValueError as e:
        raise StepError(str(e), "measure the offset against a reference (docs/corrections.md) "
                        "and give it in the reading's unit, e.g. --offset temperature=-0.8"
                        ) from None
    queue = gateway_state = None
    release_path: Path | None = args.release_pub
    release_from = "--release-pub"
    if args.gateway_config is not None:
        try:
            gw = load_config(args.gateway_config)
        except ConfigError as e:
            raise StepError(f"--gateway-config: {e}", "give the gateway's own config file "
                            "(/etc/lantern/gateway.toml), or drop --gateway-config") from None
        queue = gw.state_dir / ps.QUEUE_FILE
        if args.keys is None:
            args.keys = gw.keys_file
        if args.keys.resolve() == gw.keys_file.resolve():
            gateway_state = gw.state_dir
        if release_path is None and gw.updates is not None:
            release_path = gw.updates.release_key
            release_from = f"[updates] release_key of {args.gateway_config}"
    if args.keys is None:
        args.keys = Path("keys.toml")
    if args.flash and not args.dry_run:
        # the erase comes before the key step: a key file that cannot be written must stop
        # the run now, not after the board lost its old key and counters
        why = _unwritable(args.keys)
        if why:
            raise StepError(f"--keys {args.keys}: cannot write there ({why})",
                            "create the folder or fix its permissions, or run as the user "
                            "that owns it (the gateway's key file: sudo), then run this again")
    try:  # before anything is erased: a new key's sequence starts from this clock
        ps.seq_start(time.time(), None)
    except ValueError as e:
        raise StepError(str(e), "set this computer's clock (`timedatectl`, NTP), then run "
                        "this again") from None
    release = None
    if release_path is not None:
        try:
            release, kid = ps.release_public(release_path)
        except ValueError as e:
            raise StepError(str(e), "give the NAME.pub.pem that `lantern release keygen` "
                            "wrote beside NAME.pem") from None
        release_from = f"{release_path} (kid {kid}, from {release_from})"
    stage = args.out or STAGING / args.id
    return Plan(args, board, path, stage, _location(args.location), firmware, queue=queue,
                gateway_state=gateway_state, release=release, release_from=release_from,
                calibration=calibration)


def _unwritable(path: Path) -> str | None:
    """Why a file cannot be replaced in its folder (None: it can): tried, not guessed (root
    passes every permission check, not a read-only or missing folder)."""
    probe = path.parent / f".{path.name}.{os.getpid()}.probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        probe.unlink()
    except OSError as e:
        return e.strerror or str(e)
    return None


# ---- steps ----

# In the stage: the id of a key this tool made that no node has booted with yet, and "sent"
# once the deploy starts putting it on the board. From then on a node may have booted with it
# (a deploy that failed after the copy, a power cycle): only the node's counters can say.
FRESH = "key.new"


def _fresh(p: Plan, key: bytes) -> str | None:
    """"made" (the key never left this computer), "sent", or None (not a key made here)."""
    try:
        words = (p.stage / FRESH).read_text().split()
    except FileNotFoundError:
        return None
    if not words or words[0] != ps.key_id(key):
        return None
    return "sent" if "sent" in words[1:] else "made"


def _holds(p: Plan, key: bytes) -> bool:
    """Whether the node showed counters bound to `key` (step device)."""
    kid = ps.key_id(key)
    return p.device is not None and p.device.get("state") in (f"key:{kid}", f"legacy:{kid}")


def step_key(p: Plan, dry: bool) -> list[str]:
    keys_file: Path = p.args.keys
    node = p.args.id
    existing: dict[bytes, bytes] = {}
    if keys_file.exists():
        try:
            existing = load_keys(keys_file)
        except ConfigError as e:
            raise StepError(str(e), "fix or move the key file, then resume with --from key"
                            ) from None
    old = existing.get(node.encode())
    why = None
    if old is not None and not p.args.new_key:
        if dry:
            return [f"reuse the key of {node} in {keys_file} if the node shows it holds that "
                    "key's counters (step device), else create a new one and retire the old",
                    *([_erase_reason()] if p.args.flash and p.args.erase else [])]
        why, note = _counters_reset(p, old)
        if why is None:
            p.key = old
            return [f"reuse the key of {node} in {keys_file}: {note} (--new-key replaces it)"]
        if p.args.keep_key:
            raise StepError(
                f"--keep-key refused: {why}, and under the same key the gateway would refuse "
                "its frames while recorded old ACKs, commands and BTHome adverts became valid "
                "again",
                f"drop --keep-key: a new key is issued and the old one retired in {keys_file}")
    if dry:
        return [f"create a 256-bit key for {node} and add it to {keys_file} (mode 0600)"]
    p.key = os.urandom(32)
    retired = None
    if old is not None:
        retired = why or "replaced with --new-key"
    try:
        text = ps.keys_text(keys_file, node, p.key, retired=retired)
    except ValueError as e:
        raise StepError(str(e), f"edit {keys_file}, then run this again") from None
    created = not keys_file.exists()
    try:
        write_secret(keys_file, text)
    except OSError as e:
        raise StepError(f"cannot write {keys_file}: {e.strerror or e}",
                        "fix the folder's permissions or free space (or run as the key file's "
                        "owner), then resume") from None
    load_keys(keys_file)  # what the gateway will read: check it now, not in the field
    owner = _give_to_gateway(p, keys_file) if created else None
    p.stage.mkdir(parents=True, exist_ok=True)
    (p.stage / FRESH).write_text(ps.key_id(p.key) + "\n")
    if old is None:
        return [f"added a key for {node} to {keys_file} (mode 0600)", *filter(None, [owner])]
    return [f"replaced the key of {node} in {keys_file} (mode 0600): {retired}; the old key "
            f"{ps.key_id(old)} is retired there"]


def _give_to_gateway(p: Plan, keys_file: Path) -> str | None:
    """A key file this run created for a gateway (--gateway-config) goes to the owner of the
    gateway's state_dir: made by root (`sudo lantern provision`), the gateway could not read it."""
    if p.gateway_state is None or not p.gateway_state.exists():
        return None
    st = p.gateway_state.stat()
    want = (st.st_uid, st.st_gid)
    if want == (os.getuid(), os.getgid()):
        return None
    who = f"{_user(st.st_uid)}:{_group(st.st_gid)}"
    try:
        os.chown(keys_file, *want)
    except PermissionError:
        return (f"warning: {keys_file} is yours, but the gateway runs as {who} (the owner of "
                f"{p.gateway_state}): `sudo chown {who} {keys_file}`, or it cannot read its keys")
    return f"{keys_file} belongs to {who}, the gateway's user (the owner of {p.gateway_state})"


def _user(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group(gid: int) -> str:
    import grp

    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _erase_reason() -> str:
    return "--erase wipes the node's flash, so its counters (frame sequence, command floor, " \
           "BTHome counter) restart"


def _counters_reset(p: Plan, key: bytes) -> tuple[str | None, str]:
    """(why the node's counters may have restarted under `key`, or None; why it is safe)."""
    if p.start > STEPS.index("deploy"):
        return None, "this run puts nothing on the node"
    if _fresh(p, key) == "made":
        return None, "made by the interrupted run and never sent to a node"
    # a key that was sent may have run (a deploy that failed after its copy, a power cycle):
    # it is kept only where the node shows its counters, as any other key
    if p.args.flash and p.args.erase:
        return _erase_reason(), ""
    if p.device is None:
        if not p.args.port:
            return "without --port the tool cannot see whether the node kept its counters", ""
        step_device(p, False)
    assert p.device is not None
    state = str(p.device.get("state") or "none")
    kid = ps.key_id(key)
    if state in (f"key:{kid}", f"legacy:{kid}"):
        return None, f"the node holds it (key id {kid}) with its counters"
    if state == "none":
        return "the node has no Lantern state (a new or reformatted filesystem): its " \
               "counters would restart", ""
    if state.startswith("key:"):
        return f"the node's counters belong to another key ({state[4:]})", ""
    if state == f"lost:{kid}":
        return "the node lost this key's counters (its state directory was deleted) and " \
               "refuses the key", ""
    return "the node has counters, but the tool cannot tell under which key", ""


def node_config(p: Plan) -> dict[str, Any]:
    link = ps.link_for(p.board)
    cfg: dict[str, Any] = {"id": p.args.id, "board": "board.json",
                           "state_dir": "state", "interval_ms": round(p.args.interval * 1000),
                           "link": link}
    if ps.key_in_nvs(p.board):
        cfg["key_store"] = "nvs"  # out of reach of a filesystem dump (docs/security.md)
    else:
        cfg["key_file"] = "node.key"
    if p.args.lock_repl:
        cfg["lock_repl"] = True
    if p.args.pole:
        cfg["pole"] = str(p.args.pole)
    if p.location:
        cfg["location"] = list(p.location)
    cfg.update(p.calibration)
    return cfg


def step_config(p: Plan, dry: bool) -> list[str]:
    nvs = ps.key_in_nvs(p.board)
    files = ["node.json", "board.json"] if nvs else ["node.json", "node.key (0600)", "board.json"]
    where = [f"the key goes into the board's NVS at the deploy ({ps.NVS_SCRIPT}, written for "
             "it and removed after): no copy of it stays here"] if nvs else []
    if p.release is not None:
        files.append(ps.RELEASE_FILE)
        where.append(f"{ps.RELEASE_FILE}: the release public key {p.release_from}")
    else:
        where.append(f"no release key (--release-pub NAME.pub.pem, or --gateway-config with "
                     f"[updates]): the node keeps the {ps.RELEASE_FILE} it has, and without one "
                     "it refuses every update")
    if dry:
        return [f"write {', '.join(files)} to {p.stage}", *where, json.dumps(node_config(p))]
    p.stage.mkdir(parents=True, exist_ok=True)
    (p.stage / "node.json").write_text(json.dumps(node_config(p), indent=2) + "\n")
    _stage_key(p)
    _stage_release(p)
    shutil.copyfile(p.board_path, p.stage / "board.json")
    return [f"wrote {', '.join(files)} to {p.stage}", *where]


def _stage_release(p: Plan) -> None:
    """release.pub as this run decided (no stale copy from an earlier run's --release-pub):
    public, so plain mode; the node reads it beside node.json (node/ota.py)."""
    path = p.stage / ps.RELEASE_FILE
    if p.release is None:
        path.unlink(missing_ok=True)
    else:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(p.release)
        os.replace(tmp, path)


def _stage_key(p: Plan) -> None:
    """The key this run decided (p.key), as the deploy sends it: node.key on boards that keep
    a key file; on NVS boards nothing (the deploy writes nvs_key.py, and removes it), and no
    copy an earlier run or version left. A resumed run whose key step issued a new key skips
    the config step: the deploy calls this again, so it never sends a stale key."""
    assert p.key is not None
    if ps.key_in_nvs(p.board):
        for name in ("node.key", ps.NVS_SCRIPT):
            (p.stage / name).unlink(missing_ok=True)
    else:
        write_secret(p.stage / "node.key", p.key.hex() + "\n")


def _run(argv: list[str], what: str, fix: str, timeout: float = 300) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise StepError(f"{what}: {argv[0]} not found", fix) from None
    except subprocess.TimeoutExpired:
        raise StepError(f"{what}: no answer within {timeout:g} s", fix) from None
    if r.returncode != 0:
        tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-6:])
        raise StepError(f"{what} failed (exit {r.returncode}):\n{tail}", fix)
    return r.stdout


def step_flash(p: Plan, dry: bool) -> list[str]:
    if not p.args.flash:
        return ["skipped: no --flash IMAGE (the board keeps the MicroPython it has)"]
    cmds = ps.esptool_commands(p.board, _port(p), p.args.flash, p.args.erase)
    lines = [" ".join(c) for c in cmds]
    if not dry:
        for c in cmds:
            _run(c, "esptool", "hold BOOT while pressing EN to enter the bootloader, check the "
                 "cable and --port, then resume with --from flash")
    return lines


def _port(p: Plan) -> str:
    if not p.args.port:
        raise StepError("this step needs the board's USB port", "pass --port /dev/ttyUSB0")
    return str(p.args.port)


def step_device(p: Plan, dry: bool) -> list[str]:
    argv = ps.mpremote(_port(p), "exec", ps.PROBE_SCRIPT)
    if dry:
        return [ps.shown(argv)]
    out = _run(argv, f"mpremote on {p.args.port}", "is the board plugged in and not running "
               "a program that holds the REPL? close other terminals on the port; press EN "
               "(reset) and resume with --from device", timeout=60)
    p.device = ps.parse_probe(out)
    d = p.device
    return [f"MicroPython {d['version']} on {d['platform']} (mpy {d['mpy'][0]}.{d['mpy'][1]}), "
            f"{d['free_kb']} KB free on its filesystem"]


def step_compile(p: Plan, dry: bool) -> list[str]:
    if p.firmware == "frozen":
        return ["skipped: the firmware is frozen into this board's image"]
    tool = p.args.mpy_cross or ps.find_mpy_cross()
    version = ps.mpy_cross_version(tool) if not dry else None
    if version and p.device and tuple(p.device["mpy"]) != version[1]:
        raise StepError(
            f"the node runs MicroPython {p.device['version']} (mpy "
            f"{p.device['mpy'][0]}.{p.device['mpy'][1]}) but {tool} is {version[0]} (mpy "
            f"{version[1][0]}.{version[1][1]})",
            "pass --mpy-cross of the node's version, or --flash a matching image")
    sources = ps.firmware_sources(FIRMWARE)
    if dry:
        return [f"{tool} -O2 -o {p.stage}/node/<module>.mpy firmware/node/<module>.py "
                f"({len(sources)} modules)", f"copy firmware/main.py to {p.stage}/main.py"]
    shutil.rmtree(p.stage / "node", ignore_errors=True)  # no module deleted since may linger
    for src in sources:
        rel = src.relative_to(FIRMWARE).with_suffix(".mpy")
        dst = p.stage / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        _run([tool, "-O2", "-o", str(dst), "-s", str(src.relative_to(FIRMWARE)), str(src)],
             f"mpy-cross {src.name}", "fix the module (it does not compile)")
    shutil.copyfile(FIRMWARE / "main.py", p.stage / "main.py")
    return [f"compiled {len(sources)} modules with {tool} ({version[0] if version else '?'})"]


def step_deploy(p: Plan, dry: bool) -> list[str]:
    # a key this tool made: its sequence must start above every number the node id has used
    # (the script only ever raises it). Frames on the node are dropped only where its
    # counters are not this key's: those were sealed under a key being replaced, and the
    # gateway would refuse them forever; frames the node sealed under this key (it booted
    # after a deploy that failed late) are the gateway's to take.
    nvs = ps.key_in_nvs(p.board)
    fresh = (not dry and p.key is not None and _fresh(p, p.key) is not None) or (
        dry and p.args.new_key)
    drop = fresh and not (p.key is not None and _holds(p, p.key))
    start = _seq_start(p) if fresh or dry else None
    script = ps.seq_script(node_config(p)["state_dir"], start.value) if fresh and start else None
    argv = ps.deploy_argv(_port(p), p.stage, p.firmware == "mpy", drop, nvs_key=nvs, seq=script,
                          release=p.release is not None)
    lines = [ps.shown(argv)]
    if dry:
        assert start is not None
        return [*lines, f"{'' if fresh else 'if the key is new: '}its frame sequence starts at "
                f"{start.value} or above: {start.why}"]
    assert p.key is not None
    _stage_key(p)  # the key the key step decided, whatever an earlier run staged
    _stage_release(p)  # likewise the release key (a resumed run skips the config step)
    if nvs:
        write_secret(p.stage / ps.NVS_SCRIPT, ps.nvs_key_script(p.key))
    if fresh:  # from here on a node may boot with it
        (p.stage / FRESH).write_text(ps.key_id(p.key) + " sent\n")
    try:
        out = _run(argv, f"mpremote cp to {p.args.port}", "check the port and that the board's "
                   "filesystem has room (`mpremote df`), then resume with --from deploy",
                   timeout=600)
    finally:
        if nvs:
            (p.stage / ps.NVS_SCRIPT).unlink(missing_ok=True)
    if nvs:
        lines.append(f"the key is now only in {p.args.keys} and in the node's NVS ({ps.NVS_SCRIPT} "
                     f"removed from {p.stage})")
    if start is not None:
        got = ps.parse_seq_report(out)
        if got is None:
            raise StepError(f"the node did not confirm its frame sequence: {out[-300:]!r}",
                            "resume with --from deploy")
        lines.append(f"the new key's frame sequence starts at {got}: " + (
            start.why if got == start.value else f"the node already counted to {got}"))
    return lines


def _seq_start(p: Plan) -> ps.SeqStart:
    """Where a new key's frame sequence starts (gateway high mark + 1, or the clock floor)."""
    mark = None
    if p.queue is not None:
        try:
            mark = ps.gateway_mark(p.queue, p.args.id)
        except ValueError as e:
            raise StepError(str(e), "run this as the gateway's user (`sudo -u lantern "
                            "lantern provision ...`), or drop --gateway-config to start from "
                            "the clock floor; then resume with --from deploy") from None
    try:
        return ps.seq_start(time.time(), mark)
    except ValueError as e:
        raise StepError(str(e), "set this computer's clock (`timedatectl`, NTP), then resume "
                        "with --from deploy") from None


def step_reset(p: Plan, dry: bool) -> list[str]:
    what = f"soft reset at the REPL of {p.args.port} (Ctrl-C, Ctrl-B, Ctrl-D): main.py starts"
    if not dry:
        # from here on the node may have counters under this key: no later run may count
        # on it being fresh
        (p.stage / FRESH).unlink(missing_ok=True)
        ps.soft_reset(_port(p))
    return [what]


def step_verify(p: Plan, dry: bool) -> list[str]:
    link = p.args.link_port or (p.args.port if ps.link_is_console(p.board) else None)
    if link is None:
        return [f"skipped: the node's link is on {ps.link_where(p.board)}; to check it, connect "
                f"a USB-UART there and run `lantern diag node --port <that port> --keys "
                f"{p.args.keys} --id {p.args.id}`"]
    if dry:
        return [f"probe the node on {link} and read its status (COMMAND/REPLY, node key)"]
    assert p.key is not None
    try:
        p.status = asyncio.run(ps.read_status(link, p.args.id, p.key, p.args.timeout))
    except Exception as e:  # the message below says what to check
        raise StepError(f"the node did not answer on {link}: {e}",
                        "watch its console (`mpremote connect PORT repl`) for errors, then "
                        "resume with --from reset") from None
    st = p.status
    return [f"node {st['id']} answers: firmware {st['fw']}, board {st['board']}, MicroPython "
            f"{st.get('mpy')}, every {st['cfg']['interval_ms'] / 1000:g} s, heap "
            f"{st['heap']['free']} B free"]


def step_gateway(p: Plan, dry: bool) -> list[str]:
    return ps.gateway_snippet(p.args.id, p.args.keys, p.args.pole, p.location,
                              p.args.interval).splitlines()


RUNNERS = {"key": step_key, "config": step_config, "flash": step_flash,
           "device": step_device, "compile": step_compile, "deploy": step_deploy,
           "reset": step_reset, "verify": step_verify, "gateway": step_gateway}


def main(args: argparse.Namespace) -> int:
    if args.target == "fleet":
        from lantern.tools.field import fleet

        return fleet.main(args)
    dry = args.dry_run
    t0 = time.monotonic()
    print(f"provisioning {args.id}" + (" (dry run: nothing is changed)" if dry else ""))
    try:
        p = plan(args)
    except StepError as e:
        return _failed("check", e, args)
    print(f"[1/{len(STEPS)}] check: board {p.board['name']} ({p.board['hal']}), firmware "
          f"{p.firmware}, staging in {p.stage}")
    start = STEPS.index(args.start) if args.start else 1
    p.start = start
    if start > STEPS.index("key"):
        args.new_key = False  # the key made by the interrupted run is the one to keep
    for i, name in enumerate(STEPS[1:], start=2):
        if i - 1 < start and name != "key":  # the key is needed by every later step
            print(f"[{i}/{len(STEPS)}] {name}: skipped (--from {args.start})")
            continue
        try:
            lines = RUNNERS[name](p, dry)
        except StepError as e:
            return _failed(name, e, args)
        except OSError as e:  # a file of the stage or the key file: one line, and the resume
            where = f"{e.filename}: " if e.filename else ""
            return _failed(name, StepError(f"{where}{e.strerror or e}", "fix the folder's "
                                           "permissions or free space, then resume"), args)
        print(f"[{i}/{len(STEPS)}] {name}: {lines[0] if lines else ''}")
        for line in lines[1:]:
            print(f"      {line}")
    print(f"done in {time.monotonic() - t0:.1f} s" if not dry else "dry run: nothing changed")
    return 0


def _failed(step: str, e: StepError, args: argparse.Namespace) -> int:
    print(f"lantern provision: step {step} failed: {e.what}", file=sys.stderr)
    print(f"  what to do: {e.fix}", file=sys.stderr)
    if step != "check":
        print(f"  resume with: lantern {resume_command(sys.argv[1:], step)}", file=sys.stderr)
    return 1


def resume_command(argv: list[str], step: str) -> str:
    """The same command line, resuming at `step` (never creating a second new key)."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--from":
            skip = True
            continue
        if a.startswith("--from=") or (a == "--new-key" and STEPS.index(step) > STEPS.index(
                "key")):
            continue
        out.append(a)
    return shlex.join([*out, "--from", step])
