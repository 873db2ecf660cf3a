"""`lantern` command line: gateway, diag, provision, sim, demo."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any

from lantern import __version__

from .errors import ConfigError


def describe(cfg: Any) -> str:
    """What a checked config will do, in a few lines for the operator."""
    from .config import shown_url
    from .plugins import link, sink

    sinks = [f"{name} → {shown_url(sink(name).where(s))}" for name, s in cfg.sinks.items()]
    links = [link(name).where(c) for name, cs in cfg.links.items() for c in cs]
    api = cfg.api
    where = (f"http://{api.host}:{api.port}/" if api.enabled else "disabled")
    lines = [f"  state:   {cfg.state_dir}", f"  keys:    {cfg.keys_file}",
             f"  links:   {', '.join(links)}",
             f"  sinks:   {'; '.join(sinks)}",
             f"  status page and API: {where}"
             + (f" (bearer token from {api.token_file})" if api.token_file else ""),
             f"  history: {cfg.history.keep_hours:g} h, at most {cfg.history.max_samples} "
             "samples"]
    if (q := getattr(cfg, "queue", None)) is not None:
        lines.insert(4, f"  queue:   at most {q.max_mb:g} MiB on disk, then {q.policy}")
    if (u := getattr(cfg, "updates", None)) is not None:
        canary = ", ".join(u.canary) if isinstance(u.canary, tuple) else f"the first {u.canary}"
        lines.append(f"  updates: bundles signed by {u.release_key}; canary {canary}, then "
                     f"{u.step} at a time, {u.node_timeout_s:g} s per node")
    else:
        lines.append("  updates: no [updates]: rollouts refused")
    if (c := getattr(cfg, "clock", None)) is not None:
        lines.append(f"  clock:   mode {c.mode}: " + (
            "nodes get the time only while the kernel says it is synchronised"
            if c.mode == "kernel" else "nodes always get this machine's time"))
    health = getattr(cfg, "health", None)
    lines.append(health.describe() if health is not None
                 else "  health:  no [health]: no lamp faults, energy or alerts")
    return "\n".join(lines)


# Commands whose modules load only when they run: the service (`lantern gateway run`) never
# imports the field tools (rich, esptool, mpremote) or the simulated street.
FIELD = {"diag": ("lantern.tools.field.diag", "inspect a node (serial) or a gateway (its API)"),
         "provision": ("lantern.tools.field.provision",
                       "prepare and flash a node: key, config, firmware"),
         "release": ("lantern.tools.field.release",
                     "release keys and signed update bundles (docs/updates.md)")}


def _rollout_parser(gw: Any) -> None:
    ro = gw.add_parser("rollout", help="a staged update of the nodes (docs/rollout.md)",
                       description="Start, follow or halt a staged rollout on the running "
                       "gateway, through its local API (its [api] token rules apply).")
    acts = ro.add_subparsers(dest="rollout", required=True)
    start = acts.add_parser("start", help="send a signed bundle: canary first, then steps")
    start.add_argument("bundle", type=Path, help="the bundle `lantern release build` made")
    start.add_argument("--canary", metavar="N|IDS", help="how many nodes go first, or which "
                       "(comma-separated ids); default: [updates] canary")
    start.add_argument("--step", type=int, metavar="K", help="nodes at once after the "
                       "canary; default: [updates] step")
    start.add_argument("--nodes", metavar="IDS", help="only these nodes (comma-separated)")
    acts.add_parser("status", help="where the rollout stands, node by node")
    halt = acts.add_parser("halt", help="stop it: no further node gets the bundle")
    halt.add_argument("--reason", help="one line, shown with the halted rollout")
    for p in acts.choices.values():
        p.add_argument("--config", type=Path, help="the gateway's config: API URL and token")
        p.add_argument("--url", help="the API (default: from --config, else "
                       "http://127.0.0.1:8470/)")
        p.add_argument("--token-file", type=Path, help="bearer token file ([api] token_file)")
        p.add_argument("--timeout", type=float, default=30.0)
        p.add_argument("--json", action="store_true", help="the API's answer as JSON")


def rollout_main(args: Any) -> int:
    """0: done (status: not halted); 1: the gateway refused, or the rollout halted;
    2: no gateway API answered (or a config or token file it would refuse)."""
    import asyncio
    import json

    import aiohttp

    from lantern.tools.field import diag_gateway as dg
    from lantern.tools.field.diag_view import rollout_table

    url, token = dg.api_target(args.url, args.config, args.token_file)
    base = url if url.endswith("/") else url + "/"
    kw: dict[str, Any] = {}
    if args.rollout == "start":
        try:
            kw["data"] = args.bundle.read_bytes()
        except OSError as e:
            raise ConfigError(f"{args.bundle}: {e.strerror}") from None
        kw["headers"] = {"Content-Type": "application/octet-stream"}
        kw["params"] = {k: str(v) for k, v in (("canary", args.canary), ("step", args.step),
                                               ("nodes", args.nodes)) if v is not None}
    elif args.rollout == "halt":
        kw["json"] = {"reason": args.reason} if args.reason else {}
    method, path = {"start": ("POST", "api/rollout"), "status": ("GET", "api/rollout"),
                    "halt": ("POST", "api/rollout/halt")}[args.rollout]

    async def call() -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        t = aiohttp.ClientTimeout(total=args.timeout)
        async with aiohttp.ClientSession(timeout=t, headers=headers) as s:
            return await dg.request(s, method, base + path, **kw)

    try:
        code, body = asyncio.run(call())
    except dg.Unreachable as e:
        print(f"lantern gateway rollout: {e}", file=sys.stderr)
        return 2
    except (aiohttp.ClientError, TimeoutError, OSError) as e:
        print(f"lantern gateway rollout: no gateway API at {base} ({type(e).__name__}: "
              f"{e}): is `lantern gateway run` up, with [api] enabled?", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(body, indent=2))
    if code >= 300:
        if not args.json:
            print(f"lantern gateway rollout {args.rollout}: {body.get('error', body)}",
                  file=sys.stderr)
        return 1
    ro = body.get("rollout")
    if not args.json:
        from rich.console import Console

        if ro is None:
            print("no rollout yet" + ("" if body.get("configured") else
                                      " (this gateway has no [updates] section)"))
        else:
            Console(highlight=False).print(rollout_table(ro))
    return 1 if ro is not None and ro["state"] == "halted" and args.rollout != "halt" else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="lantern", description="Lantern streetlight sensing network")
    p.add_argument("--version", action="version", version=f"lantern {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    gw = sub.add_parser("gateway", help="the gateway service").add_subparsers(dest="action",
                                                                              required=True)
    run = gw.add_parser("run", help="run the gateway")
    run.add_argument("--config", type=Path, required=True)
    chk = gw.add_parser("check-config", help="validate a config and its key file, then exit")
    chk.add_argument("--config", type=Path, required=True)
    _rollout_parser(gw)
    if argv[:2] == ["gateway", "nodes"]:  # the fleet registry (docs/fleet.md)
        from lantern.tools.field.fleet import nodes_parser

        nodes_parser(gw)
    else:
        gw.add_parser("nodes", help="the fleet registry: list, import, revoke")
    if argv[:2] in (["gateway", "rekey"], ["gateway", "group"]):  # live fleet operations
        from lantern.tools.field.fleet_cli import add_parsers as fleet_ops_parsers

        fleet_ops_parsers(gw)
    else:
        gw.add_parser("rekey", help="rotate nodes' keys live (docs/fleet.md)")
        gw.add_parser("group", help="group settings pushed to nodes (docs/fleet.md)")

    demo = sub.add_parser("demo", help="simulated nodes on MicroPython → gateway → upstream")
    demo.add_argument("--nodes", type=int, default=3)
    demo.add_argument("--interval", type=float, default=2.0, help="seconds between samples")
    demo.add_argument("--seconds", type=float, default=0, help="stop after this long (0: Ctrl-C)")
    demo.add_argument("--dir", type=Path, default=Path(".build/demo"))

    sim = sub.add_parser(
        "sim", help="simulated nodes on MicroPython behind serial ports, for your own gateway",
        description="Start N simulated nodes on pseudo-terminals and write their keys file and "
        "the [[links.serial]] tables a gateway needs into --dir; no gateway is started. "
        "Runs until Ctrl-C (or --seconds).")
    sim.add_argument("--nodes", type=int, default=3)
    sim.add_argument("--interval", type=float, default=60.0, help="seconds between samples")
    sim.add_argument("--seconds", type=float, default=0, help="stop after this long (0: Ctrl-C)")
    sim.add_argument("--dir", type=Path, default=Path(".build/sim"))

    for name, (module, help_line) in FIELD.items():
        if argv[:1] == [name]:  # the command asked for: its module defines its arguments
            importlib.import_module(module).add_parser(sub)
        else:
            sub.add_parser(name, help=help_line)

    args = p.parse_args(argv)
    from .logsetup import setup as setup_logging

    setup_logging("INFO")  # journald-style lines under systemd, timestamps from a shell
    try:
        if args.cmd == "gateway" and args.action == "run":
            from .gateway import main as gateway_main

            try:
                gateway_main(args.config)
            except (ConfigError, KeyboardInterrupt):
                raise
            except Exception as e:  # a bug of ours: one line for the journal, details at debug
                import logging

                logging.getLogger("lantern.gateway").debug("stopped on", exc_info=True)
                logging.getLogger("lantern.gateway").critical(
                    "gateway stopped on an unexpected error: %r; this is a bug: please report "
                    "it with the log (log_level = \"debug\" shows where)", e)
                return 1
        elif args.cmd == "gateway" and args.action == "rollout":
            return rollout_main(args)
        elif args.cmd == "gateway" and args.action == "nodes":
            from lantern.tools.field.fleet import nodes_main

            return nodes_main(args)
        elif args.cmd == "gateway" and args.action in ("rekey", "group"):
            from lantern.tools.field import fleet_cli

            return fleet_cli.rekey_main(args) if args.action == "rekey" \
                else fleet_cli.group_main(args)
        elif args.cmd == "gateway" and args.action == "check-config":
            from .config import load_config, load_keys
            from .preflight import check

            cfg = load_config(args.config)
            keys = load_keys(cfg.keys_file)
            found = check(cfg)  # what `run` needs from this machine
            for line in found.errors:
                print(f"lantern: {line}", file=sys.stderr)
            if found.errors:
                return 2
            links = "".join(f"{len(cs)} {name} links, " for name, cs in cfg.links.items())
            print(f"{args.config}: OK ({links}{len(keys)} node keys)")
            print(describe(cfg))
            for line in found.warnings:
                print(f"  warning: {line}")
            for line in found.unchecked:
                print(f"  not checked: {line}")
        elif args.cmd in FIELD:
            return int(importlib.import_module(FIELD[args.cmd][0]).main(args))
        elif args.cmd == "sim":
            from lantern.tools.street.command import main as sim_main

            return sim_main(args.nodes, args.interval, args.seconds, args.dir)
        elif args.cmd == "demo":
            from lantern.tools.street.demo import main as demo_main

            return demo_main(args.nodes, args.interval, args.seconds, args.dir)
    except ConfigError as e:
        from .logsetup import under_journald

        # under systemd the journal files it as an error (<3>), like every other line
        print(("<3>" if under_journald() else "") + f"lantern: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
