"""tools/street/reliability.py: the CPU load the scenarios run under, and what the table says."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lantern.tools.street import reliability


def _children() -> dict[int, str]:
    """Our live child processes (pid → state letter), from /proc."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == os.getpid() and fields[0] != "Z":
            out[int(stat.parent.name)] = fields[0]
    return out


def test_cpu_load_runs_busy_processes_for_the_duration_and_ends_them() -> None:
    before = _children()
    with reliability.cpu_load(2, every_s=0.01) as load:
        busy = set(_children()) - set(before)
        assert len(busy) == 2
    assert not busy & set(_children())
    assert load["cpu_load_processes"] == 2


def test_no_load_starts_nothing() -> None:
    before = _children()
    with reliability.cpu_load(0) as load:
        assert _children() == before
    assert load == {"cpu_load_processes": 0}


@pytest.mark.parametrize(("meta", "text"), [
    ({"cpu_load_processes": 2, "loadavg_1m": {"mean": 3.5, "max": 4.25}},
     "under CPU load: 2 busy processes beside the tests, 1-minute load average 3.5 (max 4.25)"),
    ({"cpu_load_processes": 1}, "under CPU load: 1 busy process beside the tests"),
    ({"cpu_load_processes": 0}, "no added CPU load"),
    ({}, "no added CPU load"),
])
def test_the_table_says_what_load_it_was_measured_under(meta: dict[str, object],
                                                        text: str) -> None:
    meta = {"date": "2026-12-01", "cpus": 2, "commit": "abc", "size": "full", "seconds": 1.0,
            "command": "make reliability", "pytest_rc": 0, **meta}
    assert f"pytest exit status 0), {text}." in reliability.markdown([], meta)
