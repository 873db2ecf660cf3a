"""A power cut of the cabinet: the gateway's state directory keeps only what was flushed.

A SIGKILL leaves the kernel's page cache intact, so it cannot tell `synchronous=FULL` from
`OFF`. Here the state directory is a filesystem in user space (FUSE, through mfusepy over
libfuse3) that holds every write in memory and applies it to a backing directory only when
it is flushed, as a disk behind a volatile cache does:

- a file's data and size reach the backing store on fsync/fdatasync of that file;
- a directory's entries (creates, unlinks, renames) on fsync of that directory. SQLite fsyncs
  the directory once after creating a rollback journal or a WAL; nobody else does it for it.

Everything else lives only in the FUSE process. A power cut is SIGKILL to the gateway and to
that process at once (`PowerCutTopology.cut`): the unflushed writes die with it, and the next
mount starts from the backing directory alone.

The backing directory is not a copy of the tree: `tree.json` holds the durable directory
entries (by inode number) and `data/<ino>` each inode's durable bytes. `materialize` turns it
into a plain directory, what the disk would show after the cut.

  python hil_tests/harness/powercut.py boot BACKING MOUNT [--synchronous OFF] -- GATEWAY ARGV

`boot` runs in a mount namespace of its own (`unshare -m`): it mounts the filesystem (the FUSE
server is a forked child that dies with its parent), then becomes the gateway. When the
namespace's last process ends, the mount goes with it: no stale mount is ever left behind.
`--synchronous OFF` (test only: it exists here, never in the gateway's configuration) weakens
the store on purpose, to show the scenario fails when durability is weakened.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import signal
import stat
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK = 4096
ROOT_INO = 1


@dataclass
class Inode:
    ino: int
    is_dir: bool
    mode: int
    data: bytearray = field(default_factory=bytearray)
    entries: dict[str, int] = field(default_factory=dict)  # directories: name → ino
    dirty: set[int] = field(default_factory=set)  # blocks written since the last fsync
    size_dirty: bool = False
    mtime_ns: int = field(default_factory=time.time_ns)
    nlink: int = 0  # names pointing at it in the current tree


class VolatileFS:
    """The filesystem's state: the current tree in memory, the durable one in `backing`."""

    def __init__(self, backing: Path) -> None:
        self.backing = backing
        (backing / "data").mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.stats = {"writes": 0, "bytes_written": 0, "fsyncs": 0, "fsyncdirs": 0,
                      "bytes_flushed": 0}
        tree = self._load_tree()
        self.durable_dirs: dict[int, dict[str, int]] = {
            int(k): dict(v) for k, v in tree["dirs"].items()}
        self.durable_meta: dict[int, dict[str, Any]] = {
            int(k): v for k, v in tree["inodes"].items()}
        on_disk = [int(p.name) for p in (backing / "data").iterdir() if p.name.isdigit()]
        self.next_ino = max([ROOT_INO, *self.durable_meta, *on_disk]) + 1
        self.inodes: dict[int, Inode] = {}
        self._load(ROOT_INO)
        for ino in on_disk:  # fsynced data whose name never became durable: gone
            if ino not in self.inodes:
                (backing / "data" / str(ino)).unlink()
        self.handles: dict[int, int] = {}  # fh → ino (an unlinked file stays open)
        self.next_fh = 1

    def _load_tree(self) -> dict[str, Any]:
        p = self.backing / "tree.json"
        if p.exists():
            tree: dict[str, Any] = json.loads(p.read_text())
            return tree
        return {"dirs": {str(ROOT_INO): {}},
                "inodes": {str(ROOT_INO): {"dir": True, "mode": 0o40755}}}

    def _load(self, ino: int) -> None:
        meta = self.durable_meta.get(ino, {"dir": False, "mode": 0o100644})
        node = Inode(ino, bool(meta["dir"]), int(meta["mode"]))
        self.inodes[ino] = node
        if node.is_dir:
            node.entries = dict(self.durable_dirs.get(ino, {}))
            for child in node.entries.values():
                if child not in self.inodes:
                    self._load(child)
                self.inodes[child].nlink += 1
        else:
            p = self.backing / "data" / str(ino)
            node.data = bytearray(p.read_bytes()) if p.exists() else bytearray()

    # ---- the tree

    def lookup(self, path: str) -> Inode:
        node = self.inodes[ROOT_INO]
        for part in [p for p in path.split("/") if p]:
            if not node.is_dir or part not in node.entries:
                raise OSError(errno.ENOENT, path)
            node = self.inodes[node.entries[part]]
        return node

    def parent(self, path: str) -> tuple[Inode, str]:
        head, _, name = path.rstrip("/").rpartition("/")
        d = self.lookup(head or "/")
        if not d.is_dir:
            raise OSError(errno.ENOTDIR, head)
        return d, name

    def new(self, path: str, mode: int, is_dir: bool) -> Inode:
        d, name = self.parent(path)
        if name in d.entries:
            raise OSError(errno.EEXIST, path)
        node = Inode(self.next_ino, is_dir, mode)
        self.next_ino += 1
        self.inodes[node.ino] = node
        d.entries[name] = node.ino
        node.nlink = 1
        d.mtime_ns = time.time_ns()
        return node

    def drop_name(self, d: Inode, name: str) -> None:
        child = self.inodes[d.entries.pop(name)]
        child.nlink -= 1
        d.mtime_ns = time.time_ns()

    # ---- data

    def write(self, node: Inode, data: bytes, offset: int) -> int:
        end = offset + len(data)
        if end > len(node.data):
            self._resize(node, end)
        node.data[offset:end] = data
        node.dirty.update(range(offset // BLOCK, (end - 1) // BLOCK + 1))
        node.mtime_ns = time.time_ns()
        self.stats["writes"] += 1
        self.stats["bytes_written"] += len(data)
        return len(data)

    def _resize(self, node: Inode, size: int) -> None:
        old = len(node.data)
        if size > old:
            node.data.extend(bytes(size - old))
            node.dirty.update(range(old // BLOCK, (size - 1) // BLOCK + 1))
        else:
            del node.data[size:]
        node.size_dirty = True

    def truncate(self, node: Inode, size: int) -> None:
        if size != len(node.data):
            self._resize(node, size)
        node.mtime_ns = time.time_ns()

    # ---- flushing: the only way anything reaches the backing directory

    def fsync(self, node: Inode) -> None:
        self.stats["fsyncs"] += 1
        if node.is_dir:
            self.fsyncdir(node)
            return
        if not node.dirty and not node.size_dirty:
            return
        fd = os.open(self.backing / "data" / str(node.ino), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            size = len(node.data)
            for b in sorted(node.dirty):
                chunk = bytes(node.data[b * BLOCK:min(size, (b + 1) * BLOCK)])
                if chunk:
                    os.pwrite(fd, chunk, b * BLOCK)
                    self.stats["bytes_flushed"] += len(chunk)
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        node.dirty.clear()
        node.size_dirty = False

    def fsyncdir(self, d: Inode) -> None:
        self.stats["fsyncdirs"] += 1
        self.durable_dirs[d.ino] = dict(d.entries)
        for child in d.entries.values():
            c = self.inodes[child]
            self.durable_meta[child] = {"dir": c.is_dir, "mode": c.mode}
            if c.is_dir:
                self.durable_dirs.setdefault(child, {})
        tree = {"dirs": {str(k): v for k, v in self.durable_dirs.items()},
                "inodes": {str(k): v for k, v in self.durable_meta.items()}}
        tmp = self.backing / "tree.json.tmp"
        tmp.write_text(json.dumps(tree))
        os.replace(tmp, self.backing / "tree.json")  # the host's disk is not cut: no fsync

    def attrs(self, node: Inode) -> dict[str, Any]:
        kind = stat.S_IFDIR if node.is_dir else stat.S_IFREG
        size = 4096 if node.is_dir else len(node.data)
        return {"st_mode": kind | (node.mode & 0o7777), "st_ino": node.ino,
                "st_nlink": max(1, node.nlink) + (1 if node.is_dir else 0),
                "st_size": size, "st_blocks": -(-size // 512), "st_blksize": BLOCK,
                "st_uid": os.getuid(), "st_gid": os.getgid(), "st_atime": node.mtime_ns,
                "st_mtime": node.mtime_ns, "st_ctime": node.mtime_ns}


def operations(fs: VolatileFS, ready_fd: int | None = None) -> Any:
    """mfusepy operations over `fs` (imported here: the test process never loads libfuse)."""
    import mfusepy

    class Ops(mfusepy.Operations):  # type: ignore[misc]
        use_ns = True

        def __init__(self) -> None:
            self._mu = fs.lock

        def _node(self, path: str | None, fh: int | None) -> Inode:
            if fh:
                return fs.inodes[fs.handles[fh]]
            if path is None:
                raise mfusepy.FuseOSError(errno.EBADF)
            try:
                return fs.lookup(path)
            except OSError as e:
                raise mfusepy.FuseOSError(e.errno) from None

        def _handle(self, node: Inode) -> int:
            fh = fs.next_fh
            fs.next_fh += 1
            fs.handles[fh] = node.ino
            return fh

        def init(self, path: str) -> None:
            if ready_fd is not None:
                os.write(ready_fd, b"1")
                os.close(ready_fd)

        def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
            with self._mu:
                return fs.attrs(self._node(path, fh))

        def readdir(self, path: str, fh: int) -> list[str]:
            with self._mu:
                return [".", "..", *self._node(path, None).entries]

        def mkdir(self, path: str, mode: int) -> int:
            with self._mu:
                self._wrap(lambda: fs.new(path, mode, True))
            return 0

        def _wrap(self, fn: Any) -> Any:
            try:
                return fn()
            except OSError as e:
                raise mfusepy.FuseOSError(e.errno) from None

        def rmdir(self, path: str) -> int:
            with self._mu:
                d, name = self._wrap(lambda: fs.parent(path))
                node = self._node(path, None)
                if node.entries:
                    raise mfusepy.FuseOSError(errno.ENOTEMPTY)
                fs.drop_name(d, name)
            return 0

        def create(self, path: str, mode: int, fi: Any = None) -> int:
            with self._mu:
                node = self._wrap(lambda: fs.new(path, mode, False))
                return self._handle(node)

        def open(self, path: str, flags: int) -> int:
            with self._mu:
                node = self._node(path, None)
                if flags & os.O_TRUNC:
                    fs.truncate(node, 0)
                return self._handle(node)

        def opendir(self, path: str) -> int:
            with self._mu:
                return self._handle(self._node(path, None))

        def release(self, path: str, fh: int) -> int:
            with self._mu:
                ino = fs.handles.pop(fh, None)
                node = fs.inodes.get(ino) if ino is not None else None
                if (node is not None and node.nlink <= 0 and ino not in fs.handles.values()
                        and ino not in fs.durable_meta):
                    del fs.inodes[node.ino]  # (a durable one stays: its name may come back)
            return 0

        releasedir = release

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            with self._mu:
                return bytes(self._node(path, fh).data[offset:offset + size])

        def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
            with self._mu:
                return fs.write(self._node(path, fh), data, offset)

        def truncate(self, path: str, length: int, fh: int | None = None) -> int:
            with self._mu:
                fs.truncate(self._node(path, fh), length)
            return 0

        def fsync(self, path: str, datasync: int, fh: int) -> int:
            with self._mu:
                fs.fsync(self._node(path, fh))
            return 0

        def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
            with self._mu:
                fs.fsyncdir(self._node(path, fh))
            return 0

        def unlink(self, path: str) -> int:
            with self._mu:
                d, name = self._wrap(lambda: fs.parent(path))
                if name not in d.entries:
                    raise mfusepy.FuseOSError(errno.ENOENT)
                fs.drop_name(d, name)
            return 0

        def rename(self, old: str, new: str) -> int:
            with self._mu:
                d1, n1 = self._wrap(lambda: fs.parent(old))
                d2, n2 = self._wrap(lambda: fs.parent(new))
                if n1 not in d1.entries:
                    raise mfusepy.FuseOSError(errno.ENOENT)
                ino = d1.entries.pop(n1)
                if n2 in d2.entries:
                    fs.inodes[d2.entries[n2]].nlink -= 1
                d2.entries[n2] = ino
            return 0

        def chmod(self, path: str, mode: int) -> int:
            with self._mu:
                self._node(path, None).mode = mode
            return 0

        def chown(self, path: str, uid: int, gid: int) -> int:
            return 0

        def utimens(self, path: str, times: Any = None) -> int:
            return 0

        def statfs(self, path: str) -> dict[str, int]:
            return {"f_bsize": BLOCK, "f_frsize": BLOCK, "f_blocks": 1 << 20,
                    "f_bfree": 1 << 19, "f_bavail": 1 << 19, "f_files": 1 << 16,
                    "f_ffree": 1 << 15, "f_namemax": 255}

    return Ops()


def materialize(backing: Path, out: Path) -> Path:
    """The durable image as a plain directory: what the disk holds after a cut."""
    fs = VolatileFS(backing)
    out.mkdir(parents=True, exist_ok=True)

    def walk(d: Inode, where: Path) -> None:
        for name, ino in d.entries.items():
            node = fs.inodes[ino]
            if node.is_dir:
                (where / name).mkdir(exist_ok=True)
                walk(node, where / name)
            else:
                (where / name).write_bytes(bytes(node.data))

    walk(fs.inodes[ROOT_INO], out)
    return out


# ---------------------------------------------------------------- the boot of one "power-on"

_PR_SET_PDEATHSIG = 1


def _serve(backing: Path, mount: Path, ready_w: int) -> None:
    """The FUSE server (a child of the gateway-to-be): dies when its parent does."""
    import mfusepy

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    fs = VolatileFS(backing)
    mfusepy.FUSE(operations(fs, ready_w), str(mount), foreground=True, nothreads=True,
                 hard_remove=True, default_permissions=False, fsname="lantern-powercut")


def boot(argv: list[str]) -> None:
    """BACKING MOUNT [--synchronous MODE] -- python -m lantern gateway run ..."""
    sep = argv.index("--")
    opts, cmd = argv[:sep], argv[sep + 1:]
    backing, mount = Path(opts[0]), Path(opts[1])
    synchronous = opts[opts.index("--synchronous") + 1] if "--synchronous" in opts else None
    ready_r, ready_w = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        try:
            if os.getppid() == parent:
                _serve(backing, mount, ready_w)
        finally:
            os._exit(0)
    os.close(ready_w)
    if os.read(ready_r, 1) != b"1":  # the server died before mounting
        sys.exit(f"powercut: could not mount the state directory at {mount}")
    os.close(ready_r)
    if cmd[1:3] != ["-m", "lantern"]:
        os.execvp(cmd[0], cmd)
    # the gateway, in this process (its pid is the one the test watches)
    if synchronous is not None:
        from lantern.agent.queue import store

        store.SYNCHRONOUS = synchronous
    from lantern.agent.cli import main

    sys.argv = ["lantern", *cmd[3:]]
    sys.exit(main())


if __name__ == "__main__":
    if sys.argv[1:2] != ["boot"]:
        sys.exit(__doc__)
    boot(sys.argv[2:])


__all__ = ["VolatileFS", "boot", "materialize"]
