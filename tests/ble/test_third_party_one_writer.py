"""Third-party BTHome readings enter the queue through ingest, its one writer (issue 14).

So the disk cap's pause-intake applies to them as to node frames: refused as queue_full while
paused (and not marked as seen, so the next advert is taken), committed by ingest's group
commit once intake resumes, reported lost to their maker when a commit fails (nothing resends
an advert), and their replay window restored by ingest after a restart.
"""

from __future__ import annotations

import asyncio
import sqlite3
import struct
from collections import Counter
from pathlib import Path

import pytest

from lantern.agent.errors import FrameError
from lantern.agent.ingest import Ingest
from lantern.agent.links.ble_adverts import ThirdParty
from lantern.agent.links.ble_config import BleDeviceConfig
from lantern.agent.metrics import Metrics
from lantern.agent.queue.store import Store

ADDR = "F0:00:00:00:03:02"


def plain(pid: int, t: float) -> bytes:
    """An unencrypted BTHome v2 advert: packet id, then temperature in 0.01 °C."""
    return b"\x40\x00" + bytes((pid,)) + b"\x02" + struct.pack("<h", round(t * 100))


async def until(pred: object, what: str) -> None:
    for _ in range(500):
        if pred():  # type: ignore[operator]
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out: {what}")


async def test_adverts_go_through_ingest_under_pause_intake(tmp_path: Path) -> None:
    async with Store(tmp_path / "q.sqlite") as store:
        ing = Ingest(store, {}, Metrics())
        await ing.start()
        stats: Counter[str] = Counter()
        tp = ThirdParty((BleDeviceConfig(ADDR, "kiosk"),), ing, 60.0, stats, "ble:hci0")
        runner = asyncio.create_task(ing.run())
        committed = asyncio.Event()
        ing.listeners.append(committed)
        try:
            store.cap.paused = True  # the disk cap holds intake
            with pytest.raises(FrameError) as e:
                tp.on_advert(ADDR, plain(1, 21.0))
            assert e.value.kind == "queue_full"
            assert stats["third_party_readings"] == 0

            store.cap.paused = False  # the same advert again, once intake resumes
            tp.on_advert(ADDR, plain(1, 21.0))
            await asyncio.wait_for(committed.wait(), 10)
            assert stats["third_party_readings"] == 1 and ing.metrics.readings_stored == 1
            assert ing.windows["bthome:kiosk"].high == 1

            real = store.commit

            async def broken(*args: object) -> None:
                raise sqlite3.OperationalError("disk I/O error (simulated)")

            store.commit = broken  # type: ignore[method-assign]
            tp.on_advert(ADDR, plain(2, 22.0))
            await until(lambda: stats["store_errors"] == 1, "the lost commit counted")
            store.commit = real  # type: ignore[method-assign]
            committed.clear()
            tp.on_advert(ADDR, plain(3, 23.0))
            await asyncio.wait_for(committed.wait(), 10)
            assert stats["third_party_readings"] == 2
        finally:
            runner.cancel()
    async with Store(tmp_path / "q.sqlite") as store:  # a restart
        ing = Ingest(store, {}, Metrics())
        await ing.start()
        seqs = [r[0] for r in store.db.execute("SELECT seq FROM frames ORDER BY seq")]
        assert len(seqs) == 2  # the two adverts taken; the lost one is not there
        assert ing.windows["bthome:kiosk"].high == max(seqs)
