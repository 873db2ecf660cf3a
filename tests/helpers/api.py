"""A gateway view for API tests: packs committed to a real store, fake links and forwarder."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from lantern.agent.queue.store import Accepted, Store, Window


def pack(node: str, seq: int, t: float, values: dict[str, Any]) -> Accepted:
    recs = []
    for i, (name, v) in enumerate(sorted(values.items())):
        r: dict[str, Any] = {"id": f"{node}:{seq}:{i}", "n": f"urn:dev:lantern:{node}:{name}",
                             "t": t}
        if isinstance(v, bool):
            r["vb"] = v
        elif isinstance(v, str):
            r["vs"] = v
        else:
            r["v"] = v
            r["u"] = "Cel" if name == "temperature" else "V" if name == "battery_v" else None
            if r["u"] is None:
                del r["u"]
        recs.append(r)
    return Accepted(node, seq, b"cose", recs)


async def commit(store: Store, frames: list[Accepted]) -> None:
    ws = {n: Window(w.high, w.bits) for n, w in (await store.windows()).items()}
    for f in frames:
        ws.setdefault(f.node, Window()).mark(f.seq)
    await store.commit(frames, ws)


@dataclass
class FakeLink:
    name: str
    connected: bool = True
    bytes_in: int = 0
    bytes_out: int = 0


@dataclass
class FakeForwarder:
    sink: Any = field(default_factory=lambda: SimpleNamespace(name="http"))
    upstream_ok: bool | None = True
