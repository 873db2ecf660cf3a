"""Service logging (agent/logsetup.py): journald prefixes, one line per event, rate limits."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lantern.agent.logsetup import JournalFormatter, RateLimit, escape_controls, under_journald

ROOT = Path(__file__).resolve().parents[2]


def record(level: int, msg: str, *args: object, name: str = "lantern.ingest"
           ) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


@pytest.mark.parametrize(("level", "prefix"), [
    (logging.DEBUG, "<7>"), (logging.INFO, "<6>"), (logging.WARNING, "<4>"),
    (logging.ERROR, "<3>"), (logging.CRITICAL, "<2>")])
def test_journal_lines_carry_the_priority_and_no_timestamp(level: int, prefix: str) -> None:
    line = JournalFormatter().format(record(level, "link %s lost", "serial:/dev/ttyUSB0"))
    assert line == f"{prefix}lantern.ingest: link serial:/dev/ttyUSB0 lost"


def test_a_multi_line_event_stays_one_line() -> None:
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        rec = logging.LogRecord("lantern.x", logging.ERROR, __file__, 1, "failed", (),
                                sys.exc_info())
    line = JournalFormatter().format(rec)
    assert "\n" not in line and line.startswith("<3>lantern.x: failed | Traceback")


def test_rate_limit_lets_a_burst_through_then_summarises(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    now = [1000.0]
    monkeypatch.setattr("lantern.agent.logsetup.time.monotonic", lambda: now[0])
    f = RateLimit(burst=3, period=60)
    passed = [f.filter(r) for r in (record(logging.WARNING, "crc error from %s", "a")
                                    for _ in range(10))]
    assert passed == [True] * 4 + [False] * 6  # three, then one "suppressing" notice
    other = record(logging.WARNING, "another message")
    assert f.filter(other)  # limits are per message template
    now[0] += 61
    r = record(logging.WARNING, "crc error from %s", "a")
    assert f.filter(r)
    assert r.getMessage() == "crc error from a (6 more like this were suppressed)"


def test_under_journald_only_when_stderr_is_the_journal(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    with open(tmp_path / "f", "w") as f:
        st = os.fstat(f.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert under_journald(f)
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")
        assert not under_journald(f)
        monkeypatch.delenv("JOURNAL_STREAM")
        assert not under_journald(f)


def test_cli_logs_journald_style_when_stderr_is_the_journal(tmp_path: Path) -> None:
    """The real entry point, with stderr a file whose identity JOURNAL_STREAM names."""
    err = tmp_path / "stderr"
    cfg = tmp_path / "gateway.toml"
    cfg.write_text('[gateway]\nkeys_file = "keys.toml"\n[[links.serial]]\nport = "/dev/null"\n'
                   '[sinks.http]\nurl = "http://127.0.0.1:9/"\n')
    with open(err, "w") as f:
        st = os.fstat(f.fileno())
        env = dict(os.environ, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
        code = subprocess.run(
            [sys.executable, "-c", "import logging, sys; from lantern.agent.cli import main; "
             "r = main(sys.argv[1:]); logging.getLogger('lantern.t').warning('hello %s', 1); "
             "sys.exit(r)", "gateway", "check-config", "--config", str(cfg)],
            stderr=f, env=env, cwd=ROOT, timeout=60).returncode
    assert code == 2
    lines = err.read_text().splitlines()
    assert lines[0].startswith("<3>lantern: ")  # the config error, filed as an error
    assert lines[1] == "<4>lantern.t: hello 1"


@pytest.mark.parametrize(("text", "shown"), [
    ("plain ascii: seq 5", "plain ascii: seq 5"),
    ("Straße 温度 µg/m³", "Straße 温度 µg/m³"),  # printable non-ASCII is kept as it is
    ("a\nb\rc\td\x1b[2K\x7f", "a\\nb\\rc\\td\\x1b[2K\\x7f"),
    ("x\x85y\u2028z\u2029", "x\\x85y\\u2028z\\u2029"),
    ("temp\u202e\u2066gnirts", "temp\\u202e\\u2066gnirts"),  # bidi override and isolate
    ("a\u200bb\ufeffc\u00a0d", "a\\u200bb\\ufeffc\\xa0d"),  # zero-width, BOM, no-break space
    ("\U000e0041\ud800", "\\U000e0041\\ud800"),  # a tag character, a lone surrogate
])
def test_escape_controls_writes_every_unprintable_character_as_an_escape(
        text: str, shown: str) -> None:
    assert escape_controls(text) == shown


@given(st.text(alphabet=st.characters(codec=None)))
def test_escaped_text_is_always_printable_and_printable_text_is_kept(text: str) -> None:
    got = escape_controls(text)
    assert got.isprintable()
    assert (got == text) == text.isprintable()
