"""Run on the deployed board (mpremote run): what loading the BLE link costs its GC heap.

Prints BLEDELTA <radio stand-in> <BLE code> <BLE link and its adverts> <free after>. The radio
stand-in is a few Python classes answering BleLink's calls; on an ESP32 the `bluetooth` module
is C (its NimBLE state is on the IDF heap), so its figure is reported apart, not counted.
"""
# ruff: noqa: E402, I001 - measured step by step: imports belong where they are counted

import gc
gc.collect()
a = gc.mem_free()


class _BLE:
    def active(self, *a):
        return True

    def config(self, *a, **k):
        return (0, b"\x24\x0a\xc4\x00\x00\x01") if a else None

    def irq(self, h):
        pass

    def gatts_register_services(self, s):
        return ((1, 2, 3),)

    def gatts_set_buffer(self, *a):
        pass

    def gatts_write(self, *a):
        pass

    def gap_advertise(self, *a, **k):
        pass


class bt:
    BLE = _BLE

    class UUID:
        def __init__(self, v):
            self.v = v


gc.collect()
b = gc.mem_free()
from node.link_ble import BleLink
from node.outbox import Outbox
from node.clock import Clock
gc.collect()
c = gc.mem_free()
ob = Outbox("state", 1000)
link = BleLink(bt, "SL-0001", bytes(32), ob, Clock(), "state", {"bthome": "plain"})
link._advertise(1)
link._advertise(0)
gc.collect()
d = gc.mem_free()
print("BLEDELTA", a - b, b - c, c - d, d)
