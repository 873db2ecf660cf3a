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


def _exists(path):
    try:
        os.stat(path)
        return True
    except OSError:
        return False


def _write_atomic(path, data):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.rename(tmp, path)


def _makedirs(path):
    cur = ""
    for part in path.split("/"):
        cur = cur + "/" + part if cur or path.startswith("/") else part
        if part and not _exists(cur):
            os.mkdir(cur)


class Outbox:
    """Frames waiting for an ACK, one file each, oldest first; also hands out sequence numbers."""

    def __init__(self, root, max_frames=1000):
        self.dir = root + "/outbox"
        self._seq_path = root + "/seq"
        self.max_frames = max_frames
        self.evicted = 0
        _makedirs(self.dir)
        seqs = []
        for name in os.listdir(self.dir):
            if name.endswith(".tmp"):
                # a write interrupted by a power cut: the frame was never complete
                os.remove(self.dir + "/" + name)
                continue
            try:
                seqs.append(int(name))
            except ValueError:
                pass
        seqs.sort()
        self._seqs = seqs
        reserved = 0
        try:
            with open(self._seq_path, "rb") as f:
                reserved = int(f.read())
        except (OSError, ValueError):
            reserved = 0
        if seqs and seqs[-1] >= reserved:
            reserved = seqs[-1] + 1
        self._next = reserved
        self._reserved = reserved
        self._reserve()

    def _reserve(self):
        self._reserved = self._next + SEQ_BLOCK
        _write_atomic(self._seq_path, b"%d" % self._reserved)

    def next_seq(self):
        """A sequence number never handed out before on this node, across restarts."""
        if self._next >= self._reserved:
            self._reserve()
        s = self._next
        self._next += 1
        return s

    def _path(self, seq):
        return "%s/%010d" % (self.dir, seq)

    def put(self, seq, data):
        """Store one frame durably; evicts (and counts) the oldest when full."""
        while len(self._seqs) >= self.max_frames:
            self.remove(self._seqs[0])
            self.evicted += 1
        _write_atomic(self._path(seq), data)
        self._seqs.append(seq)

    def get(self, seq):
        with open(self._path(seq), "rb") as f:
            return f.read()

    def remove(self, seq):
        """Forget an acknowledged frame; unknown sequence numbers are ignored."""
        try:
            self._seqs.remove(seq)
        except ValueError:
            return False
        try:
            os.remove(self._path(seq))
        except OSError:
            pass
        return True

    def seqs(self):
        return self._seqs

    def __len__(self):
        return len(self._seqs)

    def __contains__(self, seq):
        return seq in self._seqs
