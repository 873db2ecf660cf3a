"""A relative pack without time.q, received while the gateway's clock was unsynchronised with
no step known: fix_times (agent/timesync.py) adds the gateway's time.q record, which must carry
an id like the pack's own records (`<node>:<seq>:<n>`, agent/queue/resolve.py) — else the
forward stage (agent/queue/batches.py) could not list the frame's ids and would bury it as an
"internal" dead letter."""

from __future__ import annotations

from pathlib import Path

import cbor2

from lantern.agent.queue.store import Accepted, Store
from lantern.agent.timesync import GATEWAY_UNSYNCED, TimeSync
from tests.helpers.api import commit
from tests.helpers.timecheck import KernelClock

NO_TIME_Q = cbor2.dumps([{0: "uptime", 2: 40, -3: -30}, {0: "lux", 2: 3, -3: -20}])


async def test_a_relative_pack_without_time_q_gets_a_flag_with_an_id(tmp_path: Path) -> None:
    state = tmp_path / "clock.json"
    TimeSync(probe=KernelClock(False), path=state).state()  # a span left open: no step known
    ts = TimeSync(probe=KernelClock(True), path=state)
    async with Store(tmp_path / "queue.sqlite") as store:
        store.out.clock = store.history.clock = ts
        await commit(store, [Accepted("SL-0042", 7, b"cose", None, pack=NO_TIME_Q, n=2)])
        batch = store.out.next_batch(100)
        assert batch is not None
        store.cap.release(batch.first_id, batch.last_id)
        upstream = batch.records()
        dead = store.db.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
        rows, _, _ = await store.recent("SL-0042", 0, 100)
    assert dead == 0
    assert [r["id"] for r in upstream] == ["SL-0042:7:0", "SL-0042:7:1", "SL-0042:7:2"]
    flag = upstream[2]
    assert flag["n"].endswith(":time.q") and flag["v"] == GATEWAY_UNSYNCED
    assert flag["t"] == upstream[0]["t"]
    assert sorted(r["n"] for r in rows) == ["lux", "time.q", "uptime"]
