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
RECORD_MAX = 16 << 20  # a length above this is a torn or foreign record, never allocated

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

    def open(self) -> list[tuple[list[Row], list[WindowRow]]]:
        """Open (creating it), and the records of the current round, in order."""
        new = not self.path.exists()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        if new:
            self._write_head(1)
            sync_dir(self.path.parent)
            return []
        data = _read_all(self._fd)
        if len(data) < _HEAD.size:
            # a log made but never written (power cut at creation): nothing was acknowledged
            self._write_head(1)
            return []
        magic, epoch, crc = _HEAD.unpack_from(data)
        if magic != MAGIC or crc != zlib.crc32(data[:16]):
            raise OSError(f"{self.path}: not an intake log (bad header); move it away only "
                          "once you know what wrote it: it may hold acknowledged frames")
        self.epoch = epoch
        out = []
        for payload, end in _records(data, epoch):
            out.append(_decode(payload))
            self._end = end
        return out

    def append(self, frames: list[Row], windows: list[WindowRow]) -> None:
        """One record, on disk before this returns (unless sync is off)."""
        payload = cbor2.dumps([[list(f) for f in frames], [list(w) for w in windows]])
        crc = zlib.crc32(struct.pack(">Q", self.epoch) + payload)
        rec = _REC.pack(len(payload), self.epoch, crc) + payload
        os.pwrite(self._fd, rec, self._end)
        if self.sync:
            os.fdatasync(self._fd)
        self._end += len(rec)
        self.appended += len(rec)

    def restart(self) -> None:
        """Everything appended so far is recorded elsewhere: a new round, from the top."""
        self._write_head(self.epoch + 1)
        self._end = _HEAD.size
        self.appended = 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _write_head(self, epoch: int) -> None:
        head = MAGIC + struct.pack(">Q", epoch)
        os.pwrite(self._fd, head + struct.pack(">I", zlib.crc32(head)), 0)
        if self.sync:
            os.fdatasync(self._fd)
        self.epoch = epoch


def _records(data: bytes, epoch: int) -> Iterator[tuple[bytes, int]]:
    at = _HEAD.size
    while at + _REC.size <= len(data):
        n, rec_epoch, crc = _REC.unpack_from(data, at)
        start, end = at + _REC.size, at + _REC.size + n
        if n > RECORD_MAX or end > len(data) or rec_epoch != epoch:
            return
        payload = data[start:end]
        if zlib.crc32(struct.pack(">Q", epoch) + payload) != crc:
            return
        yield payload, end
        at = end


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    chunks = []
    at = 0
    while at < size:
        chunk = os.pread(fd, min(1 << 20, size - at), at)
        if not chunk:
            break
        chunks.append(chunk)
        at += len(chunk)
    return b"".join(chunks)


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
        self.keys: dict[tuple[str, int], int] = {}  # (node, seq) → id
        self.high = 0  # the highest id given out this round (recorded at the flush)
        self.windows: dict[tuple[str, bytes], tuple[int, int]] = {}  # newest, per (node, key)
        self.seen: dict[str, tuple[float, int]] = {}  # node → last seen, frames this round
        self.bytes = 0

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, rows: list[Row], windows: list[WindowRow]) -> None:
        for r in rows:
            self.rows[r[0]] = r
            self.keys[(r[1], r[2])] = r[0]
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
        """Forget frames first..upto (delivered, or buried as dead letters)."""
        for fid in [f for f in self.rows if first <= f <= upto]:
            row = self.rows.pop(fid)
            self.keys.pop((row[1], row[2]), None)
            self.bytes -= len(row[6])

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
    for a tool that looks into a gateway's queue (lantern provision)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    if len(data) < _HEAD.size:
        return []
    magic, epoch, crc = _HEAD.unpack_from(data)
    if magic != MAGIC or crc != zlib.crc32(data[:16]):
        raise OSError(f"{path}: not an intake log (bad header)")
    return [_decode(payload) for payload, _ in _records(data, epoch)]


def _decode(payload: bytes) -> tuple[list[Row], list[WindowRow]]:
    frames, windows = cbor2.loads(payload)
    return [tuple(f) for f in frames], [tuple(w) for w in windows]
