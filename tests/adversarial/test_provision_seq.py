"""Review finding 4, second half: a re-provisioned node's frame sequence must not go back.

A new key after an erase closes the replay hole, but the node's sequence restarted at 0 under
it. Reading ids and upstream idempotency keys are `node:seq:index`, so an idempotent platform
dropped the new key's readings as repeats of the old key's; and while frames of the old key
with the same (node, seq) still waited in the gateway's queue, the new ones became
`seq_collision` dead letters instead of being delivered.

Here `lantern provision node` runs whole (tools/field/provision.py), its esptool and mpremote runs
carried out against a directory standing for the board's flash: mpremote's `exec`/`run` scripts
run on the MicroPython unix port there, as the board's REPL would run them. The node's own
firmware (node.app seal, node.outbox) then boots on that flash and seals frames, and a real
gateway store and ingest take them and deliver them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sqlite3
import time
from pathlib import Path
from types import SimpleNamespace

import cbor2
import pytest

from lantern.agent import protocol
from lantern.agent.config import load_keys, write_secret
from lantern.agent.ingest import Ingest
from lantern.agent.queue.store import Store
from lantern.tools.field import provision as pv
from lantern.tools.field import provision_steps as ps
from lantern.tools.street.sim import gateway_toml
from tests.helpers.flash import Flash

from .gateway_harness import RecordingLink, ingest_running

ROOT = Path(__file__).resolve().parents[2]
MICROPYTHON = ROOT / ".build/micropython/unix/micropython"
NODE = "SL-0042"
KID = NODE.encode()
OLD_KEY = bytes(range(32))
UPSTREAM = "http://127.0.0.1:9/"  # a gateway config's sink (never reached here)
T_OLD, T_NEW = 1_767_225_600, 1_767_312_000  # Unix seconds: readings before and after the wipe

pytestmark = pytest.mark.micropython






def legacy_node(flash: Flash, n: int, first_seq: int | None = None) -> dict[int, bytes]:
    """A node provisioned before this fix: key file, config, and a sequence from 0 (or
    `first_seq`, where its state file says so), `n` packs sealed."""
    cfg = {"id": NODE, "board": "board.json", "state_dir": "state", "key_file": "node.key",
           "link": {"port": "link", "baud": 115200}}
    (flash.root / "node.json").write_text(json.dumps(cfg))
    write_secret(flash.root / "node.key", OLD_KEY.hex() + "\n")
    if first_seq is not None:
        (flash.root / "state").mkdir()
        (flash.root / "state/seq").write_text(str(first_seq))
    return flash.seal(n, T_OLD)


def provision(tmp: Path, flash: Flash, monkeypatch: pytest.MonkeyPatch,
              capsys: pytest.CaptureFixture[str], *extra: str, code: int = 0) -> str:
    """`lantern provision node --flash IMAGE --erase ...` as an installer runs it."""
    image = tmp / "micropython.bin"
    image.write_bytes(b"\xe9" + bytes(4095))
    monkeypatch.setattr(pv, "_run", flash.run)
    monkeypatch.setattr(ps, "soft_reset", lambda port: None)
    parser = argparse.ArgumentParser()
    pv.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args([
        "provision", "node", "--board", "esp32-devkitc", "--id", NODE, "--port", "/dev/ttyUSB0",
        "--flash", str(image), "--erase", "--firmware", "frozen", "--out", str(tmp / "stage"),
        *([] if "--gateway-config" in extra else ["--keys", str(tmp / "keys.toml")]), *extra])
    capsys.readouterr()
    got = pv.main(args)
    out, err = capsys.readouterr()
    assert got == code, out + err
    return out if code == 0 else err


def acked(link: RecordingLink) -> set[int]:
    """Every sequence number the gateway's ACKs named so far."""
    out: set[int] = set()
    for raw in link.sent:
        ftype, body = protocol.decode_frame(raw.strip(b"\0"))
        assert ftype == protocol.ACK
        out.update(cbor2.loads(protocol.parse_mac0(body).payload)[protocol.ACK_SEQS])
    return out


async def take(ing: Ingest, link: RecordingLink, frames: dict[int, bytes]) -> None:
    """The node's frames over its link, in order; returns once every one is ACKed."""
    for seq in sorted(frames):
        ing.on_data(link, protocol.encode_frame(protocol.DATA, frames[seq]))
    for _ in range(2000):
        if set(frames) <= acked(link):
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"ACKed {sorted(acked(link))}, expected {sorted(frames)}")


async def deliver(store: Store, max_records: int = 10_000) -> list[str]:
    """One batch to the upstream platform: its reading ids (the idempotency keys' source)."""
    batch = await store.next_batch(max_records)
    if batch is None:
        return []
    await store.delivered(batch)
    return batch.rids


def dead_letters(db: Path) -> list[tuple[int, str]]:
    with contextlib.closing(sqlite3.connect(db)) as c:
        return [(s, r.split(":")[0]) for s, r in c.execute(
            "SELECT seq, reason FROM dead_letters ORDER BY id")]


async def test_after_an_erase_the_new_keys_frames_are_delivered_under_new_reading_ids(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    assert MICROPYTHON.exists(), f"{MICROPYTHON} missing: run `make micropython`"
    keys = tmp_path / "keys.toml"
    write_secret(keys, ps.keys_text(keys, NODE, OLD_KEY))
    flash = Flash(tmp_path)
    old = legacy_node(flash, 6)
    assert sorted(old) == list(range(6))

    # in service: the gateway took all six; the platform has the first two, four still wait
    # (the uplink is down, say) when the installer wipes the board and provisions it again
    db = tmp_path / "gw/queue.sqlite"
    link = RecordingLink()
    async with ingest_running(db, load_keys(keys)) as (ing, store):
        await take(ing, link, old)
        upstream = await deliver(store, max_records=2)
    assert upstream == [f"{NODE}:0:0", f"{NODE}:1:0"]

    out = provision(tmp_path, flash, monkeypatch, capsys)
    new_key = load_keys(keys)[KID]
    assert new_key != OLD_KEY
    assert "the new key's frame sequence starts at" in out, out
    print(out)
    new = flash.seal(6, T_NEW)

    # restarted with the new key file
    async with ingest_running(db, load_keys(keys)) as (ing, store):
        await take(ing, link, new)
        while rids := await deliver(store):
            upstream += rids

    assert dead_letters(db) == [], "the new key's frames were dead-lettered as collisions"
    assert len(upstream) == len(set(upstream)), "a reading id reached the platform twice: " \
        f"{sorted(r for r in upstream if upstream.count(r) > 1)}"
    assert {f"{NODE}:{s}:0" for s in old} | {f"{NODE}:{s}:0" for s in new} == set(upstream)
    assert min(new) > max(old)


async def test_the_gateways_high_mark_decides_where_it_is_above_the_clock(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Provisioning on the gateway's host, while it runs: its queue says how far the node id
    has counted, even where that is above the clock floor (a node whose sequence was set
    ahead, a laptop clock behind)."""
    state = tmp_path / "gw-state"
    keys = state / "keys.toml"
    state.mkdir()
    write_secret(keys, ps.keys_text(keys, NODE, OLD_KEY))
    gw_toml = tmp_path / "gateway.toml"
    gw_toml.write_text(gateway_toml(state, keys, ["/dev/ttyAMA0"], UPSTREAM))
    flash = Flash(tmp_path)
    ahead = int(time.time() * 1000) + 10**9  # about 12 days ahead of the clock floor
    old = legacy_node(flash, 4, first_seq=ahead)
    assert sorted(old) == list(range(ahead, ahead + 4))
    link = RecordingLink()
    async with ingest_running(state / ps.QUEUE_FILE, load_keys(keys)) as (ing, store):
        await take(ing, link, old)  # nothing delivered yet: all four still queued
        out = provision(tmp_path, flash, monkeypatch, capsys, "--gateway-config", str(gw_toml))
        assert load_keys(keys)[KID] != OLD_KEY  # --keys defaults to the gateway's key file
        assert f"frame sequence starts at {ahead + 4}: the gateway's high mark {ahead + 3} + 1 " \
               f"(from {state / ps.QUEUE_FILE}" in out, out
        new = flash.seal(3, T_NEW)
    async with ingest_running(state / ps.QUEUE_FILE, load_keys(keys)) as (ing, store):
        await take(ing, link, new)
        upstream = []
        while rids := await deliver(store):
            upstream += rids
    assert sorted(new) == list(range(ahead + 4, ahead + 7))
    assert dead_letters(state / ps.QUEUE_FILE) == []
    assert sorted(upstream) == sorted(f"{NODE}:{s}:0" for s in [*old, *new])


async def test_a_node_with_no_record_at_the_gateway_starts_at_the_clock_floor(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "gw-state"
    gw_toml = tmp_path / "gateway.toml"
    gw_toml.write_text(gateway_toml(state, Path("keys.toml"), ["/dev/ttyAMA0"], UPSTREAM))
    flash = Flash(tmp_path)
    before = int(time.time() * 1000)
    out = provision(tmp_path, flash, monkeypatch, capsys, "--gateway-config", str(gw_toml))
    assert f"the gateway's queue {state / ps.QUEUE_FILE} has no frame of this node" in out
    assert (tmp_path / "keys.toml").exists()  # the gateway config's keys_file, beside it
    first = min(flash.seal(1, T_NEW))
    assert before <= first <= int(time.time() * 1000)
    names = sorted(p.name for p in (flash.root / "state/outbox").iterdir())
    assert names == [f"{first:010d}"] and len(names[0]) == 13


# Runs on MicroPython where the node's state is: the tool's script never lowers a sequence.
@pytest.mark.parametrize(("seq_file", "outbox", "start", "expect"), [
    (None, [], 1_800_000_000_000, 1_800_000_000_000),  # a wiped node
    ("64", [3, 40], 1_800_000_000_000, 1_800_000_000_000),  # --new-key over a node at 64
    ("1900000000032", [], 1_800_000_000_000, 1_900_000_000_032),  # it counts higher already
    ("32", [1_900_000_000_005], 1_800_000_000_000, 1_900_000_000_006),  # a frame above its file
    ("garbage", [], 1_800_000_000_000, 1_800_000_000_000),  # a torn file cannot lower it
])
def test_the_sequence_script_only_ever_raises_the_nodes_sequence(
        tmp_path: Path, seq_file: str | None, outbox: list[int], start: int,
        expect: int) -> None:
    flash = Flash(tmp_path)
    state = flash.root / "state"
    if seq_file is not None or outbox:
        (state / "outbox").mkdir(parents=True)
    if seq_file is not None:
        (state / "seq").write_text(seq_file)
    for s in outbox:
        (state / "outbox" / f"{s:010d}").write_bytes(b"frame")
    (state / "outbox" / "0000000099.tmp").parent.mkdir(parents=True, exist_ok=True)
    (state / "outbox" / "0000000099.tmp").write_bytes(b"torn")
    out = flash.micropython(ps.seq_script("state", start))
    assert ps.parse_seq_report(out) == expect
    assert (state / "seq").read_text() == str(expect)
    assert not (state / "seq.tmp").exists()
    # and the node's own outbox hands out exactly that number next
    n = flash.micropython("from node.outbox import Outbox\nprint(Outbox('state').next_seq())\n")
    assert int(n) == expect


def test_a_computer_clock_before_2026_stops_the_run_before_anything_is_erased(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    flash = Flash(tmp_path)
    flat_rtc = SimpleNamespace(time=lambda: 946_684_800.0, monotonic=time.monotonic)  # 2000
    monkeypatch.setattr(pv, "time", flat_rtc)
    monkeypatch.setattr(pv, "_run", flash.run)
    parser = argparse.ArgumentParser()
    pv.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["provision", "node", "--board", "esp32-devkitc", "--id", NODE,
                              "--port", "/dev/ttyUSB0", "--flash", str(tmp_path / "mp.bin"),
                              "--erase", "--keys", str(tmp_path / "keys.toml"),
                              "--out", str(tmp_path / "stage")])
    (tmp_path / "mp.bin").write_bytes(b"\xe9")
    assert pv.main(args) == 1
    err = capsys.readouterr().err
    assert "step check failed: this computer's clock says 2000-01-01 00:00:00 UTC" in err, err
    assert "what to do: set this computer's clock" in err
    assert flash.ran == [] and not (tmp_path / "keys.toml").exists()


@pytest.mark.parametrize("interval", ["0.5", "0", "-1", "100000"])
def test_an_interval_the_node_would_not_accept_is_refused(tmp_path: Path,
                                                          interval: str) -> None:
    parser = argparse.ArgumentParser()
    pv.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["provision", "node", "--board", "esp32-devkitc", "--id", NODE,
                              "--interval", interval, "--out", str(tmp_path / "stage")])
    with pytest.raises(pv.StepError) as e:
        pv.plan(args)
    assert e.value.what.startswith(f"--interval {float(interval):g}: a node samples every 1 to")


def test_an_unreadable_gateway_queue_stops_the_deploy_and_says_what_to_do(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "gw-state"
    state.mkdir()
    (state / ps.QUEUE_FILE).write_bytes(b"not a database" * 100)
    gw_toml = tmp_path / "gateway.toml"
    gw_toml.write_text(gateway_toml(state, Path("keys.toml"), ["/dev/ttyAMA0"], UPSTREAM))
    flash = Flash(tmp_path)
    err = provision(tmp_path, flash, monkeypatch, capsys, "--gateway-config", str(gw_toml),
                    code=1)
    assert "step deploy failed: cannot read the gateway's queue" in err, err
    assert "drop --gateway-config to start from the clock floor" in err
    assert "resume with: lantern " in err and err.rstrip().endswith("--from deploy")
    assert not any("fs" in argv for argv in flash.ran), "deployed without a sequence start"
