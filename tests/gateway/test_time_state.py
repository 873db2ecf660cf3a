"""clock.json (agent/timesync.py): a state file this gateway did not write is refused — said
once, counted, set aside as clock.json.bad — and the gateway runs on (review 6, finding 7)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from lantern.agent.timesync import GATEWAY_UNSYNCED, SPANS_MAX, STATE_MAX, TimeSync
from tests.helpers.timecheck import KernelClock

T0 = 1_764_331_200.0
REQUEST = [{"n": "urn:dev:lantern:SL-0042:time.q", "t": 0, "v": 1}]

BAD = {
    "non-finite step": f'{{"spans": [[{T0 - 100}, {T0 + 100}, Infinity]]}}',
    "NaN step": f'{{"spans": [[{T0 - 100}, {T0 + 100}, NaN]]}}',
    "NaN start": f'{{"spans": [[NaN, {T0 + 100}, 5.0]]}}',
    "-inf end": f'{{"spans": [[{T0}, -Infinity, null]]}}',
    "absurd step": json.dumps({"spans": [[T0 - 100, T0 + 100, 1e300]]}),
    "step before 1970": json.dumps({"spans": [[T0 - 100, T0 + 100, -T0 - 1e6]]}),
    "huge integer": '{"spans": [[' + "9" * 400 + ", 1, null]]}",
    "time past 9999": json.dumps({"spans": [[T0, 3e11, None]]}),
    "end before start": json.dumps({"spans": [[T0 + 100, T0, 3.0]]}),
    "text for a time": json.dumps({"spans": [["1764331200", T0, None]]}),
    "boolean step": json.dumps({"spans": [[T0, T0 + 1, True]]}),
    "span of two": json.dumps({"spans": [[T0, T0 + 1]]}),
    "span as an object": json.dumps({"spans": [{"start": T0}]}),
    "spans not a list": json.dumps({"spans": {"0": [T0, T0, None]}}),
    "no spans": json.dumps({"steps": []}),
    "a list at the top": json.dumps([[T0, T0, None]]),
    "too many spans": json.dumps({"spans": [[T0 + i, T0 + i, 1.0]
                                            for i in range(SPANS_MAX + 1)]}),
    "too big": json.dumps({"spans": [], "pad": "x" * STATE_MAX}),
    "not JSON": '{"spans": [[1, 2,',
    "deeply nested": "[" * 100_000 + "]" * 100_000,
    "not UTF-8": b'{"spans": [\xff]}',
}


def _clock(path: Path, synced: bool = True) -> TimeSync:
    return TimeSync(probe=KernelClock(synced), path=path)


@pytest.mark.parametrize("content", BAD.values(), ids=BAD.keys())
def test_a_bad_state_file_is_refused_once_counted_and_set_aside(
        tmp_path: Path, content: str | bytes, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "clock.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with caplog.at_level(logging.WARNING, "lantern.timesync"):
        ts = _clock(path)
    said = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(said) == 1 and "clock.json.bad" in said[0], said
    assert ts.state_refused == 1 and ts.health()["state_refused"] == 1
    aside = tmp_path / "clock.json.bad"
    assert aside.read_bytes() == (content if isinstance(content, bytes) else content.encode())
    # the gateway runs on: a time request is anchored at its receipt, nothing raised
    got = ts.fix_times([dict(r) for r in REQUEST], T0)
    assert got == [{**REQUEST[0], "t": round(T0)}]
    reg = CollectorRegistry(auto_describe=False)
    reg.register(ts.collector())
    assert "lantern_clock_state_refused 1.0" in generate_latest(reg).decode()
    # and writes a state of its own when its clock is next unsynchronised
    ts2 = _clock(path, synced=False)
    ts2.state()
    assert ts2.state_refused == 0 and len(json.loads(path.read_text())["spans"]) == 1


def test_a_state_file_it_wrote_is_taken(tmp_path: Path) -> None:
    path = tmp_path / "clock.json"
    spans: list[list[Any]] = [[T0 - 600, T0 - 500, 300], [T0 - 100, T0 + 100, None],
                              [0, 5, 1.7e9]]  # (a Pi without fake-hwclock starts in 1970)
    path.write_text(json.dumps({"spans": spans}))
    ts = _clock(path)
    assert ts.state_refused == 0 and not (tmp_path / "clock.json.bad").exists()
    assert ts.correct(T0 - 550) == (T0 - 250, True)
    assert ts.correct(3) == (3 + 1.7e9, True)
    got = ts.fix_times([dict(r) for r in REQUEST], T0)  # in the span that never closed
    assert got == [{**REQUEST[0], "t": round(T0), "v": 1 | GATEWAY_UNSYNCED}]


def test_an_unreadable_state_file_is_counted_and_left(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "clock.json"
    path.mkdir()  # (reading it fails as a permission problem would: OSError)
    with caplog.at_level(logging.WARNING, "lantern.timesync"):
        ts = _clock(path)
    assert ts.state_refused == 1 and path.is_dir()
    assert sum("refused" in r.getMessage() for r in caplog.records) == 1
    assert ts.fix_times([dict(r) for r in REQUEST], T0)[0]["t"] == round(T0)
