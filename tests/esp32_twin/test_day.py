"""A compressed day of deep-sleep cycles on the ESP32 twin, over UART to the real gateway."""

from __future__ import annotations

import itertools

from hil_tests.harness.topology import Topology

from .twin import DEEPSLEEP_RESET, PWRON_RESET, WDT_RESET, TwinNode

HALF_HOUR = 1_800_000
DAY_CYCLES = 48


def delivered(topo: Topology, node: TwinNode) -> dict[int, int]:
    """seq → readings the upstream received from the node."""
    out: dict[int, int] = {}
    for rid in topo.upstream.readings:
        nid, seq, _ = rid.rsplit(":", 2)
        if nid == node.node_id:
            out[int(seq)] = out.get(int(seq), 0) + 1
    return out


async def test_a_day_of_deep_sleep_cycles(street: Topology) -> None:
    street.interval_ms = HALF_HOUR
    # particulates every third wake-up: the cadence counts wake-ups kept in RTC memory
    street.node_extra = {"deep_sleep": True, "watchdog_ms": 300_000, "awake_max_ms": 120_000,
                         "cadence_ms": {"pms5003": 3 * HALF_HOUR}}
    await street.start()
    node = street.nodes[0]
    assert isinstance(node, TwinNode)

    await node.wait_boots(12, 120)
    node.power_cut()  # wherever the node is: awake mid-cycle, or just booting
    await node.wait_boots(20, 120)
    node.hang_bus()  # the sensor bus stops answering: the node hangs until the watchdog
    await node.wait_boots(30, 120)
    node.power_cut()
    await node.wait_boots(DAY_CYCLES + 2, 240)
    await street.wait_for(lambda: delivered(street, node) == node.sampled(), 60,
                          "every sealed pack upstream")
    boots = node.boots
    ends = [b.end for b in boots if b.end]

    # every reading sealed reached the platform, once
    assert street.upstream.duplicates == 0
    pm = {int(rid.rsplit(":", 2)[1]) for rid, r in street.upstream.readings.items()
          if r.get("n", "").endswith(":pm2_5")}
    assert len(node.sampled()) // 4 <= len(pm) <= len(node.sampled()) // 2, (pm, node.sampled())
    assert len(node.sampled()) >= DAY_CYCLES - 4  # the cuts and the hang cost a cycle each
    assert ends.count("power_cut") == 2 and ends.count("watchdog") == 1, ends

    # each boot with the cause the port reports; after a cut the RTC starts at the epoch.
    # Board time runs `speed` times the host's, and the boot record is read some host
    # milliseconds after the VM starts (more on a loaded machine): a minute of board time
    # (1.2 s of the host's) is the slack, against half-hour sleeps and a 26-year clock.
    slack_us = 60_000_000
    for prev, b in itertools.pairwise(boots):
        want = {"deepsleep": DEEPSLEEP_RESET, "power_cut": PWRON_RESET,
                "watchdog": WDT_RESET}[prev.end]
        assert b.reset == want, (prev, b)
        if prev.end == "deepsleep":  # the RTC ran on through the sleep
            assert 0 <= b.rtc_us - prev.rtc_end_us - prev.sleep_ms * 1000 < slack_us, (prev, b)
        elif prev.end == "power_cut":
            assert b.rtc_us < slack_us, (prev, b)  # back at 2000-01-01
        else:  # a watchdog reset leaves the RTC running
            assert 0 <= b.rtc_us - prev.rtc_end_us < slack_us, (prev, b)
    # a board without a backup cell: after each power-on its RTC says 2000 until the first ACK
    # sets it. Nothing is sealed with a time the node does not know (docs/time.md): a time
    # request asks for it, the samples wait, and every reading upstream has its time — none
    # before 2001 unless its pack says so with time.q
    packs: dict[int, dict[str, dict[str, object]]] = {}
    for rid, r in street.upstream.readings.items():
        packs.setdefault(int(rid.rsplit(":", 2)[1]), {})[str(r["n"]).rsplit(":", 1)[1]] = r
    for recs in packs.values():
        assert all(int(r["t"]) >= 978_307_200 for r in recs.values()) or "time.q" in recs, recs
        assert all(int(r["t"]) > 1_700_000_000 for r in recs.values()), recs
    requests = [seq for seq, recs in packs.items() if list(recs) == ["time.q"]]
    assert len(requests) >= 3 and all(packs[s]["time.q"]["v"] == 1 for s in requests)
    # any other flag: a sample held through a power cut, dated when the node came back (2)
    assert all(recs["time.q"]["v"] == 2 for s, recs in packs.items()
               if "time.q" in recs and s not in requests)
    out = node.output()
    assert out.count("boot: reset watchdog") == 1 and out.count("boot: reset power_on") == 3

    # RTC memory: wake-ups since the last power cut (a watchdog reset keeps them)
    last_cut = max(i for i, b in enumerate(boots) if b.reset == PWRON_RESET)
    sleeps = sum(1 for b in boots[last_cut:] if b.end == "deepsleep")
    counters = node.rtc_counters()
    assert counters is not None and counters[0] == sleeps
    wdt_boot = next(i for i, b in enumerate(boots) if b.reset == WDT_RESET)
    assert last_cut > wdt_boot
    # NVS: resets by cause, through everything (power-on, 2 cuts; one watchdog)
    assert node.nvs_i32("rst_pwr") == 3 and node.nvs_i32("rst_wdt") == 1
