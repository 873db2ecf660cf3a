"""The esp32 port's `esp32` module: NVS and the app partitions (Partition, with the
bootloader's OTA choice), in files of the twin's flash (kept through everything).

As the port (ports/esp32/esp32_nvs.c, ESP-IDF nvs): values set are held until commit(); a
missing key raises OSError(-ESP_ERR_NVS_NOT_FOUND); get_blob into a buffer too small for the
value raises OSError(-ESP_ERR_NVS_INVALID_LENGTH). Keys are at most 15 characters.
"""
# ruff: noqa: UP031, SIM105, SIM115, B905 - MicroPython: no f-strings in ports, no
# contextlib, zip() without strict=


import os as _os

import _twin

_NOT_FOUND = -0x1102
_INVALID_LENGTH = -0x110C
_KEY_TOO_LONG = -0x1109  # ESP_ERR_NVS_KEY_TOO_LONG


class NVS:
    def __init__(self, namespace):
        self._ns = namespace
        self._pending = {}

    def _file(self, key):
        if len(key) > 15:
            raise OSError(_KEY_TOO_LONG)
        try:
            _os.mkdir(_twin.path("nvs"))
        except OSError:
            pass
        return "nvs/%s.%s" % (self._ns, key)

    def _get(self, key, kind):
        f = self._file(key)
        raw = self._pending.get(f)
        if raw is None:
            raw = _twin.read(f)
        if raw is None or raw[:1] != kind:
            raise OSError(_NOT_FOUND)
        return raw[1:]

    def set_i32(self, key, value):
        if not -0x80000000 <= value <= 0x7FFFFFFF:
            raise OverflowError("overflow converting long int to machine word")
        self._pending[self._file(key)] = b"i%d" % value

    def get_i32(self, key):
        return int(self._get(key, b"i"))

    def set_blob(self, key, value):
        self._pending[self._file(key)] = b"b" + bytes(value)

    def get_blob(self, key, buffer):
        data = self._get(key, b"b")
        if len(data) > len(buffer):
            raise OSError(_INVALID_LENGTH)
        buffer[: len(data)] = data
        return len(data)

    def erase_key(self, key):
        f = self._file(key)
        if f not in self._pending and _twin.read(f) is None:
            raise OSError(_NOT_FOUND)
        self._pending[f] = b"-"

    def commit(self):
        for f, raw in self._pending.items():
            if raw == b"-":
                try:
                    _os.remove(_twin.path(f))
                except OSError:
                    pass
            else:
                _twin.write(f, raw)
        self._pending = {}


# ---- app partitions and the bootloader's choice (ports/esp32/esp32_partition.c, ESP-IDF
# esp_ota_ops with app rollback on). The partition table of MicroPython's OTA boards: two app
# slots, ota_0 and ota_1. Their flash is a file each, NOR-like: erasing sets 0xFF, a write can
# only clear bits (new = old AND data), so a block written without an erase reads back wrong,
# as on the chip. The OTA data (which slot boots, its state) is a file: the bootloader's step
# runs once per VM, which is one boot of the board.

_APPS = {"ota_0": (0x10, 0x10000), "ota_1": (0x11, 0x190000)}  # label: (subtype, address)
_APP_SIZE = 0x180000
_ERASED = b"\xff" * 4096


def _ota_state():
    raw = _twin.read("otadata")
    if raw is None:  # a board as flashed by esptool: ota_0, valid
        return {"boot": "ota_0", "prev": "ota_0", "state": "valid"}
    boot, prev, state = raw.decode().split()
    return {"boot": boot, "prev": prev, "state": state}


def _ota_save(st):
    _twin.write("otadata", ("%s %s %s" % (st["boot"], st["prev"], st["state"])).encode())


def _bootloader():
    """What the second-stage bootloader did at this boot: an image set to boot runs once
    unconfirmed ("pending"); a reset before it is marked valid boots the previous one."""
    st = _ota_state()
    if st["state"] == "new":
        st["state"] = "pending"
    elif st["state"] == "pending":
        st["state"] = "aborted"
        st["boot"] = st["prev"]
    _ota_save(st)
    return st["boot"]


_RUNNING = _bootloader()


class Partition:
    BOOT = 0
    RUNNING = 1
    TYPE_APP = 0
    TYPE_DATA = 1

    def __init__(self, id, block_size=4096):
        if id == Partition.BOOT:
            id = _ota_state()["boot"]
        elif id == Partition.RUNNING:
            id = _RUNNING
        if id not in _APPS:
            raise ValueError("partition not found")
        self._label = id
        self._bs = block_size
        self._file = "part_" + id

    def info(self):
        subtype, addr = _APPS[self._label]
        return (Partition.TYPE_APP, subtype, addr, _APP_SIZE, self._label, False)

    def _span(self, at, n):
        if at < 0 or at + n > _APP_SIZE:
            raise OSError(22)  # EINVAL: outside the partition
        try:
            f = open(_twin.path(self._file), "r+b")
        except OSError:
            f = open(_twin.path(self._file), "w+b")
        f.seek(0, 2)
        end = f.tell()
        while end < at + n:  # unwritten flash reads as erased
            f.write(_ERASED[:min(4096, at + n - end)])
            end = f.tell()
        f.seek(at)
        return f

    def readblocks(self, block_num, buf, offset=0):
        f = self._span(block_num * self._bs + offset, len(buf))
        f.readinto(buf)
        f.close()

    def _erase(self, block_num, count):
        f = self._span(block_num * self._bs, count * self._bs)
        for _ in range(count * self._bs // 4096):
            f.write(_ERASED)
        f.close()

    def writeblocks(self, block_num, buf, offset=None):
        if offset is None:  # the first form erases the blocks it covers
            self._erase(block_num, (len(buf) + self._bs - 1) // self._bs)
            offset = 0
        at = block_num * self._bs + offset
        f = self._span(at, len(buf))
        old = f.read(len(buf))
        f.seek(at)
        f.write(bytes(a & b for a, b in zip(old, buf)))
        f.close()

    def ioctl(self, op, arg=None):
        if op == 4:  # block count
            return _APP_SIZE // self._bs
        if op == 5:  # block size
            return self._bs
        if op == 6:  # erase one block
            self._erase(arg, 1)
            return 0
        return 0 if op in (1, 2, 3) else None

    def set_boot(self):
        _ota_save({"boot": self._label, "prev": _RUNNING, "state": "new"})

    def get_next_update(self):
        return Partition("ota_1" if self._label == "ota_0" else "ota_0")

    @classmethod
    def mark_app_valid_cancel_rollback(cls):
        st = _ota_state()
        if st["boot"] == _RUNNING and st["state"] == "pending":
            st["state"] = "valid"
            _ota_save(st)

    @staticmethod
    def find(type=TYPE_APP, subtype=0xFF, label=None):
        if type != Partition.TYPE_APP:
            return []
        return [Partition(k) for k, (s, _) in sorted(_APPS.items())
                if (subtype == 0xFF or s == subtype) and label in (None, k)]
