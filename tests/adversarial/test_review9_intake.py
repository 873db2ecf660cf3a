"""Review 9: the intake log on the ACK path (agent/queue/intake.py, store.py's round).

Each crash here is a real one: a child process that runs a real Store on tmp_path and leaves
by os._exit at the step named (nothing closed, nothing flushed by Python); the parent opens
the same files as a restarted gateway would. Faults below the store (a sync that fails) are
injected at the syscall, the hardware boundary, and nowhere higher.
"""

from __future__ import annotations

import os
import sqlite3
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path
from typing import Any

import cbor2
import pytest

from lantern.agent.errors import ConfigError
from lantern.agent.queue import intake
from lantern.agent.queue.history import PACK_Z_ROW, deflate
from lantern.agent.queue.store import Accepted, Store, Window
from lantern.tools.field.provision_steps import gateway_mark

NODE = "SL-0001"

PRELUDE = """
import asyncio, errno, os, sys
from pathlib import Path
import cbor2
from lantern.agent.queue import intake, store as store_mod
from lantern.agent.queue.store import Accepted, Store, Window

NODE = "SL-0001"

def pack(seq, value=21.5):
    return cbor2.dumps([{-3: 1700000000 + seq, 0: "temperature", 2: value}])

async def take(store, w, *seqs, value=21.5, node=NODE):
    for s in seqs:
        w.mark(s)
    await store.commit([Accepted(node, s, b"", None, pack=pack(s, value), n=1)
                        for s in seqs], {node: w})

def die(*_a, **_k):
    os._exit(0)

async def opened(path):
    store = Store(path)
    await store.__aenter__()
    store.deliver_every_s = 3600.0
    return store
"""


def run_child(queue: Path, body: str) -> str:
    """A gateway's store in a child process: `body` is the inside of `async def main(path)`;
    it ends by dying (os._exit) somewhere. What it printed (print(..., flush=True))."""
    code = PRELUDE + "\nasync def main(path):\n" + textwrap.indent(textwrap.dedent(body), "    ")
    code += "\n    os._exit(0)\n\nasyncio.run(main(Path(sys.argv[1])))\n"
    out = subprocess.run([sys.executable, "-c", code, str(queue)], check=True, timeout=120,
                         capture_output=True, text=True)
    return out.stdout


async def take(store: Store, w: Window, *seqs: int) -> None:
    """One group commit of NODE's frames `seqs`, marked in its window w."""
    for s in seqs:
        w.mark(s)
    await store.commit([Accepted(NODE, s, b"", None, pack=pack(s), n=1) for s in seqs],
                       {NODE: w})


def log_of(queue: Path) -> Path:
    return queue.with_name(queue.name + intake.SUFFIX)


def pack(seq: int, value: float = 21.5) -> bytes:
    return cbor2.dumps([{-3: 1700000000 + seq, 0: "temperature", 2: value}])


async def drain(store: Store, sink: str = "http", sinks: tuple[str, ...] = ()) -> list[str]:
    """Every reading id a sink gets from here on (its batches confirmed as it goes)."""
    got: list[str] = []
    after = await store.cursor(sink)
    while (batch := await store.next_batch(100, after)) is not None:
        got += batch.rids
        await store.delivered_to(sink, batch, list(sinks or (sink,)))
        after = batch.last_id
    return got


def write_log(path: Path, *payloads: bytes, epoch: int = 1) -> None:
    """An intake log whose header and records are all well formed (CRCs match)."""
    head = intake.MAGIC + struct.pack(">Q", epoch)
    out = head + struct.pack(">I", zlib.crc32(head))
    for p in payloads:
        out += struct.pack(">IQI", len(p), epoch, zlib.crc32(struct.pack(">Q", epoch) + p)) + p
    path.write_bytes(out)


# ---- findings

async def test_a_reprovisioned_nodes_frame_after_a_buried_one_of_the_same_seq_survives_a_crash(
        tmp_path: Path) -> None:
    """Old key: seq 5 is a pack that does not resolve (buried as a dead letter, which drops
    it from the tail's keys). The node, provisioned again, counts from 1 under a new key (its
    own window) and sends seq 5: taken onto the log and acknowledged. Crash: the replay reads
    both records; the new frame must still reach the sink."""
    queue = tmp_path / "queue.sqlite"
    run_child(queue, """
        store = await opened(path)
        old = Window(key=b"old-key")
        old.mark(5)
        bad = cbor2.dumps([{0: "temperature"}])  # no value: a dead letter when resolved
        await store.commit([Accepted(NODE, 5, b"", None, pack=bad, n=1)], {NODE: old})
        assert await store.next_batch(100) is None  # buried
        new = Window(key=b"new-key")
        await take(store, new, 5, value=99.0)  # acknowledged (from SQLite: its key is known)
    """)
    async with Store(queue) as store:
        got = await drain(store)
    assert f"{NODE}:5:0" in got, f"the acknowledged frame is gone: {got}"


async def test_a_failed_sync_of_the_new_epoch_loses_no_frame_acknowledged_after_it(
        tmp_path: Path) -> None:
    queue = tmp_path / "queue.sqlite"
    run_child(queue, """
        store = await opened(path)
        w = Window()
        await take(store, w, 1)
        real_sync, real_restart = os.fdatasync, intake.IntakeLog.restart
        def failing_sync(fd):
            raise OSError(errno.EIO, "Input/output error")
        def restart(self, *a, **k):
            os.fdatasync = failing_sync  # the card reports a write-back error, once
            try:
                real_restart(self, *a, **k)
            finally:
                os.fdatasync = real_sync
        intake.IntakeLog.restart = restart
        store._settle(now=True)  # the round's end: frame 1 into SQLite; the restart fails
        intake.IntakeLog.restart = real_restart
        assert len(store.tail) == 0
        await take(store, w, 2)  # appended and synced: acknowledged
        await take(store, w, 3)
    """)
    async with Store(queue) as store:
        got = await drain(store)
    assert sorted(got) == [f"{NODE}:{s}:0" for s in (1, 2, 3)], got


BAD_RECORDS = {
    # CRC right, CBOR well formed, not the store's rows
    "empty frame row": cbor2.dumps([[[]], []]),
    "body not bytes": cbor2.dumps([[[1, NODE, 1, 0.0, 1, 0, 5]], []]),
    "id not an int": cbor2.dumps([[["x", NODE, 1, 0.0, 1, 0, b"\x80"]], []]),
    "short window": cbor2.dumps([[], [[NODE]]]),
    "bitmap over 64 bits": cbor2.dumps([[], [[NODE, b"", 5, 1 << 70]]]),
    "float id": cbor2.dumps([[[1.5, NODE, 1, 0.0, 1, 0, b"\x80"]], []]),
    "a map": cbor2.dumps({"a": 1, "b": 2}),
}


@pytest.mark.parametrize("kind", sorted(BAD_RECORDS))
async def test_a_well_framed_record_that_is_not_ours_is_one_config_error_line(
        tmp_path: Path, kind: str) -> None:
    queue = tmp_path / "queue.sqlite"
    async with Store(queue):
        pass
    write_log(log_of(queue), BAD_RECORDS[kind])
    kept = log_of(queue).read_bytes()
    with pytest.raises(ConfigError, match="intake"):
        async with Store(queue):
            pass
    assert log_of(queue).read_bytes() == kept  # nothing acknowledged thrown away


async def test_provision_reads_a_log_with_a_short_row_as_one_error(tmp_path: Path) -> None:
    queue = tmp_path / "queue.sqlite"
    async with Store(queue):
        pass
    write_log(log_of(queue), cbor2.dumps([[[1, NODE]], []]))
    with pytest.raises(ValueError, match="cannot read the gateway's queue"):
        gateway_mark(queue, NODE)


def test_a_huge_log_is_not_read_whole_into_memory(tmp_path: Path) -> None:
    queue = tmp_path / "queue.sqlite"
    sqlite3.connect(queue).close()
    write_log(log_of(queue))  # a good header, no record
    with open(log_of(queue), "r+b") as f:
        f.truncate(700 << 20)  # zeros after it (sparse: no disk taken)
    code = textwrap.dedent("""
        import asyncio, resource, sys
        from pathlib import Path
        from lantern.agent.queue.store import Store
        async def main():
            async with Store(Path(sys.argv[1])) as s:
                print("open", len(s.tail))
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        asyncio.run(main())
    """)
    out = subprocess.run([sys.executable, "-c", code, str(queue)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "open 0" in out.stdout, out.stderr[-400:]


async def test_a_crash_after_deliveries_are_recorded_shows_no_frame_waiting_that_was_delivered(
        tmp_path: Path) -> None:
    queue = tmp_path / "queue.sqlite"
    run_child(queue, """
        store = await opened(path)
        await take(store, Window(), 1, 2, 3)
        batch = await store.next_batch(100)
        await store.delivered_to("http", batch, ["http"])
        store._flush_tail = die  # the power goes right after the deliveries' record
        store._settle(now=True)
    """)
    async with Store(queue) as store:
        assert await drain(store) == []  # nothing sent again: the cursor is past them
        readings, _ = await store.depth()
        overview = await store.overview()
    assert readings == 0 and overview["queue_readings"] == 0, (readings, overview)


async def test_a_crash_before_the_log_starts_over_counts_each_frame_once(
        tmp_path: Path) -> None:
    queue = tmp_path / "queue.sqlite"
    run_child(queue, """
        store = await opened(path)
        await take(store, Window(), 1, 2, 3)
        store._log.restart = die  # the flush committed; the new epoch never written
        store._settle(now=True)
    """)
    async with Store(queue) as store:
        overview = await store.overview()
        assert sorted(await drain(store)) == [f"{NODE}:{s}:0" for s in (1, 2, 3)]
    assert overview["nodes"][NODE]["frames"] == 3, overview["nodes"]


# ---- what held (each asserts something the change could have broken)

@pytest.mark.parametrize("step", ["record_owed", "flush_tail", "restart", "checkpoint"])
async def test_a_crash_at_each_step_of_a_rounds_end_loses_no_acknowledged_frame(
        tmp_path: Path, step: str) -> None:
    """Two sinks, one ahead of the other; frames delivered, frames owed, frames new; a
    crash at each step of the round's end; every frame not confirmed by both still reaches
    the slow sink, and the fast one gets every frame it had not confirmed."""
    queue = tmp_path / "queue.sqlite"
    hook = {
        "record_owed": "store._record_owed = die",
        "flush_tail": "store._flush_tail = die",
        "restart": "store._log.restart = die",
        "checkpoint": ("real_restart = store._log.restart\n"
                       "def restart(*a, **k):\n"
                       "    real_restart(*a, **k)\n"
                       "    os._exit(0)\n"
                       "store._log.restart = restart"),
    }[step]
    run_child(queue, textwrap.dedent("""
        store = await opened(path)
        w = Window()
        await take(store, w, 1, 2)
        await take(store, w, 3)
        b = await store.next_batch(2)
        await store.delivered_to("fast", b, ["fast", "slow"])
        b2 = await store.next_batch(100, b.last_id)
        await store.delivered_to("fast", b2, ["fast", "slow"])
        b3 = await store.next_batch(1)
        await store.delivered_to("slow", b3, ["fast", "slow"])
        await take(store, w, 4)
    """) + hook + "\nstore._settle(now=True)\n")
    async with Store(queue) as store:
        slow = await drain(store, "slow", ("fast", "slow"))
        fast = await drain(store, "fast", ("fast", "slow"))
    ids = [f"{NODE}:{s}:0" for s in (1, 2, 3, 4)]
    assert set(ids[1:]) <= set(slow), slow
    assert ids[3] in fast, fast
    assert len(set(slow)) == len(slow)


async def test_new_ids_after_a_crash_never_fall_under_a_sink_cursor(tmp_path: Path) -> None:
    """Frames that left the tail delivered (never in SQLite) used ids; after a crash the next
    frames get ids above the sink's cursor, so the sink reads them."""
    queue = tmp_path / "queue.sqlite"
    run_child(queue, """
        store = await opened(path)
        await take(store, Window(), 1, 2, 3)
        b = await store.next_batch(100)
        await store.delivered_to("http", b, ["http"])
        store._settle(now=True)  # delivered: the frames table never had them
    """)
    async with Store(queue) as store:
        store.deliver_every_s = 3600.0
        cursor = await store.cursor("http")
        assert cursor >= 3
        w = (await store.windows())[NODE]
        await take(store, w, 4)
        await take(store, w, 5)
        assert min(store.tail.rows) > cursor
        got = await drain(store)
    assert got == [f"{NODE}:4:0", f"{NODE}:5:0"]


async def test_a_log_created_but_never_written_opens_empty(tmp_path: Path) -> None:
    queue = tmp_path / "queue.sqlite"
    async with Store(queue):
        pass
    log_of(queue).write_bytes(b"")  # the power went between the create and the header
    async with Store(queue) as store:
        store.deliver_every_s = 3600.0
        w = Window()
        await take(store, w, 1)
    assert intake.read(log_of(queue)) == []  # recorded at close, log started over


@pytest.mark.parametrize("content", [b"\0" * 20, b"\0" * 4096, b"LNTINTK1" + b"\0" * 12])
async def test_a_zero_filled_or_torn_header_is_one_config_error_and_kept(
        tmp_path: Path, content: bytes) -> None:
    queue = tmp_path / "queue.sqlite"
    async with Store(queue):
        pass
    log_of(queue).write_bytes(content)
    with pytest.raises(ConfigError, match="not an intake log"):
        async with Store(queue):
            pass
    assert log_of(queue).read_bytes() == content


async def test_the_log_is_private_to_the_gateway(tmp_path: Path) -> None:
    queue = tmp_path / "queue.sqlite"
    old = os.umask(0o022)
    try:
        async with Store(queue) as store:
            store.deliver_every_s = 3600.0
            w = Window()
            w.mark(1)
            await store.commit([Accepted(NODE, 1, b"", None, pack=pack(1), n=1)], {NODE: w})
    finally:
        os.umask(old)
    assert log_of(queue).stat().st_mode & 0o077 == 0


async def test_a_full_disk_at_the_logs_restart_loses_nothing(tmp_path: Path) -> None:
    """ENOSPC on the new epoch's header (/dev/full under the log's fd): the round's frames
    are in SQLite already; the next commit starts the new epoch first (nothing is appended
    under an epoch the header may no longer name), and its frame is read back."""
    queue = tmp_path / "queue.sqlite"
    async with Store(queue) as store:
        store.deliver_every_s = 3600.0
        w = Window()
        await take(store, w, 1)
        assert store._log is not None
        fd = store._log._fd
        saved, full = os.dup(fd), os.open("/dev/full", os.O_WRONLY)
        os.dup2(full, fd)
        try:
            await store._run(store._settle, True)  # the restart's header: ENOSPC
        finally:
            os.dup2(saved, fd)
            os.close(saved)
            os.close(full)
        await take(store, w, 2)
        seqs = [r[2] for rows, _ in intake.read(log_of(queue)) for r in rows]
        assert seqs == [2]  # frame 1 is in SQLite; frame 2 on the new epoch
        os.close(store._log._fd)  # a crash: the store never records frame 2 itself
        store._log._fd = -1
        store._db.close()  # type: ignore[union-attr]
        store._db = None
    async with Store(queue) as again:
        got = await drain(again)
    assert sorted(got) == [f"{NODE}:1:0", f"{NODE}:2:0"]


async def test_a_sink_down_for_long_keeps_the_tail_and_the_log_bounded(tmp_path: Path) -> None:
    """A street of many nodes, nobody delivering: the round ends at TAIL_MAX frames, so the
    tail and the log never hold more than a round."""
    from lantern.agent.queue import store as store_mod

    queue = tmp_path / "queue.sqlite"
    async with Store(queue) as store:
        store.deliver_every_s = 3600.0
        windows: dict[str, Window] = {}
        biggest = 0
        for i in range(store_mod.TAIL_MAX * 3 // 8):
            group = []
            for n in range(8):
                node = f"SL-{n:04d}"
                w = windows.setdefault(node, Window())
                w.mark(i + 1)
                group.append(Accepted(node, i + 1, b"", None, pack=pack(i + 1), n=1))
            await store.commit(group, {n: windows[n] for n in {f.node for f in group}})
            biggest = max(biggest, len(store.tail))
        assert biggest <= store_mod.TAIL_MAX
        assert log_of(queue).stat().st_size <= store_mod.LOG_MAX + (64 << 10)
        readings, _ = await store.depth()
    assert readings == store_mod.TAIL_MAX * 3


def _history_row(queue: Path, fmt: int, body: Any) -> None:
    con = sqlite3.connect(queue)
    try:
        con.execute("INSERT INTO recent (node, t, received_at, format, body)"
                    " VALUES (?, ?, ?, ?, ?)", (NODE, 1700000500.0, 1700000500.0, fmt, body))
        con.commit()
    finally:
        con.close()


@pytest.mark.parametrize("kind", ["bomb", "not deflate", "text body", "unknown format"])
async def test_a_bad_history_row_is_left_out_not_raised(tmp_path: Path, kind: str) -> None:
    queue = tmp_path / "queue.sqlite"
    async with Store(queue) as store:
        store.deliver_every_s = 3600.0
        w = Window()
        await take(store, w, 1)
        await drain(store)
    fmt, body = {
        "bomb": (PACK_Z_ROW, zlib.compress(b"\0" * (16 << 20))[2:-4]),
        "not deflate": (PACK_Z_ROW, b"\xff" * 40),
        "text body": (PACK_Z_ROW, "not bytes"),
        "unknown format": (7, b"\x00\x01"),
    }[kind]
    _history_row(queue, fmt, body)
    async with Store(queue) as store:
        readings, _, _ = await store.recent(NODE, 0, 100)
        overview = await store.overview()
    assert [r["t"] for r in readings] == [1700000001]  # the good row, read after a restart
    assert NODE in overview["latest"]


async def test_format_2_rows_read_back_after_a_restart(tmp_path: Path) -> None:
    queue = tmp_path / "queue.sqlite"
    async with Store(queue) as store:
        store.deliver_every_s = 3600.0
        await take(store, Window(), 1, 2)
        await drain(store)
    con = sqlite3.connect(queue)
    fmts = [f for (f,) in con.execute("SELECT format FROM recent")]
    con.close()
    assert fmts == [PACK_Z_ROW, PACK_Z_ROW]
    async with Store(queue) as store:
        readings, _, _ = await store.recent(NODE, 0, 100)
    assert [(r["t"], r["v"]) for r in readings] == [(1700000001, 21.5), (1700000002, 21.5)]
    assert len(deflate(pack(1))) < len(pack(1)) + 8


async def test_what_the_api_and_provision_see_while_frames_are_only_in_the_tail(
        tmp_path: Path) -> None:
    queue = tmp_path / "queue.sqlite"
    async with Store(queue) as store:
        store.deliver_every_s = 3600.0
        w = Window()
        await take(store, w, 7)
        await take(store, w, 8)
        assert len(store.tail) == 2
        readings, age = await store.depth()
        overview = await store.overview()
        recent, _, _ = await store.recent(NODE, 0, 100)
        mark = gateway_mark(queue, NODE)
    assert readings == 2 and age is not None
    assert overview["queue_readings"] == 2 and overview["nodes"][NODE]["frames"] == 2
    assert [r["t"] for r in recent] == [1700000007, 1700000008]
    assert mark.high == 8



async def test_a_short_write_on_a_nearly_full_disk_is_not_acknowledged(tmp_path: Path) -> None:
    """The file system takes part of a record and no more (a write across the last free
    block returns a short count, not ENOSPC; RLIMIT_FSIZE makes the same short write)."""
    queue = tmp_path / "queue.sqlite"
    said = run_child(queue, """
        import resource, signal
        store = await opened(path)
        w = Window()
        await take(store, w, 1)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        end = store._log._end
        resource.setrlimit(resource.RLIMIT_FSIZE, (end + 10, resource.RLIM_INFINITY))
        try:
            await take(store, w, 2)
        except Exception as e:
            print("refused", type(e).__name__, flush=True)
        else:
            print("acked", flush=True)
    """)
    async with Store(queue) as store:
        got = await drain(store)
    if "acked" in said:
        assert f"{NODE}:2:0" in got, f"frame 2 was acknowledged, then lost: {got}"
    assert "refused" in said, said


async def test_failed_commits_on_a_full_disk_do_not_leak_file_descriptors(
        tmp_path: Path) -> None:
    queue = tmp_path / "queue.sqlite"
    said = run_child(queue, """
        import resource, signal
        store = await opened(path)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))
        before = len(os.listdir("/proc/self/fd"))
        for i in range(50):  # the nodes retry: each retry is a commit that fails
            try:
                await take(store, Window(), 1)
            except Exception:
                pass
        print("fds", len(os.listdir("/proc/self/fd")) - before, flush=True)
    """)
    grown = int(said.split()[-1])
    assert grown < 5, f"{grown} file descriptors more after 50 failed commits"


@pytest.mark.parametrize("policy", ["evict_oldest", "pause_intake"])
async def test_the_disk_cap_holds_while_frames_go_through_the_log(tmp_path: Path,
                                                                    policy: str) -> None:
    """The sink is down; a node sends on. Without the log (deliver_every_s 0) the queue
    stays under its 0.4 MB (evicting, or pausing intake); with it, it must too."""
    from lantern.agent.queue.diskcap import disk_bytes

    queue = tmp_path / "queue.sqlite"
    cap = 400_000
    async with Store(queue) as store:
        store.deliver_every_s = 3600.0
        await store.limit(cap, policy)
        w = Window()
        for s in range(1, 3000):
            w.mark(s)
            body = cbor2.dumps([{-3: 1700000000 + s, 0: "temperature", 2: 21.5, 5: "x" * 200}])
            await store.commit([Accepted(NODE, s, b"", None, pack=body, n=1)], {NODE: w})
            if store.cap.paused:
                break
        size = disk_bytes(queue)
    assert size <= cap, f"{size} bytes on disk under a cap of {cap} ({policy})"
