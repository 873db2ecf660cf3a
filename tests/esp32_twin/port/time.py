"""The esp32 port's `time`: wall clock from the RTC, epoch 2000-01-01; ticks from boot.

The RTC keeps running through deep sleep and resets; after a power cut (no backup cell on the
boards Lantern uses) it starts again at the epoch, as ports/esp32 (gettimeofday, which the
port sets from RTC.datetime) does. Board time runs _twin.SPEED times faster than the host's:
ticks and the RTC advance that much faster, sleeps (and select's polls, port/select.py) last
that much less. The ticks run ahead of the host's from where they were at boot, never behind:
the C task queue of asyncio (extmod/modasyncio.c) stamps a task pushed without a time with the
host's ticks, which must then be due at once, as they are on a board.
"""



import _twin
import utime as _host
from utime import ticks_add, ticks_cpu, ticks_diff  # noqa: F401

_EPOCH_2000 = 946684800  # seconds from the host's epoch (1970) to the port's (2000)
_MASK = (1 << 30) - 1  # MicroPython's ticks period
_SPEED = _twin.SPEED
_T0_MS = _host.ticks_ms()
_T0_US = _host.ticks_us()


def ticks_ms():
    now = _host.ticks_ms()
    return (now + _host.ticks_diff(now, _T0_MS) * (_SPEED - 1)) & _MASK


def ticks_us():
    now = _host.ticks_us()
    return (now + _host.ticks_diff(now, _T0_US) * (_SPEED - 1)) & _MASK


def sleep_us(us):
    _host.sleep_us(us // _SPEED)


def sleep_ms(ms):
    _host.sleep_us(ms * 1000 // _SPEED)


def sleep(seconds):
    _host.sleep_us(int(seconds * 1000000) // _SPEED)


def time():
    return _twin.rtc_us() // 1000000


def time_ns():
    return _twin.rtc_us() * 1000


def gmtime(secs=None):
    if secs is None:
        secs = time()
    return _host.gmtime(secs + _EPOCH_2000)


def localtime(secs=None):
    return gmtime(secs)  # no time zones on the port


def mktime(local_time):
    return _host.mktime(local_time) - _EPOCH_2000
