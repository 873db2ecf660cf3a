"""The ESP32 twin: the firmware booted from main.py with hal/esp32.py on the MicroPython unix port,
against models of the esp32 port's machine, esp32 and time modules (tests/esp32_twin/port).

The harness plays the board around the CPU. Power: each boot is one VM, started with the reset
cause the port would report; deep sleep, machine.reset() and a late watchdog end the VM, and the
next boot follows at once (a compressed day: the RTC is advanced by the sleep instead of waiting
for it). The RTC crystal: the wall clock goes on through sleep and resets, and is back at the
port's epoch (2000-01-01) after a power cut, which also clears RTC memory. The watchdog timer: a
deadline the model writes on each feed; once it passes, the VM is killed and the next boot says
WDT_RESET. NVS and the littlefs filesystem are folders that outlive everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from lantern.tools.street.sim import (
    BOARDS,
    FIRMWARE,
    MICROPYTHON,
    MP_EXTMOD,
    SimNode,
    compiled_firmware,
)

PORT = Path(__file__).resolve().parent / "port"
BOARD = "esp32-devkitc"
LED_PIN = 2  # the twin's board adds an LED (the DevKitC has none a program can drive)

# machine constants of the esp32 port (port/machine.py; checked against the stubs)
PWRON_RESET, HARD_RESET, WDT_RESET, DEEPSLEEP_RESET, SOFT_RESET = 1, 2, 3, 4, 5
TIMER_WAKE = 4
EXIT_DEEPSLEEP, EXIT_RESET, EXIT_SOFT_RESET = 100, 101, 102
_EPOCH_2000_US = 946684800 * 1_000_000
SAMPLE = re.compile(rb"sample seq=(\d+) readings=(\d+)")


def _host_us() -> int:
    return time.time_ns() // 1000


@dataclass
class Boot:
    """One VM run: why it started, how it ended."""

    reset: int
    wake: int
    rtc_us: int  # the RTC at boot, µs since 2000-01-01
    end: str = ""  # deepsleep, reset, soft_reset, watchdog, power_cut, exit <code>
    sleep_ms: int = 0
    rtc_end_us: int = 0  # the RTC when it went down


@dataclass
class TwinNode(SimNode):
    """A node on the ESP32 twin (hil_tests.harness.topology.Topology's node_class)."""

    board: str = BOARD
    heap_kb: int = 256  # the models are Python here (C on a board): memory is measured apart
    speed: int = 50  # board time runs this much faster than the host's (port/_twin.py SPEED)
    compiled: bool = True  # run .mpy as `lantern provision` deploys them; False: the sources
    boots: list[Boot] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None
    _cut: asyncio.Event | None = None
    _off: bool = False
    ble_name: str = ""  # the radio's bridge (ble_bridge.py), if the node has one

    @property
    def hw(self) -> Path:
        return self.dir / "hw"

    @property
    def flash(self) -> Path:
        return self.dir / "flash"

    @property
    def state_dir(self) -> Path:
        return self.flash / "state"

    @property
    def console(self) -> Path:
        return self.dir / "console.log"

    def write_config(self) -> Path:
        """Flash as provisioning leaves it (main.py, node.json, board.json; the key in NVS)."""
        self.scenario = {**self.scenario, "chip_speed": self.speed}
        host_cfg = super().write_config()  # the street process's config, and the key
        board = json.loads((BOARDS / f"{self.board}.json").read_text())
        board["led"] = LED_PIN
        for d in (self.flash, self.hw, self.hw / "nvs"):
            d.mkdir(parents=True, exist_ok=True)
        (self.flash / "board.json").write_text(json.dumps(board, indent=2))
        shutil.copy(FIRMWARE / "main.py", self.flash / "main.py")
        link = next(n for n, u in board["uart"].items() if u["id"] == 1)
        cfg = {"id": self.node_id, "key_store": "nvs", "board": "board.json",
               "state_dir": "state", "interval_ms": self.interval_ms,
               "link": {"port": link, "baud": 115200, "rto_ms": 20000}, **self.extra}
        (self.flash / "node.json").write_text(json.dumps(cfg, indent=2))
        nvs_key = self.hw / "nvs" / "lantern.node_key"
        if not nvs_key.exists():  # provisioning writes the key into NVS (provision_steps)
            nvs_key.write_bytes(b"b" + self.key)
        # what is wired to which controller: the street's bus index per I2C/UART id, ADC pin
        from sim import wire  # firmware/sim, on the path (root conftest)

        lines = []
        for i, name in enumerate(wire.bus_names(board)):
            for kind, ident in (("i2c", "id"), ("uart", "id"), ("adc", "pin")):
                spec = board.get(kind, {}).get(name)
                if spec is not None and name != link:
                    lines.append(f"{kind} {spec[ident]} {i}")
        (self.hw / "buses").write_text("\n".join(lines) + "\n")
        (self.hw / "uart1").write_text(self.port)
        (self.hw / "street").write_text(self.street_name)
        (self.hw / "speed").write_text(str(self.speed))
        if self.ble_name:
            (self.hw / "ble").write_text(self.ble_name)
        return host_cfg

    # -- power and the RTC ------------------------------------------------------------------

    def rtc_now_us(self) -> int:
        """The board's RTC now (µs since 2000), from the anchor the last boot left."""
        at_rtc, at_host = (int(v) for v in (self.hw / "rtc").read_text().split())
        return at_rtc + (_host_us() - at_host) * self.speed

    def _set_rtc(self, us: int) -> None:
        (self.hw / "rtc").write_text(f"{us} {_host_us()}")

    def rtc_memory(self) -> bytes:
        p = self.hw / "rtc_mem"
        return p.read_bytes() if p.exists() else b""

    def rtc_counters(self) -> tuple[int, int, int, int] | None:
        """(wake-ups, awake ms, energy mJ, flags) as hal/esp32.py keeps them in RTC memory."""
        raw = self.rtc_memory()
        if len(raw) != struct.calcsize("<HIIIB"):
            return None
        magic, *rest = struct.unpack("<HIIIB", raw)
        assert magic == 0x4C4F, raw
        return rest[0], rest[1], rest[2], rest[3]

    def nvs_i32(self, key: str, namespace: str = "lantern") -> int | None:
        raw = self.nvs(namespace, key)
        return int(raw[1:]) if raw and raw[:1] == b"i" else None

    def exec(self, code: str, reset: int = PWRON_RESET, timeout: float = 30) -> str:
        """Run `code` on the board (the twin's port and flash, no main.py): its output."""
        self.write_config()
        if not (self.hw / "rtc").exists():
            self.power_on()
        (self.hw / "boot").write_text(f"{reset} 0")
        env = {"MICROPYPATH": f"{PORT}:{FIRMWARE}:{MP_EXTMOD}", "LANTERN_TWIN": str(self.hw),
               "PATH": os.environ.get("PATH", "")}
        out = subprocess.run([str(MICROPYTHON), "-X", f"heapsize={self.heap_kb}K", "-c", code],
                             cwd=self.flash, env=env, capture_output=True, timeout=timeout)
        return (out.stdout + out.stderr).decode(errors="replace")

    def nvs(self, namespace: str, key: str) -> bytes | None:
        p = self.hw / "nvs" / f"{namespace}.{key}"
        return p.read_bytes() if p.exists() else None

    def led_changes(self) -> list[tuple[int, int]]:
        """(pin, level) of every GPIO write, in order."""
        p = self.hw / "gpio"
        if not p.exists():
            return []
        return [(int(f[1]), int(f[2])) for f in (ln.split() for ln in p.read_text().splitlines())]

    def power_on(self) -> None:
        """A board with no backup cell: RTC at the epoch, RTC memory gone."""
        self._set_rtc(0)
        with contextlib.suppress(FileNotFoundError):
            (self.hw / "rtc_mem").unlink()

    def start(self, stdout: int | None = None, heap: str | None = None) -> subprocess.Popen[bytes]:
        """Power the board on and keep it running (a task: boots, sleeps, resets)."""
        if not MICROPYTHON.exists():
            raise FileNotFoundError(f"{MICROPYTHON} is missing: run `make micropython` first")
        cfg = self.write_config()
        self.start_street(cfg, {"MICROPYPATH": f"{FIRMWARE}:{MP_EXTMOD}",
                                "PATH": os.environ.get("PATH", "")})
        if not (self.hw / "rtc").exists():
            self.power_on()
        self._cut = asyncio.Event()
        self._boot(PWRON_RESET, 0)
        self._task = asyncio.get_running_loop().create_task(self._supervise())
        assert self.proc is not None
        return self.proc

    def _boot(self, reset: int, wake: int) -> None:
        self.boots.append(Boot(reset, wake, self.rtc_now_us()))
        (self.hw / "boot").write_text(f"{reset} {wake}")
        for f in ("exit", "wdt"):
            with contextlib.suppress(FileNotFoundError):
                (self.hw / f).unlink()
        code = compiled_firmware() if self.compiled else FIRMWARE
        env = {"MICROPYPATH": f"{PORT}:{code}:{FIRMWARE}:{MP_EXTMOD}",
               "LANTERN_TWIN": str(self.hw), "PATH": os.environ.get("PATH", "")}
        with open(self.console, "ab") as log:
            log.write(b"=== boot reset=%d wake=%d\n" % (reset, wake))
            log.flush()
            self.proc = subprocess.Popen(
                [str(MICROPYTHON), "-X", f"heapsize={self.heap_kb}K", "main.py"],
                cwd=self.flash, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)

    def _wdt_late(self) -> bool:
        try:
            _, deadline = (int(v) for v in (self.hw / "wdt").read_text().split())
        except (FileNotFoundError, ValueError):
            return False
        return _host_us() > deadline

    async def _supervise(self) -> None:
        assert self._cut is not None
        while True:
            proc = self.proc
            assert proc is not None
            while proc.poll() is None and not self._cut.is_set() and not self._wdt_late():
                await asyncio.sleep(0.02)
            boot = self.boots[-1]
            boot.rtc_end_us = self.rtc_now_us()
            if proc.poll() is None:  # power cut or watchdog: the chip stops where it is
                proc.kill()
                proc.wait()
                if self._cut.is_set():
                    boot.end = "power_cut"
                    self._cut.clear()
                    self.power_on()
                    if self._off:
                        return  # stays off until power_restore()
                    self._boot(PWRON_RESET, 0)
                    continue
                boot.end = "watchdog"
                self._set_rtc(self.rtc_now_us())
                self.unstick()
                self._boot(WDT_RESET, 0)
                continue
            code, _, note = ((self.hw / "exit").read_text().partition(" ")
                             if (self.hw / "exit").exists() else (str(proc.returncode), "", ""))
            if int(code) == EXIT_DEEPSLEEP:
                boot.end = "deepsleep"
                boot.sleep_ms = int(note)
                self._set_rtc(self.rtc_now_us() + boot.sleep_ms * 1000)  # slept, compressed
                self._boot(DEEPSLEEP_RESET, TIMER_WAKE)
            elif int(code) in (EXIT_RESET, EXIT_SOFT_RESET):
                boot.end = "reset" if int(code) == EXIT_RESET else "soft_reset"
                self._boot(HARD_RESET if int(code) == EXIT_RESET else SOFT_RESET, 0)
            else:
                boot.end = f"exit {proc.returncode}"
                return  # the firmware stopped (a traceback): the board sits at its REPL

    def power_cut(self, stay_off: bool = False) -> None:
        """Cut the supply now; the board boots again at once unless stay_off."""
        assert self._cut is not None
        self._off = stay_off
        self._cut.set()

    def power_restore(self) -> None:
        """Power back after power_cut(stay_off=True)."""
        self._off = False
        self._boot(PWRON_RESET, 0)
        self._task = asyncio.get_running_loop().create_task(self._supervise())

    async def wait_boots(self, n: int, timeout: float) -> None:
        """Until n boots have ended (or the supervisor stopped)."""
        deadline = time.monotonic() + timeout
        while sum(1 for b in self.boots if b.end) < n:
            if self._task is None or self._task.done() or time.monotonic() > deadline:
                raise AssertionError(f"{sum(1 for b in self.boots if b.end)} of {n} boots "
                                     f"ended; console:\n{self.output()[-3000:]}")
            await asyncio.sleep(0.05)

    def hang_bus(self) -> None:
        """The sensor bus stops answering (the street process is stopped): the node hangs."""
        assert self.street is not None
        self.street.send_signal(signal.SIGSTOP)

    def unstick(self) -> None:
        if self.street is not None and self.street.poll() is None:
            self.street.send_signal(signal.SIGCONT)

    def sampled(self) -> dict[int, int]:
        """seq → readings, from every boot's console."""
        text = self.console.read_bytes() if self.console.exists() else b""
        return {int(m[1]): int(m[2]) for m in SAMPLE.finditer(text)}

    def output(self) -> str:
        return self.console.read_text(errors="replace") if self.console.exists() else ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self.unstick()
        super().kill(sig)

    async def stop(self) -> None:  # tests/ble's World stops its nodes so
        self.close()

    def close(self) -> None:
        self.kill()
        if self.street and self.street.poll() is None:
            self.street.kill()
            self.street.wait(timeout=5)
