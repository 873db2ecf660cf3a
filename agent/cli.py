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
    return "\n".join(lines)


# Commands whose modules load only when they run: the service (`lantern gateway run`) never
# imports the field tools (rich, esptool, mpremote) or the simulated street.
FIELD = {"diag": ("lantern.tools.field.diag", "inspect a node (serial) or a gateway (its API)"),
         "provision": ("lantern.tools.field.provision",
                       "prepare and flash a node: key, config, firmware"),
         "release": ("lantern.tools.field.release",
                     "release keys and signed update bundles (docs/updates.md)")}


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
