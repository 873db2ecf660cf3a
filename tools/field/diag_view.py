"""What `lantern diag node` makes of a node's answers: reports, problems, and the terminal view."""

from __future__ import annotations

import time
from typing import Any

from lantern.tools.field.nodelink import Identity, Reading

HEAP_LOW = 16 * 1024  # an ESP32 without PSRAM starts failing allocations below about this
OUTBOX_DEEP = 20  # same threshold as the gateway's node table (agent/api.py)
CLOCK_OFF_MS = 5000
BATTERY_NAMES = ("battery", "battery_pct", "battery_v", "supply_v")
# quality flag bits of a "<name>.q" record, lowest first (firmware/node/sampler.py)
FLAG_NAMES = ("warmup", "range", "stale", "stuck", "crc", "nack", "timeout", "failed", "absent",
              "saving")  # docs/measurements.md (bit 9 only on battery.q)


def flag_names(bits: Any) -> list[str]:
    if not isinstance(bits, int):
        return []
    return [n for i, n in enumerate(FLAG_NAMES) if bits >> i & 1]


def jsonable(v: Any) -> Any:
    """CBOR values as JSON: bytes become hex, tuples lists, keys text."""
    if isinstance(v, bytes | bytearray):
        return v.hex()
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [jsonable(x) for x in v]
    return v


def short_name(node_id: str, n: str) -> str:
    prefix = f"urn:dev:lantern:{node_id}:"
    return n[len(prefix):] if n.startswith(prefix) else n


def reading_json(r: Reading) -> dict[str, Any]:
    values: dict[str, Any] = {}
    t = None
    for rec in r.records:
        t = rec.get("t", t)
        v = next((rec[k] for k in ("v", "vs", "vb", "vd") if k in rec), None)
        values[short_name(r.node_id, rec["n"])] = {"v": v, **({"u": rec["u"]} if "u" in rec
                                                               else {})}
    return {"node": r.node_id, "seq": r.seq, "t": t, "verified": r.verified, "values": values}


def identity_json(i: Identity) -> dict[str, Any]:
    return {"id": i.node_id, "firmware": i.firmware, "board": i.board, "protocol": i.protocol,
            "verified": i.verified}


def node_problems(st: dict[str, Any], offset_ms: float | None,
                  tests: list[dict[str, Any]] | None = None) -> list[str]:
    """Everything in a status (and self-test) a technician should act on, in words."""
    out = []
    for name, count, detail in st.get("faults") or []:
        out.append(f"fault {name} (x{count}): {detail}" if detail else f"fault {name} (x{count})")
    clock = st.get("clock") or {}
    held = st.get("held")
    if not clock.get("synced"):
        out.append("clock never set by a gateway since boot (no ACK with the time yet): "
                   "samples are held unsealed until it is"
                   + (f" ({held} held)" if isinstance(held, int) and held else "")
                   + "; is the gateway's clock synchronised? `sync-time` sets it")
    elif offset_ms is not None and abs(offset_ms) > CLOCK_OFF_MS:
        out.append(f"clock is {offset_ms / 1000:+.1f} s off this computer's")
    if (st.get("outbox") or 0) >= OUTBOX_DEEP:
        out.append(f"{st['outbox']} frames waiting in the outbox: is the gateway acknowledging?")
    if st.get("seal_errors"):
        out.append(f"{st['seal_errors']} packs lost since boot: the node could not save a "
                   "sequence number (flash full or failing)")
    heap = (st.get("heap") or {}).get("free")
    if isinstance(heap, int) and heap < HEAP_LOW:
        out.append(f"heap low: {heap} bytes free")
    for s in st.get("sensors") or []:
        if isinstance(s, list) and len(s) >= 2 and not s[1]:
            out.append(f"sensor {s[0]} not answering")
    for t in tests or []:
        if not t.get("ok"):
            out.append(f"self-test {t.get('name')}: FAIL ({t.get('error') or 'no reading'})")
    return out


def node_report(port: str, ident: Identity, st: dict[str, Any], rtt_s: float,
                offset_ms: float, latest: Reading | None,
                tests: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    latest_j = reading_json(latest) if latest else None
    battery = st.get("battery")
    if battery is None and latest_j:
        battery = next(({"n": k, **latest_j["values"][k]} for k in BATTERY_NAMES
                        if k in latest_j["values"]), None)
    problems = node_problems(st, offset_ms, tests)
    rep = {"port": port, "identity": identity_json(ident), "status": jsonable(st),
           "rtt_ms": round(rtt_s * 1000, 1), "clock_offset_ms": round(offset_ms),
           "battery": battery, "latest": latest_j, "problems": problems,
           "healthy": not problems}
    if tests is not None:
        rep["self_test"] = jsonable(tests)
    return rep


def _age(ms: Any) -> str:
    if ms is None:
        return "never"
    s = ms / 1000
    return f"{s:.1f} s ago" if s < 120 else f"{s / 60:.0f} min ago" if s < 7200 else \
        f"{s / 3600:.1f} h ago"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return "-" if v is None else str(v)


_LINK_FAILURES = (("rx_failures", "receive failures"), ("tx_failures", "send failures"),
                  ("advert_failures", "advert failures"))


def render_node(rep: dict[str, Any]) -> Any:
    """A rich renderable for one status report (also the body of the live view)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    def row(table: Table, *cells: str) -> None:
        table.add_row(*(Text(c) for c in cells))

    i, st = rep["identity"], rep["status"]
    head = Text.assemble(
        (f"{i['id']}", "bold"), f"  firmware {i['firmware']}  board {i['board']}  "
        f"MicroPython {st.get('mpy', '?')} ({st.get('platform', '?')})  ",
        ("key verified" if i["verified"] else "key NOT verified",
         "green" if i["verified"] else "red"))
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="dim")
    t.add_column()
    cfg = st.get("cfg") or {}
    link = st.get("link") or {}
    clock = st.get("clock") or {}
    heap = st.get("heap") or {}
    bat = rep.get("battery")
    row(t, "config", f"every {cfg.get('interval_ms', 0) / 1000:g} s, outbox max "
           f"{cfg.get('max_frames')}, pole {_fmt(cfg.get('pole'))}, location "
           f"{_fmt(cfg.get('location'))}")
    row(t, "uptime", f"{st.get('uptime_s', 0)} s, last cycle {st.get('cycle_ms')} ms")
    held = st.get("held")
    row(t, "outbox", f"{st.get('outbox')} waiting, next seq {st.get('next_seq')}, "
           f"{st.get('evicted', 0)} evicted"
           + (f", {held} held for the time (unsealed)" if held is not None else ""))
    row(t, "clock", ("synced" if clock.get("synced") else "NOT synced")
           + f", {rep['clock_offset_ms'] / 1000:+.2f} s vs this computer")
    row(t, "last ACK", _age(link.get("last_ack_age_ms")))
    row(t, "link", f"sent {link.get('sent')}, retransmits {link.get('retransmits')}, acked "
           f"{link.get('acked')}, rx errors {link.get('rx_errors')} (CRC "
           f"{link.get('crc_errors')}), bad ACKs {link.get('bad_acks')}, "
           + "".join(f"{label} {link[k]}, " for k, label in _LINK_FAILURES if link.get(k))
           + f"round trip {rep['rtt_ms']:.0f} ms"
           + (f", RSSI {link['rssi']} dBm" if link.get("rssi") is not None else ""))
    row(t, "battery", f"{_fmt(bat.get('v'))} {bat.get('u', '')}".strip() if isinstance(
        bat, dict) else _fmt(bat))
    row(t, "heap", f"{_fmt(heap.get('free'))} B free, peak use {_fmt(heap.get('peak'))} B")
    sensors = st.get("sensors") or []
    row(t, "sensors", ", ".join(
        (f"{s[0]}" if s[1] else f"{s[0]} (ABSENT)") if isinstance(s, list) and len(s) >= 2
        else str(s)
        for s in sensors) or "none")
    parts: list[Any] = [head, t]
    lat = rep.get("latest")
    if lat:
        parts.append(Text(f"latest pack: seq {lat['seq']}, sampled {_when(lat['t'])}"
                          + ("" if lat["verified"] else " (NOT verified)"), style="bold"))
        r = Table()
        for col in ("reading", "value", "unit", "quality"):
            r.add_column(col, justify="right" if col == "value" else "left")
        values = lat["values"]
        for name, v in values.items():
            if name.endswith(".q"):
                continue
            q = flag_names(values.get(name + ".q", {}).get("v"))
            row(r, name, _fmt(v["v"]), str(v.get("u", "")), ", ".join(q) or "ok")
        for name, v in values.items():  # flags of readings without a value this time
            if name.endswith(".q") and name[:-2] not in values:
                row(r, name[:-2], "-", "", ", ".join(flag_names(v["v"])))
        parts.append(r)
    if rep.get("self_test") is not None:
        parts.append(render_self_test(rep["self_test"]))
    for p in rep["problems"]:
        parts.append(Text(f"✗ {p}", style="yellow"))
    if not rep["problems"]:
        parts.append(Text("✓ no problems found", style="green"))
    return Group(*parts)


def _when(t: Any) -> str:
    if not isinstance(t, int | float):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def render_self_test(tests: list[dict[str, Any]]) -> Any:
    """The self-test table; what the node sent (names, errors, values) is text, never markup."""
    from rich.table import Table
    from rich.text import Text

    t = Table(title="sensor self-test", title_justify="left")
    for col in ("sensor", "result", "reading", "raw", "ms"):
        t.add_column(col)
    for s in tests:
        vals = s.get("values") or {}
        result = Text("PASS", "green") if s.get("ok") else \
            Text.assemble(("FAIL", "red"), f" {s.get('error') or ''}")
        t.add_row(Text(str(s.get("name"))), result,
                  Text(", ".join(f"{k} {_fmt(v)}" for k, v in vals.items()) or "-"),
                  Text(_fmt(s.get("raw"))), Text(_fmt(s.get("ms"))))
    return t


# ---- a gateway's rollout (GET /api/rollout; docs/rollout.md)

def rollout_summary(ro: dict[str, Any]) -> str:
    """One line: which release, where it stands, and why it stopped if it did."""
    counts = ", ".join(f"{n} {s.replace('_', ' ')}" for s, n in ro["counts"].items() if n)
    where = ("canary" if ro["phase"] == "canary" else
             f"step {ro['step_now']} of {ro['steps'] - 1}" if ro["phase"] == "steps" else "")
    head = f"rollout {ro['id']} of {ro['version']}: {ro['state'].upper()}"
    if ro["state"] == "running" and where:
        head += f" ({where})"
    return head + f"; {counts}" + (f"; {ro['reason']}" if ro.get("reason") else "")


def rollout_table(ro: dict[str, Any]) -> Any:
    """Each node of the rollout: its state, the version it runs, why (text, never markup)."""
    from rich.table import Table
    from rich.text import Text

    style = {"updated": "green", "rolled_back": "red", "refused": "red",
             "unreachable": "yellow", "transferring": "cyan", "applied": "cyan"}
    t = Table(title=Text(rollout_summary(ro)), title_justify="left")
    for col in ("node", "role", "state", "runs", "why"):
        t.add_column(col)
    for p in ro["nodes"]:
        t.add_row(Text(p["node"]), Text("canary" if p["node"] in ro["canary"] else ""),
                  Text(p["state"].replace("_", " "), style.get(p["state"], "")),
                  Text(p.get("version") or "-"),
                  Text(p.get("detail") or p.get("reason") or ""))
    for node, why in sorted(ro.get("skipped", {}).items()):
        t.add_row(Text(node), Text(""), Text("skipped", "dim"), Text("-"), Text(why))
    return t
