"""A seeded fault-injecting serial line, plugged into the simulation relay (tools/street/sim.py).

The line cuts each direction's byte stream into units at the 0x00 delimiters (a unit is
everything up to and including one 0x00, so a frame `00 COBS 00` is a bare delimiter unit
and a body unit). Faults then hit:

- bytes: `drop` (a byte vanishes) and `flip` (one bit of a byte inverted; `burst` > 1 makes
  the corrupted bytes come in runs of that mean length, as electrical noise does — the
  fraction of bytes corrupted stays `flip`);
- frames (body units): `lose`, `duplicate`, `truncate` (cut at a random point, the rest and
  its delimiter gone), `delay` (held back up to `delay_max_s`, order kept, like a stalled
  FIFO), `disconnect` (the line goes dead both ways for `disconnect_s`, then comes back).

Each direction draws from its own `random.Random` seeded from (seed, direction), so the same
bytes through the same spec always get the same faults, whatever the other direction does.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, fields

Deliver = Callable[[bytes], None]

# A unit longer than this without a delimiter is passed on as it is (noise, not a frame).
MAX_UNIT = 2048
# Bytes without a delimiter are passed on after this long, so a line never holds them forever.
HOLD_S = 0.05


@dataclass(frozen=True)
class FaultSpec:
    """Rates: per byte for drop and flip, per frame for the rest (0 ≤ rate ≤ 1)."""

    drop: float = 0.0
    flip: float = 0.0
    burst: float = 1.0
    lose: float = 0.0
    duplicate: float = 0.0
    truncate: float = 0.0
    delay: float = 0.0
    delay_max_s: float = 0.2
    disconnect: float = 0.0
    disconnect_s: float = 1.0

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("burst", "delay_max_s", "disconnect_s"):
                if not v >= (1.0 if f.name == "burst" else 0.0):
                    raise ValueError(f"fault spec: {f.name} out of range: {v!r}")
            elif not 0.0 <= v <= 1.0:
                raise ValueError(f"fault spec: {f.name} must be a rate in [0, 1], got {v!r}")

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class _Direction:
    """One direction of the line: its RNG, its partial unit and its ordered release queue."""

    def __init__(self, seed: int, name: str) -> None:
        self.rng = random.Random(f"{seed}:{name}")
        self.partial = bytearray()
        self.burst_left = 0
        self.released_at = 0.0  # loop time the last unit leaves; later units never overtake it
        self.timer: asyncio.TimerHandle | None = None  # passes on a partial unit held too long
        self.queue: deque[tuple[float, bytes, Deliver]] = deque()  # delayed units, in order
        self.release_timer: asyncio.TimerHandle | None = None


class Faults:
    """Apply a FaultSpec to both directions of a line; `stats[direction]` counts every fault."""

    def __init__(self, spec: FaultSpec, seed: int) -> None:
        self.spec = spec
        self.seed = seed
        self._dirs = {d: _Direction(seed, d) for d in ("up", "down")}
        self.stats: dict[str, Counter[str]] = {d: Counter() for d in self._dirs}
        self._dead_until = 0.0

    def feed(self, direction: str, data: bytes, deliver: Deliver) -> None:
        """Take bytes read from one side; deliver(...) gets what reaches the other side."""
        d = self._dirs[direction]
        st = self.stats[direction]
        st["bytes_in"] += len(data)
        start = 0
        while True:
            z = data.find(b"\x00", start)
            if z < 0:
                break
            d.partial += data[start:z + 1]
            start = z + 1
            self._unit(direction, bytes(d.partial), deliver)
            d.partial.clear()
        d.partial += data[start:]
        if d.timer is not None:
            d.timer.cancel()
            d.timer = None
        if len(d.partial) > MAX_UNIT:
            self._flush(direction, deliver)
        elif d.partial:
            d.timer = asyncio.get_running_loop().call_later(HOLD_S, self._flush, direction,
                                                             deliver)

    def _flush(self, direction: str, deliver: Deliver) -> None:
        d = self._dirs[direction]
        d.timer = None
        unit, d.partial = bytes(d.partial), bytearray()
        if unit:
            self._unit(direction, unit, deliver)

    def _unit(self, direction: str, unit: bytes, deliver: Deliver) -> None:
        d = self._dirs[direction]
        st = self.stats[direction]
        sp = self.spec
        rng = d.rng
        now = asyncio.get_running_loop().time()
        is_frame = len(unit) > 1
        if is_frame:
            st["frames"] += 1
            # Draw every decision, used or not, so one fault never shifts the others' dice.
            r_disc, r_lose, r_trunc, r_dup, r_delay = (rng.random() for _ in range(5))
            if r_disc < sp.disconnect and now >= self._dead_until:
                self._dead_until = now + sp.disconnect_s
                st["disconnects"] += 1
        if now < self._dead_until:
            st["bytes_lost_disconnected"] += len(unit)
            if is_frame:
                st["frames_lost_disconnected"] += 1
            return
        out = self._damage(d, st, unit)
        copies = 1
        if is_frame:
            if r_lose < sp.lose:
                st["frames_lost"] += 1
                return
            if r_trunc < sp.truncate and len(out) > 2:
                out = out[:rng.randrange(1, len(out) - 1)]  # at least one byte before the 00
                st["frames_truncated"] += 1
            if r_dup < sp.duplicate:
                copies = 2
                st["frames_duplicated"] += 1
            if out != unit:
                st["frames_damaged"] += 1
        delay = 0.0
        if is_frame and r_delay < sp.delay:
            delay = rng.uniform(0.0, sp.delay_max_s)
            st["frames_delayed"] += 1
        self._release(d, st, out * copies, now, delay, deliver)

    def _damage(self, d: _Direction, st: Counter[str], unit: bytes) -> bytes:
        """Byte drops and bit flips (in bursts) over one unit."""
        sp = self.spec
        if not (sp.drop or sp.flip):
            return unit
        rng = d.rng
        start_p = sp.flip / sp.burst  # burst starts per byte, so that flip of all bytes are hit
        keep_p = 1.0 - 1.0 / sp.burst  # a burst goes on with this chance: mean length `burst`
        out = bytearray()
        for b in unit:
            if d.burst_left == 0 and rng.random() < start_p:
                d.burst_left = 1
                while rng.random() < keep_p:
                    d.burst_left += 1
            if d.burst_left:
                d.burst_left -= 1
                b ^= 1 << rng.randrange(8)
                st["bytes_corrupted"] += 1
            if sp.drop and rng.random() < sp.drop:
                st["bytes_dropped"] += 1
                continue
            out.append(b)
        return bytes(out)

    def _release(self, d: _Direction, st: Counter[str], data: bytes, now: float, delay: float,
                 deliver: Deliver) -> None:
        if not data:
            return
        st["bytes_out"] += len(data)
        at = max(now + delay, d.released_at)
        d.released_at = at
        if at <= now and not d.queue:
            deliver(data)
            return
        d.queue.append((at, data, deliver))
        if d.release_timer is None:
            d.release_timer = asyncio.get_running_loop().call_at(d.queue[0][0], self._drain, d)

    def _drain(self, d: _Direction) -> None:
        """Pass on the delayed units that are due, strictly in the order they came."""
        loop = asyncio.get_running_loop()
        d.release_timer = None
        while d.queue and d.queue[0][0] <= loop.time():
            _, data, deliver = d.queue.popleft()
            deliver(data)
        if d.queue:
            d.release_timer = loop.call_at(d.queue[0][0], self._drain, d)

    def close(self) -> None:
        """Cancel the timers (the relay is closing)."""
        for d in self._dirs.values():
            for t in (d.timer, d.release_timer):
                if t is not None:
                    t.cancel()
            d.timer = d.release_timer = None
            d.queue.clear()

    def summary(self) -> dict[str, dict[str, int]]:
        return {direction: dict(sorted(c.items())) for direction, c in self.stats.items()}
