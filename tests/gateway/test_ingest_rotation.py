"""Ingest around a live key rotation (issue 17): each frame is marked, and kept on disk, in
the replay window of the key it verified under, whatever else shares its group commit."""

from __future__ import annotations

import asyncio
from pathlib import Path

from lantern.agent import protocol
from lantern.agent.fleetops import FleetOps
from tests.helpers.fleet import Link, frame, gateway, rotate, send

A = "SL-0001"
KA, KN = bytes(range(32)), bytes(range(100, 132))


async def test_old_and_new_key_frames_of_one_group_commit_mark_their_own_windows(
        tmp_path: Path) -> None:
    async with gateway(tmp_path, {A: KA}) as (ingest, fleet, metrics, store):
        link = Link()
        ops = fleet.attach(ingest, [link], metrics)
        assert isinstance(ops, FleetOps)
        await send(ingest, link, frame(KA, A, 1))
        await rotate(fleet, ops, A, KA, KN, 3)
        commits, acks = metrics.commits, len(link.sent)
        ingest.committed.clear()
        ingest.on_data(link, frame(KA, A, 2))  # both taken before the commit task runs:
        ingest.on_data(link, frame(KN, A, 3))  # one group
        await asyncio.wait_for(ingest.committed.wait(), 10)
        assert metrics.commits == commits + 1 and not ingest._pending_ids
        assert len(link.sent) == acks + 1  # one ACK: seq 2 and seq 3 acknowledged
        on_disk = await store.key_windows()
        old, new = on_disk[(A, protocol.key_id(KA))], on_disk[(A, protocol.key_id(KN))]
        assert (old.high, old.seen(1), new.high, new.seen(2)) == (2, True, 3, False)
        assert ingest.windows[A].key == protocol.key_id(KN)  # the node's current one
        # either frame again: a duplicate, acknowledged again and not taken
        for key, seq in ((KA, 2), (KN, 3), (KA, 1)):
            ingest.on_data(link, frame(key, A, seq))
            assert (A, seq) not in ingest._pending_ids
        assert metrics.duplicates[A] == 3 and ingest.windows[A].key == protocol.key_id(KN)
