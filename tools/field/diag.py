"""`lantern diag`: a node over its own link (serial), a gateway over its local API.

Exit status, node: 0 healthy or done, 1 the node answered but reports problems (or a command
failed), 2 no node answered, 3 the node refused our key. Gateway: 0 healthy, 1 degraded,
2 unreachable. `--json` prints the same facts as one JSON document (`live`: one per line).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from lantern.agent.errors import ConfigError, FrameError
from lantern.tools.field import nodelink as nl
from lantern.tools.field.diag_view import (
    jsonable,
    node_report,
    reading_json,
    render_node,
    render_self_test,
)

ACTIONS = ("status", "self-test", "live", "set-interval", "sync-time", "reboot", "clear-faults",
           "identify")
OK, PROBLEMS, NO_ANSWER, REFUSED = 0, 1, 2, 3


def add_parser(sub: Any) -> None:
    d = sub.add_parser("diag", help="inspect a node (serial) or a gateway (its API)")
    ds = d.add_subparsers(dest="target", required=True)
    n = ds.add_parser("node", help="a node over its link port",
                      description="Talk to a node over its own link (the port the gateway "
                      "uses). Never acknowledges its data: unsent frames stay on the node.")
    n.add_argument("action", nargs="?", default="status", choices=ACTIONS)
    n.add_argument("value", nargs="?", help="set-interval: seconds; identify: seconds")
    n.add_argument("--port", help="serial port of the node's link, e.g. /dev/ttyUSB0")
    n.add_argument("--baud", type=int, default=115200)
    n.add_argument("--ble", metavar="ADDRESS_OR_ID", help="reach the node over BLE instead")
    n.add_argument("--id", help="the node id expected (default: whichever node answers)")
    n.add_argument("--keys", type=Path, help="the gateway's key file (keys.toml)")
    n.add_argument("--key-file", type=Path, help="a single node key (64 hex digits)")
    n.add_argument("--timeout", type=float, default=2.0, help="seconds to wait per try")
    n.add_argument("--every", type=float, default=2.0, help="live: seconds between refreshes")
    n.add_argument("--seconds", type=float, default=0, help="live: stop after (0: Ctrl-C)")
    n.add_argument("--json", action="store_true", help="machine-readable output")
    g = ds.add_parser("gateway", help="a gateway over its local API")
    g.add_argument("--url", help="the API (default: from --config, else "
                   "http://127.0.0.1:8470/)")
    g.add_argument("--config", type=Path, help="the gateway's config: URL and token from it")
    g.add_argument("--token-file", type=Path, help="bearer token file ([api] token_file)")
    g.add_argument("--timeout", type=float, default=5.0)
    g.add_argument("--json", action="store_true")


def main(args: argparse.Namespace) -> int:
    if args.target == "gateway":
        return gateway_main(args)
    return asyncio.run(node_main(args))


def _console() -> Any:
    from rich.console import Console

    return Console(highlight=False)


def _spinner(args: argparse.Namespace, what: str) -> Any:
    if args.json or not sys.stdout.isatty():
        return contextlib.nullcontext()
    return _console().status(what)


# ---- gateway ----

def gateway_main(args: argparse.Namespace) -> int:
    from lantern.tools.field import diag_gateway as dg

    url, token_file = args.url, args.token_file
    if args.config:
        try:
            cfg_url, cfg_token = dg.url_from_config(args.config)
        except ConfigError as e:
            print(f"lantern diag: {e}", file=sys.stderr)
            return dg.UNREACHABLE
        url, token_file = url or cfg_url, token_file or cfg_token
    url = url or dg.DEFAULT_URL
    token = None
    if token_file:
        from lantern.agent.config import check_secret_file

        try:  # a token others can read is refused here as the gateway refuses it
            token = check_secret_file(token_file, "API token").strip()
        except ConfigError as e:
            print(f"lantern diag: {e}", file=sys.stderr)
            return dg.UNREACHABLE
    with _spinner(args, f"asking the gateway at {url}…"):
        rep = asyncio.run(dg.diagnose(url, token, args.timeout))
    if args.json:
        print(json.dumps(rep, indent=2))
    else:
        dg.render(rep, _console())
    return int(rep["exit"])


# ---- node ----

def load_node_keys(args: argparse.Namespace) -> dict[str, bytes]:
    """Node id → key from --keys (gateway key file) and --key-file (needs --id)."""
    keys: dict[str, bytes] = {}
    if args.keys:
        from lantern.agent.config import load_keys

        keys.update({k.decode(): v for k, v in load_keys(args.keys).items()})
    if args.key_file:
        from lantern.agent.config import check_secret_file

        text = check_secret_file(args.key_file, "node key").strip()
        try:
            key = bytes.fromhex(text)
        except ValueError:
            key = b""
        if len(key) != 32:
            raise ConfigError(f"{args.key_file}: expected 64 hex digits (a 256-bit key)")
        if not args.id:
            raise ConfigError(f"{args.key_file}: say which node it belongs to with --id")
        keys[args.id] = key
    return keys


def transport(args: argparse.Namespace) -> nl.Transport:
    if args.ble:
        from lantern.tools.field.diag_ble import BleTransport

        return BleTransport(args.ble)
    if not args.port:
        raise nl.DiagError("say where the node is: --port /dev/ttyUSB0 (its link UART)")
    return nl.SerialTransport(args.port, args.baud)


async def node_main(args: argparse.Namespace) -> int:
    out = _Out(args)
    try:
        if args.action not in ("status", "self-test", "live"):
            _command(args)  # the action's value is checked before the port is opened
        keys = load_node_keys(args)
        t = transport(args)
    except (ConfigError, nl.DiagError) as e:
        return out.fail(NO_ANSWER, str(e))
    try:
        await t.open()
    except nl.DiagError as e:
        return out.fail(NO_ANSWER, str(e))
    s = nl.NodeSession(t, keys, args.id, timeout=args.timeout)
    try:
        with _spinner(args, f"looking for a node on {t.name}…"):
            await s.probe()
        if args.action == "live":
            return await live(s, args, out)
        with _spinner(args, "asking the node…"):
            return await run_action(s, args, out)
    except nl.Refused as e:
        return out.fail(REFUSED, str(e))
    except nl.DiagError as e:
        return out.fail(NO_ANSWER, str(e))
    except FrameError as e:
        return out.fail(PROBLEMS, f"the node's answer was malformed: {e}")
    finally:
        await t.close()


class _Out:
    """JSON or rich output, and the error line either way."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.json = args.json
        self.args = args

    def fail(self, code: int, msg: str) -> int:
        if self.json:
            print(json.dumps({"ok": False, "exit": code, "error": msg}))
        else:
            print(f"lantern diag: {msg}", file=sys.stderr)
        return code

    def emit(self, doc: dict[str, Any], human: Any) -> None:
        if self.json:
            print(json.dumps(doc), flush=True)
        else:
            _console().print(human)


async def snapshot(s: nl.NodeSession, tests: list[dict[str, Any]] | None = None
                   ) -> dict[str, Any]:
    """Status + the newest sealed pack, as one report."""
    assert s.identity is not None
    t0 = time.time()
    code, st, rtt = await s.command(nl.OP_STATUS)
    t1 = time.time()
    if code != 0 or not isinstance(st, dict):
        raise nl.DiagError(f"status failed: {nl.CODES.get(code, code)}: {st}")
    offset = (st.get("clock") or {}).get("now_ms", 0) - (t0 + t1) / 2 * 1000
    latest = None
    code, res, _ = await s.command(nl.OP_LATEST)
    if code == 0 and isinstance(res, dict) and res.get("data"):
        try:
            latest = nl.decode_data(res["data"], s.keys)
        except FrameError as e:
            st.setdefault("faults", []).append(["latest_pack", 1, f"does not decode: {e}"])
    if latest is None and s.readings:
        latest = s.readings[-1]  # seen on the line while we asked
    port = getattr(s.t, "name", "?")
    rep = node_report(port, s.identity, st, rtt, offset, latest, tests)
    rssi = getattr(s.t, "rssi", None)  # BLE: as heard in the node's advert
    if rssi is not None:
        rep["status"]["link"]["rssi"] = rssi
    return rep


SELF_TEST_S = 30.0  # a slow sensor holds the node up to one conversion period (SCD4x: 5 s)


async def self_test(s: nl.NodeSession) -> list[dict[str, Any]]:
    """One sensor per command: small answers for a node short of RAM, and progress to show."""
    code, st, _ = await s.command(nl.OP_STATUS)
    if code != 0:
        raise nl.DiagError(f"status failed: {nl.CODES.get(code, code)}: {st}")
    tests: list[dict[str, Any]] = []
    for i, sensor in enumerate(st.get("sensors") or []):
        name = sensor[0] if isinstance(sensor, list) else str(sensor)
        for _ in range(2):  # once more if the node was short of memory mid-cycle
            # one try each: a repeat would only queue a second test behind the first
            code, res, _ = await s.command(nl.OP_SELF_TEST, {1: i}, timeout=SELF_TEST_S,
                                           retries=1)
            if code == 0 or "MemoryError" not in str(res):
                break
        if code == 0:
            tests += res["sensors"]
        else:
            tests.append({"i": i, "name": name, "ok": False, "values": None, "raw": None,
                          "ms": None, "error": f"not tested: {nl.CODES.get(code, code)}: "
                          f"{(res or {}).get('error', res)}"})
    return tests


async def run_action(s: nl.NodeSession, args: argparse.Namespace, out: _Out) -> int:
    a = args.action
    node = s.node_id
    if a == "status":
        rep = await snapshot(s)
        out.emit(rep, render_node(rep))
        return OK if rep["healthy"] else PROBLEMS
    if a == "self-test":
        tests = await self_test(s)
        ok = all(t.get("ok") for t in tests)
        out.emit({"node": node, "self_test": jsonable(tests), "ok": ok},
                 render_self_test(jsonable(tests)))
        return OK if ok else PROBLEMS
    op, cmd_args, says = _command(args)
    code, res, rtt = await s.command(op, cmd_args)
    ok = code == 0
    doc = {"node": node, "action": a, "ok": ok, "code": code, "result": jsonable(res),
           "rtt_ms": round(rtt * 1000, 1)}
    from rich.text import Text  # the node's answer is text, never rich markup

    if ok:
        try:
            said = says(res)
        except (KeyError, TypeError, ValueError):  # done, but an answer of another shape
            said = f"done: {jsonable(res)}"
        human = Text.assemble(("✓", "green"), f" {node}: {said}")
    else:
        human = Text.assemble(
            ("✗", "red"), f" {node}: {a} failed: {nl.CODES.get(code, code)}: {jsonable(res)}")
    out.emit(doc, human)
    return OK if ok else PROBLEMS


def _command(args: argparse.Namespace) -> tuple[int, dict[int, Any], Any]:
    a, v = args.action, args.value
    if a == "set-interval":
        try:
            ms = round(float(v or "") * 1000)
        except (ValueError, OverflowError):  # (round(inf) overflows; nan is a ValueError)
            raise nl.DiagError("set-interval needs seconds, e.g. `set-interval 60`") from None
        return (nl.OP_SET_INTERVAL, {1: ms},
                lambda r: f"sampling every {r['interval_ms'] / 1000:g} s")
    if a == "sync-time":
        return (nl.OP_SYNC_TIME, {1: time.time_ns() // 1_000_000},
                lambda r: f"clock set (it was {(r['was_ms'] - r['now_ms']) / 1000:+.3f} s off)")
    if a == "identify":
        try:
            s = int(v or 10)
        except ValueError:
            raise nl.DiagError("identify takes whole seconds, e.g. `identify 30`") from None
        return nl.OP_IDENTIFY, {1: s}, lambda r: f"identifying for {r['identify_s']} s " \
            f"({'LED blinking' if r['how'] == 'led' else 'on its console: no LED on this board'})"
    if a == "reboot":
        return nl.OP_REBOOT, {}, lambda r: "rebooting"
    return nl.OP_CLEAR_FAULTS, {}, lambda r: f"{r['cleared']} fault(s) cleared"


async def live(s: nl.NodeSession, args: argparse.Namespace, out: _Out) -> int:
    """Refresh status and readings every --every s; DATA frames on the line are shown too."""
    seen: list[dict[str, Any]] = []
    s.on_reading = lambda r: seen.append(reading_json(r))
    stop = time.monotonic() + args.seconds if args.seconds else None
    rep: dict[str, Any] = {}
    ctx: Any = contextlib.nullcontext()
    if not args.json:
        from rich.live import Live

        ctx = Live(console=_console(), auto_refresh=False)
    with ctx as view:
        while stop is None or time.monotonic() < stop:
            rep = await snapshot(s)
            rep["t"] = time.time()
            rep["seen_on_line"] = seen[:]
            seen.clear()
            if args.json:
                print(json.dumps(rep), flush=True)
            else:
                view.update(render_node(rep), refresh=True)
            wait = args.every if stop is None else min(args.every, stop - time.monotonic())
            if wait > 0:
                await s.watch(wait)
    return OK if rep.get("healthy", False) else PROBLEMS
