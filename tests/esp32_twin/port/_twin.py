"""The twin board's hardware state, shared by the port models (machine, esp32, time, bluetooth).

It lives in files of the folder $LANTERN_TWIN, written by the models and by the harness
(tests/esp32_twin/twin.py), which plays the parts of the board outside the CPU: power, the
RTC crystal, the watchdog timer, the NVS flash. Times of the host are in microseconds of its
wall clock (time.time_ns, the same clock in CPython and MicroPython).
"""



import os

import utime

HW = os.getenv("LANTERN_TWIN") or "."

# the VM's exit codes, read by the harness: how the board went down
EXIT_DEEPSLEEP = 100
EXIT_RESET = 101
EXIT_SOFT_RESET = 102


def path(name):
    return HW + "/" + name


def read(name, default=None):
    try:
        with open(path(name), "rb") as f:
            return f.read()
    except OSError:
        return default


def write(name, data):
    """Replace a state file whole: the harness never sees half of one."""
    tmp = path(name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.rename(tmp, path(name))


def host_us():
    return utime.time_ns() // 1000


def _numbers(name, n):
    raw = read(name)
    vals = [int(v) for v in raw.split()] if raw else []
    return vals + [0] * (n - len(vals))


# boot: reset cause, wake reason (machine constants), chosen by the harness for this boot
RESET_CAUSE, WAKE_REASON = _numbers("boot", 2)
# how much faster than the host the board's time runs (ticks, sleeps, polls, the RTC): the
# street's chips run as much faster (sim chip_speed), so a day of cycles takes minutes
SPEED = _numbers("speed", 1)[0] or 1


# the RTC's anchor (µs since the port's epoch, host µs then), set by the harness before boot
_rtc = _numbers("rtc", 2)


def rtc_us():
    """The RTC: microseconds since the port's epoch (2000-01-01), running with the host clock
    from the anchor the harness (or RTC.datetime) last set."""
    return _rtc[0] + (host_us() - _rtc[1]) * SPEED


def set_rtc_us(us):
    _rtc[0] = us
    _rtc[1] = host_us()
    write("rtc", b"%d %d" % (us, _rtc[1]))


def down(code, note=b""):
    """The board goes down: record the RTC and why, then end this VM at once, as the chip's
    reset does (no Python cleanup runs: finally blocks and atexit are for the next boot)."""
    set_rtc_us(rtc_us())
    write("exit", b"%d %s" % (code, note))
    try:
        import ffi

        ffi.open("libc.so.6").func("v", "_exit", "i")(code)
    except (ImportError, OSError):
        pass
    raise SystemExit(code)
