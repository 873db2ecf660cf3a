"""`lantern provision fleet` and `lantern gateway nodes`: many nodes, one registry (docs/fleet.md).

provision fleet --csv nodes.csv runs `lantern provision node` for each row (columns id, pole,
location "lat,lon", board, port, group, link_port; port empty: the installer plugs each board
in when asked). Each node's key goes into a fragment beside the CSV (nodes.fragment.toml, 0600),
never into the gateway's key file; a progress file beside it (nodes.progress.json, written
atomically) says which rows are done and which row a run was busy with, so a run resumed after
a failure, Ctrl-C or a kill does not redo finished rows and starts the broken one from its
first step.

gateway nodes import FRAGMENT merges finished nodes into the gateway's key file and registry
under a lock, entry by entry: another node's line is never rewritten, and a fragment that
clashes with what the gateway knows (a retired key, another pole, an older key) is refused
whole, with nothing written.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import fcntl
import json
import os
import sqlite3
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lantern.agent.config import NODE_ID, load_config, load_keys, write_secret
from lantern.agent.configfile import toml_string
from lantern.agent.errors import ConfigError
from lantern.agent.registry import REGISTRY_FILE, Registry, RegistryError, key_id

COLUMNS = ("id", "pole", "location", "board", "port", "group", "link_port")
PASS = ("interval", "flash", "erase", "firmware", "mpy_cross", "release_pub", "gateway_config",
        "timeout", "lock_repl")


@dataclass
class Row:
    line: int
    id: str
    pole: str
    location: str
    board: str
    port: str
    group: str = ""  # the node's configuration group (docs/fleet.md)
    link_port: str = ""  # the node's link UART as seen from here: the verify step reads it


@dataclass
class Progress:
    """nodes.progress.json: done rows (id → key id, when), the last failure of each, and the
    row a run is busy with (`running`: still there after a kill, gone once the row ends)."""

    path: Path
    done: dict[str, dict[str, Any]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    running: dict[str, Any] | None = None

    @classmethod
    def load(cls, path: Path) -> Progress:
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            return cls(path)
        except ValueError as e:
            raise ConfigError(f"{path}: not the progress file this tool writes ({e}); move "
                              "it away to start over") from None
        return cls(path, dict(d.get("done", {})), dict(d.get("failed", {})), d.get("running"))

    def save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump({"done": self.done, "failed": self.failed, "running": self.running}, f,
                      indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


def add_parser(sub: Any) -> None:
    f = sub.add_parser("fleet", help="provision many nodes from a CSV (docs/fleet.md)",
                       description="Provision every row of a CSV (columns: id, pole, location "
                       "as \"lat,lon\", board, port, group, link_port) as `lantern provision "
                       "node` would, keys into a fragment for `lantern gateway nodes import`. "
                       "Resumable: rows done are skipped, a row broken off (a failure, Ctrl-C, "
                       "a kill) starts again from its first step.")
    f.add_argument("--csv", type=Path, required=True, help="the nodes, one row each")
    f.add_argument("--fragment", type=Path, help="where the keys go (default: beside the "
                   "CSV, NAME.fragment.toml)")
    f.add_argument("--port", help="the USB port for rows without one: plug each board in "
                   "there when asked")
    f.add_argument("--wait-port", action="store_true", help="for rows without a port: wait "
                   "for a new serial port to appear (the board plugged in) and use it")
    f.add_argument("--interval", type=float, default=60.0)
    f.add_argument("--flash", type=Path, metavar="IMAGE")
    f.add_argument("--erase", action="store_true")
    f.add_argument("--firmware", choices=("mpy", "frozen"))
    f.add_argument("--mpy-cross")
    f.add_argument("--release-pub", type=Path, metavar="NAME.pub.pem")
    f.add_argument("--gateway-config", type=Path, metavar="TOML")
    f.add_argument("--lock-repl", action="store_true")
    f.add_argument("--timeout", type=float, default=60.0)
    f.add_argument("--out", type=Path, help="staging folder (one subfolder per node)")
    f.add_argument("--dry-run", action="store_true", help="print every row's steps, change "
                   "nothing")


def read_rows(path: Path) -> list[Row]:
    """The CSV's rows, every one checked before anything runs (ConfigError: which line)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    reader = csv.DictReader(text.splitlines())
    missing = [c for c in COLUMNS[:4] if c not in (reader.fieldnames or [])]
    if missing:
        raise ConfigError(f"{path}: no column {', '.join(missing)}; the header is "
                          f"{','.join(COLUMNS)} (port, group and link_port may be left out)")
    rows: list[Row] = []
    seen: dict[str, int] = {}
    for i, r in enumerate(reader, start=2):
        row = Row(i, *((r.get(c) or "").strip() for c in COLUMNS))
        if not NODE_ID.match(row.id):
            raise ConfigError(f"{path} line {i}: id {row.id!r}: 1-32 letters, digits, '.', "
                              "'_' or '-'")
        if row.id in seen:
            raise ConfigError(f"{path} line {i}: {row.id} is on line {seen[row.id]} too")
        seen[row.id] = i
        if not row.board:
            raise ConfigError(f"{path} line {i}: {row.id}: no board")
        if row.location:
            try:
                lat, lon = (float(x) for x in row.location.split(","))
            except ValueError:
                raise ConfigError(f"{path} line {i}: location {row.location!r}: expected "
                                  "\"lat,lon\" (quoted in the CSV)") from None
            if not (-90 <= lat <= 90 and -180 <= lon <= 180):
                raise ConfigError(f"{path} line {i}: location {row.location!r}: out of range")
        rows.append(row)
    return rows


def ports() -> set[str]:
    """Serial ports present now."""
    from serial.tools import list_ports

    return {p.device for p in list_ports.comports()}


def _port_for(row: Row, args: argparse.Namespace, dry: bool) -> str:
    if row.port:
        return row.port
    if dry:
        return args.port or "PORT"
    if args.wait_port:
        before = ports()
        print(f"  plug in the board for {row.id} (pole {row.pole or '?'}): waiting for a new "
              "serial port ...", flush=True)
        while not (new := ports() - before):
            time.sleep(0.5)
        return sorted(new)[0]
    if args.port:
        input(f"  plug in the board for {row.id} (pole {row.pole or '?'}) on {args.port}, "
              "then press Enter ")
        return str(args.port)
    raise ConfigError(f"line {row.line}: {row.id} has no port: give --port or --wait-port")


def node_argv(row: Row, port: str, fragment: Path, args: argparse.Namespace) -> list[str]:
    argv = ["--board", row.board, "--id", row.id, "--port", port, "--keys", str(fragment)]
    if row.pole:
        argv += ["--pole", row.pole]
    if row.location:
        argv += ["--location", row.location]
    if row.link_port:
        argv += ["--link-port", row.link_port]
    if args.out:
        argv += ["--out", str(args.out / row.id)]
    for name in PASS:
        v = getattr(args, name)
        flag = "--" + name.replace("_", "-")
        if v is True:
            argv.append(flag)
        elif v not in (None, False) and not (name == "interval" and v == 60.0) \
                and not (name == "timeout" and v == 60.0):
            argv += [flag, str(v)]
    if args.dry_run:
        argv.append("--dry-run")
    return argv


def main(args: argparse.Namespace) -> int:
    rows = read_rows(args.csv)
    base = args.csv.with_suffix("")
    fragment = args.fragment or base.with_name(base.name + ".fragment.toml")
    progress = Progress.load(base.with_name(base.name + ".progress.json"))
    if args.dry_run:
        print(f"fleet: {len(rows)} nodes from {args.csv}; keys into {fragment} (dry run: "
              "nothing is changed)")
        return _run_rows(rows, fragment, progress, args)
    with run_lock(progress.path):
        progress = Progress.load(progress.path)  # as the run before this one left it
        print(f"fleet: {len(rows)} nodes from {args.csv}; keys into {fragment}; progress in "
              f"{progress.path}")
        if progress.running:  # the last run was killed (or lost power) in the middle of a row
            r = progress.running
            print(f"{r['id']}: the last run stopped while provisioning it (started "
                  f"{_when(r['started'])}, on {r.get('port') or '?'}) and never finished it: "
                  "it is provisioned again from its first step")
            progress.failed[r["id"]] = "interrupted: the run was killed"
            progress.running = None
            progress.save()
        return _run_rows(rows, fragment, progress, args)


@contextlib.contextmanager
def run_lock(progress: Path) -> Iterator[None]:
    """One run per CSV at a time (two terminals on one fleet would share its progress file);
    the kernel drops the lock of a killed run."""
    lock = progress.with_name("." + progress.name + ".lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"{progress}: another `lantern provision fleet` is running on "
                              "this CSV; let it finish (or stop it), then run this again"
                              ) from None
        yield
    finally:
        os.close(fd)


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _run_rows(rows: list[Row], fragment: Path, progress: Progress,
              args: argparse.Namespace) -> int:
    from lantern.tools.field import provision as pv

    dry = args.dry_run
    report: list[tuple[str, str, str]] = []
    parser = argparse.ArgumentParser(prog="lantern")
    pv.add_parser(parser.add_subparsers(dest="cmd"))
    stopped = ""  # the row Ctrl-C broke off: the rows after it are not started
    for n, row in enumerate(rows, 1):
        if stopped:
            report.append((row.id, "not started", ""))
            continue
        print(f"\n== {n}/{len(rows)} {row.id} (line {row.line}, pole {row.pole or '-'}) ==")
        if row.id in progress.done and not dry:
            report.append((row.id, "done before", progress.done[row.id]["key_id"]))
            print(f"  done before (key {progress.done[row.id]['key_id']}): skipped")
            continue
        t0 = time.monotonic()
        try:
            report.append(_row(row, n, fragment, progress, args, parser, pv))
        except KeyboardInterrupt:
            stopped = row.id
            took = f"{time.monotonic() - t0:.1f} s"
            print(f"\n  interrupted (Ctrl-C) after {took}")
            report.append((row.id, f"INTERRUPTED after {took}", ""))
            if not dry:
                progress.running = None
                progress.failed[row.id] = "interrupted (Ctrl-C)"
                progress.save()
    print("\nfleet report:")
    for node, result, kid in report:
        print(f"  {node:<32} {result}" + (f" (key {kid})" if kid else ""))
    failed = sum(1 for _, r, _ in report if r.startswith(("FAILED", "INTERRUPTED")))
    if not dry:
        done = sum(1 for _, r, _ in report if r.startswith("done"))
        print(f"{done}/{len(report)} done" + (
            f"; {failed} failed: run the same command again to retry them (done rows are "
            "skipped)" if failed and not stopped else "") + (
            f"; interrupted at {stopped}: run the same command again to go on (done rows "
            f"are skipped, {stopped} starts again from its first step)" if stopped else "") +
            f"\nthen, on the gateway: lantern gateway nodes import {fragment} --config "
            "/etc/lantern/gateway.toml")
    return 130 if stopped else 1 if failed else 0


def _row(row: Row, n: int, fragment: Path, progress: Progress, args: argparse.Namespace,
         parser: argparse.ArgumentParser, pv: Any) -> tuple[str, str, str]:
    """Provision one row: (id, result, key id). The progress file names the row while it runs:
    a run killed in the middle of it leaves that behind for the next run to see."""
    dry = args.dry_run
    t0 = time.monotonic()
    try:
        port = _port_for(row, args, dry)
    except ConfigError as e:
        progress.failed[row.id] = str(e)
        progress.save()
        return row.id, f"FAILED: {e}", ""
    if not dry:
        progress.running = {"id": row.id, "row": n, "port": port, "started": time.time()}
        progress.save()
    node_args = parser.parse_args(["provision", "node", *node_argv(row, port, fragment, args)])
    code = pv.main(node_args)
    took = f"{time.monotonic() - t0:.1f} s"
    if dry:
        return row.id, "dry run" if code == 0 else "FAILED (dry run)", ""
    progress.running = None
    if code != 0:
        progress.failed[row.id] = "see the output above"
        progress.save()
        return row.id, f"FAILED after {took}", ""
    # under the key file's lock (as `nodes import` takes it): a run on another CSV with the
    # same --fragment must not write its key between this read and this write, and lose it
    with locked(fragment):
        kid = key_id(load_keys(fragment)[row.id.encode()])
        add_meta(fragment, row, kid, args.interval)
    progress.done[row.id] = {"key_id": kid, "at": time.time(), "port": port}
    progress.failed.pop(row.id, None)
    progress.save()
    return row.id, f"done in {took}", kid


def add_meta(fragment: Path, row: Row, kid: str, interval_s: float,
             provisioned: float | None = None) -> None:
    """The node's [meta."ID"] table in the fragment (replacing an earlier one)."""
    text = fragment.read_text()
    doc = tomllib.loads(text)
    meta = dict(doc.get("meta", {}))
    meta[row.id] = {"pole": row.pole, "board": row.board, "key_id": kid,
                    "provisioned": time.time() if provisioned is None else provisioned,
                    "interval_s": interval_s, **({"group": row.group} if row.group else {}),
                    **({"location": [float(x) for x in row.location.split(",")]}
                       if row.location else {})}
    head = text.split("\n[meta.", 1)[0].rstrip("\n")
    tables = [f"\n[meta.{toml_string(n)}]\n" + "".join(
        f"{k} = {_toml(v)}\n" for k, v in m.items()) for n, m in sorted(meta.items())]
    new = head + "\n" + "".join(tables)
    if tomllib.loads(new).get("nodes") != doc.get("nodes"):
        raise ConfigError(f"{fragment}: the node tables could not be written beside the keys")
    write_secret(fragment, new)


def _toml(v: Any) -> str:
    if isinstance(v, str):
        return toml_string(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return repr(float(v)) if isinstance(v, float) else str(v)


# ---- the gateway side: lantern gateway nodes [list|import|revoke]


@contextlib.contextmanager
def locked(keys_file: Path) -> Iterator[None]:
    """The key file's merge lock: one import at a time."""
    lock = keys_file.with_name("." + keys_file.name + ".lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def import_fragment(fragment: Path, keys_file: Path, registry: Registry,
                    only: list[str] | None = None, replace: bool = False) -> list[str]:
    """Merge the fragment's finished nodes (its [meta] tables; a plain key file: every key,
    or `only`) into the gateway's key file and registry. RegistryError on any clash, with
    nothing written. What was done, one line each."""
    from lantern.tools.field.provision_steps import merge_key

    try:
        keys = load_keys(fragment)
        meta = tomllib.loads(fragment.read_text()).get("meta", {})
    except (ConfigError, tomllib.TOMLDecodeError) as e:
        raise RegistryError(f"{fragment}: {e}") from None
    nodes = sorted(meta) if meta else sorted(k.decode() for k in keys)
    if only:
        unknown = [n for n in only if n not in nodes]
        if unknown:
            raise RegistryError(f"{fragment} has no finished node {', '.join(unknown)}")
        nodes = only
    with locked(keys_file):
        text = keys_file.read_text() if keys_file.exists() else None
        have = load_keys(keys_file) if text is not None else {}
        registry.refresh()
        clashes, plan = [], []
        for node in nodes:
            key = keys.get(node.encode())
            m = meta.get(node, {})
            if key is None:
                clashes.append(f"{node}: no key in {fragment}")
                continue
            kid = key_id(key)
            if m and m.get("key_id") != kid:
                clashes.append(f"{node}: its [meta] names key {m.get('key_id')}, its key is "
                               f"{kid}: provision it again")
                continue
            rec = registry.get(node)
            cur = have.get(node.encode())
            if rec is not None and kid in rec.retired:
                clashes.append(f"{node}: key {kid} was retired here (the node was provisioned "
                               "again since): an old file")
            elif rec is not None and rec.pole and m.get("pole") and rec.pole != m["pole"] \
                    and not replace:
                clashes.append(f"{node}: at pole {rec.pole} here, at pole {m['pole']} in "
                               f"{fragment} (two nodes with one id? --replace if it moved)")
            elif cur is not None and cur != key and not (
                    replace or (only and node in only)
                    or (rec and m.get("provisioned", 0) > (rec.provisioned or 0))):
                clashes.append(f"{node}: the gateway has another key ({key_id(cur)}), newer "
                               f"than this one as far as it can tell (--node {node} to take "
                               "this one)")
            else:
                plan.append((node, key, kid, m, cur))
        if clashes:
            raise RegistryError(f"{fragment}: refused, nothing written:\n  "
                                + "\n  ".join(clashes))
        out = []
        for node, key, _kid, _m, cur in plan:
            if cur == key:
                continue
            text = merge_key(text, str(keys_file), node, key,
                             retired=None if cur is None else "re-provisioned (nodes import)")
        if text is not None and any(cur != key for _, key, _, _, cur in plan):
            write_secret(keys_file, text)
        for node, key, kid, m, cur in plan:
            rec = registry.get(node)
            loc = m.get("location") or ([rec.lat, rec.lon] if rec else [None, None])
            registry.provisioned(node, kid, pole=m.get("pole", rec.pole if rec else ""),
                                 lat=loc[0], lon=loc[1],
                                 board=m.get("board", rec.board if rec else ""),
                                 interval_s=float(m.get("interval_s", rec.interval_s if rec
                                                        else 60.0)), group=m.get("group"))
            out.append(f"{node}: " + ("already here" if cur == key and rec and rec.key_id == kid
                                      else f"key {kid} added" if cur is None
                                      else f"key {kid} replaces {key_id(cur)} (retired)"))
    return out


def nodes_parser(gw: Any) -> None:
    n = gw.add_parser("nodes", help="the fleet registry: list, import, revoke (docs/fleet.md)")
    n.add_argument("--config", type=Path, help="the gateway's config")
    n.add_argument("--csv", action="store_true", help="the registry as CSV")
    acts = n.add_subparsers(dest="nodes")
    imp = acts.add_parser("import", help="merge a fragment (`lantern provision fleet`) or a "
                          "key file's nodes into the gateway's key file and registry")
    imp.add_argument("fragment", type=Path)
    imp.add_argument("--node", action="append", help="only this node (repeatable); takes its "
                     "key even where the gateway holds another")
    imp.add_argument("--replace", action="store_true", help="take the fragment's pole and key "
                     "over the gateway's")
    rev = acts.add_parser("revoke", help="refuse a node's frames from now on (undone only by "
                          "provisioning it again: a new key)")
    rev.add_argument("id")
    rev.add_argument("--reason", default="")
    for p in (imp, rev):  # `... import F --config C` as well as `... --config C import F`
        p.add_argument("--config", type=Path, default=argparse.SUPPRESS)


def _config_text(row: dict[str, Any]) -> str:
    """A node's group and config version, and its drift, for `lantern gateway nodes`."""
    if not row["group"]:
        return f"config v{row['config_version']}"
    text = f"group {row['group']} config v{row['config_version']}"
    if row["config_refused"]:
        return text + f" REFUSED {row['config_refused']}"
    return text + (f" DRIFT (group v{row['config_want']})" if row["config_drift"] else "")


def nodes_main(args: argparse.Namespace) -> int:
    if args.config is None:
        raise ConfigError("lantern gateway nodes: give --config (the gateway's gateway.toml)")
    cfg = load_config(args.config)
    if not cfg.state_dir.is_dir():
        raise ConfigError(f"{cfg.state_dir}: no state directory (start the gateway once)")
    try:
        reg = Registry(cfg.state_dir / REGISTRY_FILE)
    except (OSError, sqlite3.Error) as e:
        raise ConfigError(f"{cfg.state_dir / REGISTRY_FILE}: cannot open ({e})") from None
    with reg:
        try:
            if args.nodes == "import":
                for line in import_fragment(args.fragment, cfg.keys_file, reg, args.node,
                                            args.replace):
                    print(line)
                print("a running gateway takes a new node's key within seconds, a replaced key "
                      "at its next restart (systemctl restart lantern-gateway)")
            elif args.nodes == "revoke":
                r = reg.revoke(args.id, args.reason)
                print(f"{r.id}: revoked (key {r.key_id}); its frames are refused and counted "
                      "(lantern_frames_rejected_total{reason=\"revoked\"}); provision it "
                      "again to bring it back")
            else:
                from lantern.agent.api import fleet_csv

                now = time.time()
                rows = [r.row(now) for r in reg.records()]
                if args.csv:
                    sys.stdout.write(fleet_csv(rows))
                else:
                    for row in rows:
                        print(f"{row['id']:<20} {row['state']:<12} pole {row['pole'] or '-':<8}"
                              f" key v{row['key_version']} {row['key_id']} (node's "
                              f"v{row['key_rotation']})  fw {row['firmware'] or '?'}  "
                              + _config_text(row))
        except RegistryError as e:
            print(f"lantern gateway nodes: {e}", file=sys.stderr)
            return 1
    return 0
