"""The intake log and the tail: what an ACK waits for on a street's trickle (issue 22).

On a street (tens of nodes, a frame a minute each) a group commit holds two or three frames,
and a SQLite commit of them rewrites some ten pages into the WAL (the frames' leaves, their
index, the replay windows, the nodes' rows, the database header), each synced before the
ACK. Here the ACK waits for less: the group's frames and windows appended to one file,
`queue.sqlite-intake`, and synced (fdatasync) — the page or two the append touches. The
frames then wait in memory (`Tail`) with the ids the store gave them. The forward stage reads
them from there like rows of the queue; the store records them into SQLite in bulk, with
the deliveries it records every `[queue] deliver_every_s` (store.py `_settle`), leaving out
the ones every sink already has (those enter only the history), then starts the log over.
After a power cut the log's records are put into SQLite when the store opens, before
anything else reads the queue.

The file: a header (magic, epoch, CRC-32 of both) and records after it, each a length, the
epoch and a CRC-32 of (epoch, payload), then the payload (CBOR: the frames' rows and the
windows). Starting over writes a new epoch in the header, synced, and appends from just after
it; the file keeps its size, so a sync after an append has no size to record. Reading stops at
the first record that is short, fails its CRC or has another epoch: a torn append, or the
records of an earlier round.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import cbor2

log = logging.getLogger("lantern.store")

SUFFIX = "-intake"  # the log's name: the queue's, with this after it
MAGIC = b"LNTINTK1"
_HEAD = struct.Struct(">8sQI")  # magic, epoch, crc32(magic + epoch)
_REC = struct.Struct(">IQI")  # payload length, epoch, crc32(epoch + payload)
RECORD_MAX = 1 << 20  # a length above this is a torn or foreign record, never allocated

# a frame in the tail, as a frames row: id, node, seq, received_at, readings, format, body
Row = tuple[int, str, int, float, int, int, bytes]
# a replay window as recorded: node, key id, high, bitmap (unsigned)
WindowRow = tuple[str, bytes, int, int]


class IntakeLog:
    """Append-only, synced; `records()` once at open, then `append` and `restart`."""

    def __init__(self, path: Path, sync: bool = True) -> None:
        self.path = path
        self.sync = sync  # False only where durability is weakened on purpose (powercut.py)
        self.epoch = 0
        self._fd = -1
        self._end = _HEAD.size
        self.appended = 0  # bytes appended this round
        # a new epoch's header may be on disk without its sync: appends under the old epoch
        # would not be read back. Nothing is appended until a restart succeeds
        self.broken = False

    def open(self) -> list[tuple[list[Row], list[WindowRow]]]:
        """Open (creating it), and the records of the current round, in order. OSError if it
        cannot be read or written; ValueError if it is not an intake log of this store."""
        new = not self.path.exists()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            return self._open(new)
        except BaseException:
            self.close()
            raise

    def _open(self, new: bool) -> list[tuple[list[Row], list[WindowRow]]]:
        if new:
            self._write_head(1)
            sync_dir(self.path.parent)
            return []
        size = os.fstat(self._fd).st_size
        if size < _HEAD.size:
            # a log made but never written (power cut at creation): nothing was acknowledged
            self._write_head(1)
            return []
        epoch = _epoch(os.pread(self._fd, _HEAD.size, 0))
        self.epoch = epoch
        out = []
        for payload, end in _records(self._fd, size, epoch):
            out.append(_decode(payload))
            self._end = end
        return out

    def append(self, frames: list[Row], windows: list[WindowRow]) -> None:
        """One record, on disk before this returns (unless sync is off). OSError if not."""
        if self.broken:
            raise OSError(errno.EIO, "its last restart did not reach the disk")
        payload = cbor2.dumps([[list(f) for f in frames], [list(w) for w in windows]])
        crc = zlib.crc32(struct.pack(">Q", self.epoch) + payload)
        rec = _REC.pack(len(payload), self.epoch, crc) + payload
        if os.pwrite(self._fd, rec, self._end) != len(rec):  # (the disk's last free block)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if self.sync:
            os.fdatasync(self._fd)
        self._end += len(rec)
        self.appended += len(rec)

    def restart(self, shrink: bool = False) -> None:
        """Everything appended so far is recorded elsewhere: a new round, from the top.
        shrink: the file gives its space back (under a disk cap), at the cost of recording
        its size again as it grows; else it keeps it, and a sync after an append has no size
        to record."""
        self.broken = True
        if shrink:
            os.ftruncate(self._fd, _HEAD.size)
        self._write_head(self.epoch + 1)
        self.broken = False
        self._end = _HEAD.size
        self.appended = 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _write_head(self, epoch: int) -> None:
        head = MAGIC + struct.pack(">Q", epoch)
        data = head + struct.pack(">I", zlib.crc32(head))
        if os.pwrite(self._fd, data, 0) != len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if self.sync:
            os.fdatasync(self._fd)
        self.epoch = epoch


def _epoch(head: bytes) -> int:
    if len(head) < _HEAD.size:
        raise ValueError("not an intake log (short header)")
    magic, epoch, crc = _HEAD.unpack_from(head)
    if magic != MAGIC or crc != zlib.crc32(head[:16]):
        raise ValueError("not an intake log (bad header)")
    return int(epoch)


def _records(fd: int, size: int, epoch: int) -> Iterator[tuple[bytes, int]]:
    """The round's records, read one at a time (never the whole file at once)."""
    at = _HEAD.size
    while at + _REC.size <= size:
        n, rec_epoch, crc = _REC.unpack_from(os.pread(fd, _REC.size, at))
        start, end = at + _REC.size, at + _REC.size + n
        if n > RECORD_MAX or end > size or rec_epoch != epoch:
            return
        payload = os.pread(fd, n, start)
        if len(payload) != n or zlib.crc32(struct.pack(">Q", epoch) + payload) != crc:
            return
        yield payload, end
        at = end


def sync_dir(path: Path) -> None:
    """fsync a directory: the names created in it survive a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Tail:
    """Frames on the intake log, not yet in SQLite: id → row, oldest first."""

    def __init__(self) -> None:
        self.rows: dict[int, Row] = {}
        self.keys: set[tuple[str, int]] = set()  # (node, seq) of the whole round
        self.high = 0  # the highest id given out this round (recorded at the flush)
        self.windows: dict[tuple[str, bytes], tuple[int, int]] = {}  # newest, per (node, key)
        self.seen: dict[str, tuple[float, int]] = {}  # node → last seen, frames this round
        self.bytes = 0

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, rows: list[Row], windows: list[WindowRow]) -> None:
        for r in rows:
            self.rows[r[0]] = r
            self.keys.add((r[1], r[2]))
            self.high = max(self.high, r[0])
            self.bytes += len(r[6])
            last, n = self.seen.get(r[1], (0.0, 0))
            self.seen[r[1]] = (max(last, r[3]), n + 1)
        for node, key, high, bits in windows:
            old = self.windows.get((node, key))
            if old is None or high >= old[0]:
                self.windows[(node, key)] = (high, bits)

    def after(self, after_id: int, limit: int) -> list[Row]:
        out = []
        for fid, row in self.rows.items():  # (ids ascend in insertion order)
            if fid > after_id:
                out.append(row)
                if len(out) >= limit:
                    break
        return out

    def drop(self, upto: int, first: int = 0) -> None:
        """Forget frames first..upto (delivered, or buried as dead letters). Their (node,
        seq) stays known until the round ends: the log holds them, and a frame of the same
        (node, seq) must not share a round with them (replay would keep only the first)."""
        for fid in [f for f in self.rows if first <= f <= upto]:
            self.bytes -= len(self.rows.pop(fid)[6])

    def waiting(self, floor: int) -> tuple[int, int, float | None]:
        """Readings, bytes and the oldest receipt of the frames after `floor`."""
        rows = [r for f, r in self.rows.items() if f > floor]
        return (sum(r[4] for r in rows), sum(len(r[6]) for r in rows),
                rows[0][3] if rows else None)

    def clear(self) -> None:
        self.rows.clear()
        self.keys.clear()
        self.windows.clear()
        self.seen.clear()
        self.bytes = 0
        self.high = 0


def read(path: Path) -> list[tuple[list[Row], list[WindowRow]]]:
    """The current round's records of the log at `path`, read only ([] if there is none):
    for a tool that looks into a gateway's queue (lantern provision). ValueError if it is not
    an intake log."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return []
    try:
        size = os.fstat(fd).st_size
        if size < _HEAD.size:
            return []
        epoch = _epoch(os.pread(fd, _HEAD.size, 0))
        return [_decode(payload) for payload, _ in _records(fd, size, epoch)]
    finally:
        os.close(fd)


def _decode(payload: bytes) -> tuple[list[Row], list[WindowRow]]:
    """A record's rows, each checked: ValueError if it is not one this store wrote."""
    try:
        frames, windows = cbor2.loads(payload)
        rows = [_row(f) for f in frames]
        wrows = [_window(w) for w in windows]
    except (ValueError, TypeError, IndexError) as e:  # (CBORDecodeError is a ValueError)
        raise ValueError(f"a record that is not one of this store's ({e})") from None
    return rows, wrows


def _int(x: object, lo: int = 0, hi: int = (1 << 63) - 1) -> int:
    if type(x) is not int or not lo <= x <= hi:
        raise ValueError(f"{x!r} is not a whole number from {lo} to {hi}")
    return x


def _row(f: object) -> Row:
    if not isinstance(f, list) or len(f) != 7:
        raise ValueError("a frame row is a list of 7")
    fid, node, seq, at, n, fmt, body = f
    if not isinstance(node, str) or not isinstance(body, bytes) or type(at) not in (int, float):
        raise ValueError("a frame row's node, time or body")
    return (_int(fid, 1), node, _int(seq), float(at), _int(n), _int(fmt, 0, 1), body)


def _window(w: object) -> WindowRow:
    if not isinstance(w, list) or len(w) != 4:
        raise ValueError("a window row is a list of 4")
    node, key, high, bits = w
    if not isinstance(node, str) or not isinstance(key, bytes):
        raise ValueError("a window row's node or key")
    return node, key, _int(high, -1), _int(bits, 0, (1 << 64) - 1)
