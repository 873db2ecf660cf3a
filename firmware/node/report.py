"""The node's STATUS and self-test answers (COMMAND ops 1 and 2, docs/protocol.md "Diagnostics").

Loaded for the command and given back after it (node/commands.py NodeActions): what the
diagnostics ask for now and then must not sit in the heap of a node that is busy with an
update (docs/updates.md, "Memory, measured").
"""

import sys
import time


def status(a):
    """The STATUS reply's body for NodeActions `a`."""
    n = a.n
    new = n.outbox.evicted - a.evicted_seen
    if new > 0:  # evictions lose data: latch them (the total stays in "evicted")
        a.evicted_seen = n.outbox.evicted
        n.fault("outbox_full", "%d oldest frames dropped" % new)
    stats = getattr(n.link, "stats", None)
    link = {"window": n.cfg["link"].get("window", 4), "baud": n.cfg["link"].get("baud")}
    for k in ("sent", "retransmits", "acked", "rx_errors", "crc_errors", "bad_acks",
              "rx_failures", "tx_failures", "advert_failures", "rssi"):
        link[k] = getattr(stats, k, None)
    last_ack = getattr(stats, "last_ack_ms", None)
    link["last_ack_age_ms"] = (
        None if last_ack is None else time.ticks_diff(time.ticks_ms(), last_ack))
    battery = getattr(n.hal, "battery", None)
    st = a.identity()
    st.update({
        "mpy": ".".join(str(v) for v in sys.implementation.version[:3]),
        "platform": sys.platform,
        "fw_file": __file__,  # .mpy deployed by `lantern provision`; .py frozen or source
        "cfg": {"interval_ms": n.interval_ms, "max_frames": n.outbox.max_frames,
                "pole": n.cfg.get("pole"), "location": n.cfg.get("location")},
        "outbox": len(n.outbox), "evicted": n.outbox.evicted,
        "seal_errors": getattr(n, "seal_errors", 0),  # sample cycles that lost their pack
        "next_seq": n.outbox._next,
        "clock": {"now_ms": n.clock.now_ms(), "synced": n.clock.synced},
        "link": link,
        "battery": battery() if battery else None,
        "heap": {"free": n.hal.heap_free(), "peak": n.heap_peak},
        "uptime_s": time.ticks_diff(time.ticks_ms(), n.boot_ms) // 1000,
        "cycle_ms": n.cycle_ms,
        "sensors": [[name, d is not None, e] for name, d, e in _sensors(n)],
        "faults": [[k, v[0], v[1]] for k, v in sorted(n.faults.items())],
        "boot": _boot(n),
        "energy": _energy(n),
        "upd": a.upd(),
        "config_version": n.cfg.get("config_version", 0),
        "key_version": getattr(n, "key_version", 0),
        "held": _held(n),
    })
    return st


def self_test(n, index=None):
    """Read each sensor (or the one at `index`) once: its result, a fault where it fails."""
    out = []
    for i, (name, drv, _) in enumerate(_sensors(n)):
        if index is not None and i != index:
            continue
        if drv is None:
            r = {"name": name, "ok": False, "error": "not answering (probed every interval)"}
        else:
            r = check_sensor(name, drv, n.clock.now())
        r["i"] = i
        if not r["ok"]:
            n.fault("sensor:" + name, r["error"])
        out.append(r)
    return out


def _sensors(n):
    """(label, driver or None while absent, errors since boot) per sensor."""
    sensors = n.sensors
    slots = getattr(sensors, "slots", None)
    if slots is not None:
        return [(s.label, s.driver, s.errors) for s in slots]
    return [(getattr(s, "name", None) or type(s).__name__.lower(), s, 0) for s in sensors]


def _raw(drv):
    """The bytes a driver last read from its chip, as far as it lets us see them."""
    raw = getattr(drv, "raw", None)
    if callable(raw):
        raw = raw()
    if raw is None:
        # the drivers read into preallocated buffers (STYLE.md): their last contents
        for name in ("_data", "_buf", "_frame"):
            buf = getattr(drv, name, None)
            if isinstance(buf, (bytes, bytearray)):
                return bytes(buf)
    return raw


def check_sensor(name, drv, now):
    """Self-test of one sensor: read it once; pass if it answers with values inside its ranges."""
    t0 = time.ticks_ms()
    r = {"name": name, "ok": False, "values": None, "raw": None, "error": None}
    try:
        try:
            values = drv.read()
        except TypeError:  # the simulated climate sensor takes the time
            values = drv.read(now)
        # no new conversion yet (the sampler took the last one): wait up to one period
        deadline = time.ticks_add(t0, min(getattr(drv, "PERIOD_MS", 100), 5000) + 200)
        while values is None and time.ticks_diff(deadline, time.ticks_ms()) > 0:
            time.sleep_ms(100)
            values = drv.read()
        r["values"] = values
        if values is None:
            r["error"] = "no data yet (warming up?)"
        else:
            ranges = getattr(drv, "RANGES", {})
            bad = [k for k in sorted(values) if k in ranges
                   and not ranges[k][0] <= values[k] <= ranges[k][1]]
            if bad:
                r["error"] = "out of range: " + ", ".join(bad)
            r["ok"] = not bad
    except Exception as e:  # noqa: BLE001 - one failing sensor is a result, not a crash
        r["error"] = "%s: %s" % (type(e).__name__, e)
    r["raw"] = _raw(drv)
    r["ms"] = time.ticks_diff(time.ticks_ms(), t0)
    return r


def _held(n):
    """Samples the hold keeps unsealed until the time is known (node/untimed.py), 0 if none."""
    held = getattr(sys.modules.get("node.untimed"), "held", None)
    if held is not None:
        return held(n)
    hold = getattr(n, "_untimed", None)
    try:
        return len(hold) if hold else 0
    except TypeError:  # a hold that does not count itself
        return 0


def _energy(n):
    """The sampler's energy model (node/sampler.py), rounded for the status; None without it."""
    energy = getattr(n.sensors, "energy", None)
    e = energy() if energy is not None else None
    if not e:
        return None
    return {"mj_interval": round(e["mj_interval"], 1), "mj_reading": round(e["mj_reading"], 2),
            "mah_day": round(e["mah_day"], 2), "days": round(e.get("days", 0), 1),
            "saving": getattr(n.sensors, "interval_factor", 1) > 1}


def _boot(n):
    """This boot's reset and wake cause, resets by cause (NVS) and the RTC-memory counters."""
    boot = dict(getattr(n, "boot", None) or {})
    rtc = getattr(n.hal, "rtc_counters", None)
    if rtc is not None:
        wakes, awake_ms, mj = rtc()
        boot["rtc"] = {"wakes": wakes, "awake_ms": awake_ms, "energy_mj": mj}
    boot["deep_sleep"] = bool(n.cfg.get("deep_sleep"))
    return boot
