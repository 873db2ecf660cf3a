"""The port's `select`, with the board's time (port/time.py): poll timeouts shrink by SPEED."""



import _twin
import uselect as _host
from uselect import POLLERR, POLLHUP, POLLIN, POLLOUT  # noqa: F401

_SPEED = _twin.SPEED


def _host_ms(timeout):
    return timeout if timeout is None or timeout <= 0 else (timeout + _SPEED - 1) // _SPEED


class poll:
    def __init__(self):
        self._p = _host.poll()

    def register(self, obj, eventmask=POLLIN | POLLOUT):
        self._p.register(obj, eventmask)

    def unregister(self, obj):
        self._p.unregister(obj)

    def modify(self, obj, eventmask):
        self._p.modify(obj, eventmask)

    def poll(self, timeout=-1):
        return self._p.poll(_host_ms(timeout))

    def ipoll(self, timeout=-1, flags=0):
        return self._p.ipoll(_host_ms(timeout), flags)
