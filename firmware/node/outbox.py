"""Persistent outbox and frame sequence: survives restarts and power cuts.

Every file is written to a temporary name and renamed into place, so a power cut leaves
either the old or the new file, never a torn one (POSIX rename and littlefs both give this).
"""

import os

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


# Sequence numbers are reserved in blocks so flash sees one write per block, not per frame;
# a power cut skips at most the rest of the block and never reuses a number.
SEQ_BLOCK = const(32)
# Sequence numbers of the oldest waiting frames kept in RAM: more than any transmit window.
HEAD = const(16)
# Flash blocks kept free: littlefs gives each frame a block of its own (a 4 KB block on ESP32
# holds one 300-500 byte frame), so a 2 MB partition fills near 470 frames, below max_frames.
# A full flash would refuse the counter files too (frame sequence, BTHome counter, command
# floor): no pack sealed, no advert, no diagnostics. The oldest frames go first, as at the cap.
FREE_BLOCKS = const(8)


def _exists(path):
    try:
        os.stat(path)
        return True
    except OSError:
        return False


def _write_atomic(path, data):
    """Replace path with data, or raise and leave the old file as it was."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.rename(tmp, path)
    except OSError:
        # flash full (ENOSPC) or a write error: a partial temporary file would hold its
        # blocks until the next boot
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def _spare_blocks(path):
    """(free blocks beyond FREE_BLOCKS, block size) of the filesystem holding path."""
    try:
        st = os.statvfs(path)
    except (AttributeError, OSError):
        return 1 << 30, 4096  # a port that cannot tell: only max_frames bounds the outbox
    free = st[4]
    if free < 0 or free > st[2]:
        free = 0  # littlefs counts some blocks twice when nearly full: the free count wraps
    return free - FREE_BLOCKS, st[1] or 4096


def _names(path):
    """File names in a directory, one at a time where the port allows (no list of them all)."""
    if hasattr(os, "ilistdir"):
        for entry in os.ilistdir(path):
            yield entry[0]
    else:  # CPython
        yield from os.listdir(path)


def _makedirs(path):
    cur = ""
    for part in path.split("/"):
        cur = cur + "/" + part if cur or path.startswith("/") else part
        if part and not _exists(cur):
            os.mkdir(cur)


class Outbox:
    """Frames waiting for an ACK, one file each, oldest first; also hands out sequence numbers.

    The directory is the index: RAM holds only the count, the newest sequence number and the
    oldest few (HEAD, enough for any transmit window), refilled from the directory as they
    are acknowledged. A list of every waiting number once outgrew the heap a few hundred
    frames in (MemoryError while the gateway was away), long before max_frames.
    """

    def __init__(self, root, max_frames=1000):
        self.dir = root + "/outbox"
        self._seq_path = root + "/seq"
        self.max_frames = max_frames
        self.evicted = 0
        self._room = 0  # blocks frames may still take before free space is measured again
        self._block = 4096
        _makedirs(self.dir)
        self._head = []  # the oldest waiting sequence numbers, sorted, at most HEAD
        self._count = 0
        self._newest = -1
        self._scan(boot=True)
        reserved = 0
        try:
            with open(self._seq_path, "rb") as f:
                reserved = int(f.read())
        except (OSError, ValueError):
            reserved = 0
        if self._count and self._newest >= reserved:
            reserved = self._newest + 1
        self._next = reserved
        self._reserved = reserved
        try:
            self._reserve()
        except OSError as e:
            # a full flash must not stop the node: it can still deliver frames (their ACKs
            # free space); next_seq tries again
            print("outbox: sequence block not saved yet: %r" % (e,))

    def _scan(self, boot=False):
        """Count the frames on flash and keep the oldest HEAD of them, one name at a time."""
        head = []
        count = 0
        newest = -1
        for name in _names(self.dir):
            if name.endswith(".tmp"):
                if boot:
                    # a write interrupted by a power cut: the frame was never complete
                    os.remove(self.dir + "/" + name)
                continue
            try:
                seq = int(name)
            except ValueError:
                continue
            count += 1
            if seq > newest:
                newest = seq
            if len(head) < HEAD or seq < head[-1]:
                i = len(head)
                while i and head[i - 1] > seq:
                    i -= 1
                head.insert(i, seq)
                if len(head) > HEAD:
                    head.pop()
        self._head = head
        self._count = count
        self._newest = newest

    def _reserve(self):
        # durable first: a failed write moves nothing, or the numbers of a block that never
        # reached flash would be handed out again after a reboot (the gateway would take the
        # new pack for a duplicate, and the node delete it)
        limit = self._next + SEQ_BLOCK
        _write_atomic(self._seq_path, b"%d" % limit)
        self._reserved = limit

    def next_seq(self):
        """A sequence number never handed out before on this node, across restarts.

        OSError if the block it needs cannot be saved (flash full): nothing is handed out.
        """
        if self._next >= self._reserved:
            self._reserve()
        s = self._next
        self._next += 1
        return s

    def _path(self, seq):
        return "%s/%010d" % (self.dir, seq)

    def put(self, seq, data):
        """Store one frame durably; evicts (and counts) the oldest when full.

        Full is max_frames, or a flash with no more than FREE_BLOCKS left. OSError if the
        frame still cannot be written (the frames stored before stay intact).
        """
        while self._count >= self.max_frames:
            self._evict()
        # a frame takes its blocks and, now and then, its directory a new pair: counted high,
        # so the filesystem is walked (statvfs) only once the spare room may have run out
        cost = 2 + len(data) // self._block
        if self._room < cost:
            self._make_room(cost)
        self._room -= cost
        _write_atomic(self._path(seq), data)
        if len(self._head) == self._count and len(self._head) < HEAD:
            self._head.append(seq)  # the head held every frame: this one joins it
        self._count += 1
        self._newest = seq

    def _evict(self):
        self.remove(self._head[0])
        self.evicted += 1

    def _make_room(self, cost):
        """Measure the free flash; evict the oldest frames until `cost` blocks can go."""
        last = None
        while True:
            self._room, self._block = _spare_blocks(self.dir)
            if self._room >= cost or not self._count:
                return
            if last is not None and self._room <= last:
                return  # evicting frees nothing (frames inline, the space taken by others)
            last = self._room
            for _ in range(cost - self._room):
                if self._count:
                    self._evict()

    def get(self, seq):
        with open(self._path(seq), "rb") as f:
            return f.read()

    def remove(self, seq):
        """Forget an acknowledged frame; unknown sequence numbers are ignored."""
        if seq in self._head:
            self._head.remove(seq)
        elif not self._maybe_on_flash(seq) or not _exists(self._path(seq)):
            return False
        try:
            os.remove(self._path(seq))
        except OSError:
            pass
        self._count -= 1
        if len(self._head) < self._count and (len(self._head) <= HEAD // 2
                                              or seq == self._newest):
            self._scan()  # refill before the transmit window could run short
        elif seq == self._newest and self._head:
            self._newest = self._head[-1]  # the head holds every frame
        return True

    def _maybe_on_flash(self, seq):
        """Not in the head, but perhaps beyond it (the head holds only the oldest)."""
        return len(self._head) < self._count and self._head and seq > self._head[-1]

    def oldest(self, n):
        """The n oldest waiting sequence numbers (n at most HEAD)."""
        return self._head[:n]

    def newest(self):
        """The newest waiting sequence number, or None."""
        return self._newest if self._count else None

    def seqs(self):
        """Every waiting sequence number, oldest first: reads the directory (tests, diagnostics)."""
        if len(self._head) == self._count:
            return list(self._head)
        out = []
        for name in _names(self.dir):
            if not name.endswith(".tmp"):
                try:
                    out.append(int(name))
                except ValueError:
                    pass
        out.sort()
        return out

    def __len__(self):
        return self._count

    def __contains__(self, seq):
        return seq in self._head or (self._maybe_on_flash(seq) and _exists(self._path(seq)))
