"""Third review, gateway side: the state directory's lock, check-config against the machine and
odd config values, and third-party BTHome readings through ingest. Each test is a finding: it
fails on the tree it was written on for the reason its docstring gives, and asserts what the
gateway should do, so it passes once the finding is fixed.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import sqlite3
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from lantern.agent.errors import ConfigError
from lantern.agent.gateway import LOCK_FILE, claim_state_dir
from lantern.agent.ingest import Ingest
from lantern.agent.links.ble_adverts import ThirdParty
from lantern.agent.links.ble_config import BleDeviceConfig
from lantern.agent.metrics import Metrics
from lantern.agent.queue.store import Store

from .gateway_harness import until

LANTERN = [sys.executable, "-m", "lantern"]
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
ADDR = "F0:00:00:00:03:02"


# ---- the lock file: state_dir/gateway.lock ---------------------------------------------------


def test_a_lock_symlink_planted_in_the_state_dir_does_not_clobber_its_target(
        tmp_path: Path) -> None:
    """agent/gateway.py claim_state_dir opens state_dir/gateway.lock with open(..., "a+"), which
    follows a symlink, then truncates it and writes its pid. Whoever can write the state
    directory (the service user lantern, or anybody when state_dir is a shared folder) plants
    gateway.lock -> /etc/shadow (or any file); the next gateway started as root by hand (`sudo
    lantern gateway run ...`) empties that file and writes its pid into it."""
    state = tmp_path / "state"
    state.mkdir()
    victim = tmp_path / "precious.conf"
    victim.write_text("do not touch\n")
    (state / LOCK_FILE).symlink_to(victim)
    try:
        held = claim_state_dir(state)
    except ConfigError:
        pass  # refusing a lock that is not a plain file of ours is one right answer
    else:
        held.close()
    assert victim.read_text() == "do not touch\n"


def test_another_local_user_cannot_hold_the_gateway_lock() -> None:
    """The lock file is created with the process umask (0644 under a shell) in a state directory
    made with mode 0777 & ~umask (0755): every local user can open it read-only, and flock needs
    nothing more. Any user holding LOCK_EX on it keeps the gateway from starting (refused as
    'another gateway (pid N) runs on this state directory', N being the last real gateway's
    pid). Under the unit StateDirectoryMode=0700 protects it; run by hand, from `lantern sim`'s
    instructions or any other service manager, it does not."""
    old = os.umask(0o022)  # a login shell's
    try:
        with tempfile.TemporaryDirectory(prefix="lantern-review3-") as d:
            base = Path(d)
            base.chmod(0o755)
            state = base / "state"
            claim_state_dir(state).close()  # a gateway ran here once, and stopped
            holder = subprocess.Popen(
                [*NOBODY, sys.executable, "-c",
                 "import fcntl, os, sys\n"
                 "try:\n"
                 "    fd = os.open(sys.argv[1], os.O_RDONLY)\n"
                 "    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
                 "except OSError as e:\n"
                 "    print('refused', e, flush=True)\n"
                 "    sys.exit(0)\n"
                 "print('held', flush=True)\n"
                 "sys.stdin.read()\n", str(state / LOCK_FILE)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            try:
                assert holder.stdout is not None
                said = holder.stdout.readline().strip()
                try:
                    claim_state_dir(state).close()
                except ConfigError as e:
                    pytest.fail(f"user nobody ({said}) keeps the gateway from starting: {e}")
            finally:
                holder.communicate("", timeout=20)
    finally:
        os.umask(old)


def test_a_held_lock_holding_garbage_is_refused_in_one_line(tmp_path: Path) -> None:
    """claim_state_dir reads the lock file as UTF-8 text to name the other gateway's pid: a lock
    held by another process whose file is not UTF-8 (a stray write, a disk error) raises
    UnicodeDecodeError out of the refusal, so `gateway run` ends as "gateway stopped on an
    unexpected error ... this is a bug" (exit 1) instead of the one-line refusal; text with
    newlines or escapes in it would be printed into the journal as is."""
    state = tmp_path / "state"
    state.mkdir()
    lock = state / LOCK_FILE
    lock.write_bytes(b"\xff\xfe\x1b[2J\nfake line\n")
    other = open(lock, "rb")  # noqa: SIM115 - another holder: flock is per open file
    try:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ConfigError) as e:
            claim_state_dir(state)
        msg = str(e.value)
        assert "another gateway" in msg
        assert "\n" not in msg and "\x1b" not in msg, msg
    finally:
        other.close()


def test_a_lock_that_is_not_a_regular_file_is_named_in_the_error(tmp_path: Path) -> None:
    """A FIFO at state_dir/gateway.lock (an operator's `mkfifo`, a restore gone wrong): open
    raises io.UnsupportedOperation, whose strerror is None, and the one line says 'cannot create
    the state directory or its lock (None); check its owner and free space': neither the file
    nor the problem is named, and owner and free space are not it."""
    state = tmp_path / "state"
    state.mkdir()
    os.mkfifo(state / LOCK_FILE)
    with pytest.raises(ConfigError) as e:
        claim_state_dir(state).close()
    assert "(None)" not in str(e.value), str(e.value)
    assert LOCK_FILE in str(e.value), str(e.value)


# ---- check-config ------------------------------------------------------------------------------


def write_config(tmp: Path, text: str, state: str = "state") -> Path:
    keys = tmp / "keys.toml"
    keys.write_text('[nodes]\n"SL-0001" = "' + "ab" * 32 + '"\n')
    keys.chmod(0o600)
    cfg = tmp / "gateway.toml"
    cfg.write_text(f'[gateway]\nstate_dir = "{state}"\nkeys_file = "keys.toml"\n'
                   '[[links.serial]]\nport = "/dev/ttyUSB-lantern-test"\n[api]\nenabled = false\n'
                   + text)
    return cfg


def one_line(r: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in r.stderr, r.stderr[-600:]
    assert r.returncode == 2, (r.returncode, r.stderr[-600:])
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr[-600:]


def test_check_config_on_a_state_dir_behind_a_folder_the_user_cannot_search() -> None:
    """agent/preflight.py check_state_dir calls Path.exists(), which raises PermissionError when
    the checking user cannot search a parent (state_dir under /root, or under the service's
    0700 /var/lib/lantern while checking as yourself, as the 'not checked' line invites): a
    traceback from check-config, and from `gateway run` 'stopped on an unexpected error ...
    this is a bug' (exit 1)."""
    with tempfile.TemporaryDirectory(prefix="lantern-review3-") as d:
        tmp = Path(d)
        tmp.chmod(0o755)
        (tmp / "closed").mkdir(mode=0o700)  # root's, searchable by root only
        cfg = write_config(tmp, '[sinks.http]\nurl = "http://127.0.0.1:9/"\n',
                           state="closed/state")
        os.chown(tmp / "keys.toml", 65534, 65534)
        for action in ("check-config", "run"):
            r = subprocess.run([*NOBODY, *LANTERN, "gateway", action, "--config", str(cfg)],
                               capture_output=True, text=True, timeout=60)
            one_line(r)
            assert "closed" in r.stderr


BIG = str(10 ** 400)  # an integer TOML takes, and no float holds


@pytest.mark.parametrize(("text", "key"), [
    (f'[sinks.http]\nurl = "http://127.0.0.1:9/"\n[batch]\nmax_age_s = {BIG}\n',
     "batch.max_age_s"),
    (f'[sinks.http]\nurl = "http://127.0.0.1:9/"\ntimeout_s = {BIG}\n', "sinks.http.timeout_s"),
    (f'[sinks.http]\nurl = "http://127.0.0.1:9/"\nbackoff_max_s = {BIG}\n',
     "sinks.http.backoff_max_s"),
    (f'[sinks.http]\nurl = "http://127.0.0.1:9/"\n[nodes."SL-0001"]\ninterval_s = {BIG}\n',
     "nodes.SL-0001.interval_s"),  # dotted as every config error names it
    ('[sinks.http]\nurl = "http://127.0.0.1:9/"\nx = ' + "[" * 5000 + "]" * 5000 + "\n", ""),
], ids=["max_age_s", "http.timeout_s", "http.backoff_max_s", "nodes.interval_s", "deep"])
def test_check_config_on_huge_numbers_and_deep_nesting_is_one_line(
        tmp_path: Path, text: str, key: str) -> None:
    """agent/configfile.py positive() accepts any int > 0 and the callers then call float() on
    it: OverflowError ('int too large to convert to float') from check-config and from run, a
    traceback. A deeply nested array makes tomllib recurse: RecursionError, not a
    TOMLDecodeError, so again a traceback instead of 'file: not valid TOML'."""
    cfg = write_config(tmp_path, text)
    r = subprocess.run([*LANTERN, "gateway", "check-config", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=60)
    one_line(r)
    assert str(cfg) in r.stderr and key in r.stderr, r.stderr[-300:]


# ---- third-party BTHome readings through ingest -------------------------------------------------


def plain(pid: int, centi_c: int) -> bytes:
    """An unencrypted BTHome v2 advert (info 0x40): object 0x00 packet id, 0x02 temperature."""
    return bytes((0x40, 0x00, pid, 0x02)) + centi_c.to_bytes(2, "little", signed=True)


class Kiosk:
    """One configured plain BTHome sensor, its ThirdParty maker and a running ingest, with a
    store whose commits fail while `failing` is set."""

    def __init__(self, store: Store) -> None:
        self.ingest = Ingest(store, {}, Metrics())
        self.stats: Counter[str] = Counter()
        self.maker = ThirdParty((BleDeviceConfig(ADDR, "kiosk"),), self.ingest, 60.0,
                                self.stats, "ble:hci0")
        self.committed = asyncio.Event()
        self.ingest.listeners.append(self.committed)
        self.failing = True
        real = store.commit

        async def commit(*args: Any) -> None:
            if self.failing:
                raise sqlite3.OperationalError("database or disk is full")
            await real(*args)

        store.commit = commit  # type: ignore[method-assign, assignment]

    async def lose(self, advert: bytes, n: int, runner: asyncio.Task[None]) -> None:
        """Hand it the advert while commits fail; wait until the n-th loss is told."""
        self.maker.on_advert(ADDR, advert)
        await until(lambda: self.stats["store_errors"] == n, f"failed commit {n}", runner)


@contextlib.asynccontextmanager
async def kiosk(db: Path) -> AsyncIterator[tuple[Kiosk, asyncio.Task[None]]]:
    async with Store(db) as store:
        k = Kiosk(store)
        await k.ingest.start()
        runner = asyncio.create_task(k.ingest.run())
        try:
            yield k, runner
        finally:
            runner.cancel()


async def test_a_plain_advert_lost_to_a_failed_commit_is_taken_when_it_repeats(
        tmp_path: Path) -> None:
    """agent/links/ble_adverts.py ThirdParty.on_advert records the advert as the device's
    last_data before ingest has committed it. When that commit fails, lost() says 'adverts
    repeat: the next one carries the same values', but the next one — the sensor repeating the
    very same advert, which BTHome sensors do for their whole interval — is dropped as an
    advert_duplicate for repeat_s (60 s by default): the reading is never stored."""
    async with kiosk(tmp_path / "q.sqlite") as (k, runner):
        await k.lose(plain(7, 2250), 1, runner)
        k.failing = False
        k.maker.on_advert(ADDR, plain(7, 2250))  # the same advert, repeated a second later
        assert k.stats["advert_duplicates"] == 0, "the repeat of a lost advert was dropped"
        await asyncio.wait_for(k.committed.wait(), 10)
        assert k.stats["third_party_readings"] == 1


async def test_third_party_commit_failures_are_logged_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """ThirdParty.lost logs an ERROR line for every failed commit: on a full or read-only disk
    each configured sensor's adverts (a few a minute each, taken once a second at most) put a
    new error line in the journal for as long as the disk stays full — ingest itself logs the
    failing store once and counts the rest."""
    caplog.set_level(logging.ERROR, logger="lantern")
    async with kiosk(tmp_path / "q.sqlite") as (k, runner):
        for i in range(1, 4):
            await k.lose(plain(i, 2000 + i), i, runner)
    lines = [r for r in caplog.records if r.name == "lantern.link.ble"]
    assert len(lines) <= 1, [r.getMessage() for r in lines]
