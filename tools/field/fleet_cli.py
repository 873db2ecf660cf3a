"""`lantern gateway rekey` and `lantern gateway group`: the fleet's live operations asked of
the gateway through its registry file (docs/fleet.md).

Both write the registry; the running gateway reads it every 2 s and acts when it next hears
from each node (agent/fleetops.py). Nothing here talks to a node: the commands work with the
gateway stopped, and take effect when it runs.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from lantern.agent.config import load_config
from lantern.agent.errors import ConfigError
from lantern.agent.fleetops import check_settings, parse_assignments
from lantern.agent.registry import REGISTRY_FILE, Registry, RegistryError


def add_parsers(gw: Any) -> None:
    rk = gw.add_parser("rekey", help="rotate nodes' keys live (X25519; docs/fleet.md)")
    who = rk.add_mutually_exclusive_group(required=True)
    who.add_argument("--node", action="append", help="this node (repeatable)")
    who.add_argument("--all", action="store_true", help="every node not revoked")
    rk.add_argument("--config", type=Path, required=True, help="the gateway's config")
    rk.add_argument("--wait", type=float, default=0.0, metavar="S",
                    help="wait up to S seconds for the rotations and print their outcomes")
    gp = gw.add_parser("group", help="group settings pushed to nodes (docs/fleet.md)")
    acts = gp.add_subparsers(dest="group_action", required=True)
    st = acts.add_parser("set", help="set settings of a group (a new config version)")
    st.add_argument("name")
    st.add_argument("settings", nargs="+", metavar="key=value",
                    help="interval_ms, kappa, max_untimed, window, offsets.SENSOR")
    asg = acts.add_parser("assign", help="put nodes in a group")
    asg.add_argument("name", help='the group ("" takes the nodes out of theirs)')
    asg.add_argument("nodes", nargs="+")
    acts.add_parser("list", help="groups, versions, settings and nodes off them")
    for p in acts.choices.values():
        p.add_argument("--config", type=Path, required=True, help="the gateway's config")


def _registry(config: Path) -> Registry:
    cfg = load_config(config)
    path = cfg.state_dir / REGISTRY_FILE
    if not path.exists():
        raise ConfigError(f"{path}: no fleet registry (start the gateway once)")
    try:
        return Registry(path)
    except (OSError, sqlite3.Error) as e:
        raise ConfigError(f"{path}: cannot open ({e})") from None


def rekey_main(args: argparse.Namespace) -> int:
    with _registry(args.config) as reg:
        nodes = args.node or [r.id for r in reg.records() if r.revoked is None]
        try:
            reg.request_rekey(nodes)
        except RegistryError as e:
            print(f"lantern gateway rekey: {e}", file=sys.stderr)
            return 1
        print(f"rotation asked for {len(nodes)} node(s); the gateway runs each when it next "
              "hears from the node")
        if args.wait <= 0:
            return 0
        end = time.monotonic() + args.wait
        while time.monotonic() < end:
            reg.refresh()
            if all(reg.get(n) is not None and reg.get(n).rekey != "requested"  # type: ignore[union-attr]
                   for n in nodes):
                break
            time.sleep(0.5)
        failed = 0
        for n in nodes:
            r = reg.get(n)
            outcome = r.rekey if r is not None else "unknown"
            failed += outcome != "done"
            print(f"{n}: {outcome} (key v{r.key_rotation if r else '?'})")
        return 1 if failed else 0


def group_main(args: argparse.Namespace) -> int:
    with _registry(args.config) as reg:
        try:
            if args.group_action == "set":
                old = reg.group(args.name)
                merged = dict(old.settings) if old else {}
                for k, v in parse_assignments(args.settings).items():
                    merged[k] = {**merged.get(k, {}), **v} if isinstance(v, dict) else v
                g = reg.set_group(args.name, check_settings(merged))
                members = [r.id for r in reg.records() if r.group == g.name]
                print(f"group {g.name}: config version {g.version} {g.settings}; "
                      f"{len(members)} node(s), each updated when the gateway next hears from it")
            elif args.group_action == "assign":
                reg.assign(args.name, args.nodes)
                print(f"{len(args.nodes)} node(s) in group {args.name or '(none)'}")
            else:
                for g in reg.groups():
                    group = [r for r in reg.records() if r.group == g.name]
                    off = [r.id for r in group if r.config_drift]
                    print(f"{g.name}: v{g.version} {g.settings}; {len(group)} node(s)"
                          + (f", off it: {', '.join(off)}" if off else ""))
        except (RegistryError, ConfigError) as e:
            print(f"lantern gateway group: {e}", file=sys.stderr)
            return 1
    return 0
