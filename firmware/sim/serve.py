"""The simulated street as its own process: `micropython sim/serve.py node.json`.

Builds the chip models for the node's board and answers its HAL's bus transactions on the
abstract Unix socket named in node.json's sim.socket (wire.py). Each new connection is a power
cycle: a node that restarts finds its chips just powered up, as on a lamp post after a cut.
"""

import json
import socket
import struct
import sys

from sim import street, wire


def handle(buses, names, op, b, addr, mem, nread, data):
    """One transaction → reply bytes (OSError carries the bus errno)."""
    bus = buses[names[b]]
    if op == wire.I2C_WRITE:
        bus.writeto(addr, data)
        return b""
    if op == wire.I2C_READ:
        return bus.readfrom(addr, nread)
    if op == wire.I2C_WRITE_MEM:
        bus.writeto_mem(addr, mem, data)
        return b""
    if op == wire.I2C_READ_MEM:
        return bus.readfrom_mem(addr, mem, nread)
    if op == wire.UART_WRITE:
        bus.write(data)
        return b""
    if op == wire.UART_READ:
        return bus.read(nread) or b""
    if op == wire.UART_ANY:
        return struct.pack("<H", min(0xFFFF, bus.any()))
    if op == wire.ADC_READ_UV:
        return struct.pack("<i", bus.read_uv())
    if op == wire.I2C_SCAN:
        return bytes(bus.scan())
    raise OSError(22)  # EINVAL


def _read(conn, n):
    """Exactly n bytes, or fewer at end of stream (MicroPython's read(n) already loops)."""
    out = conn.read(n)
    while out and len(out) < n:
        more = conn.read(n - len(out))
        if not more:
            break
        out += more
    return out


def serve_connection(conn, board, cfg):
    buses, _, _ = street.build(board, cfg.get("sim") or {}, cfg["id"])
    names = wire.bus_names(board)
    head = struct.calcsize(wire.REQUEST)
    while True:
        h = _read(conn, head)
        if not h or len(h) < head:
            return  # the node went away (power cut, restart, end of test)
        op, b, addr, mem, nread, nwrite = struct.unpack(wire.REQUEST, h)
        data = _read(conn, nwrite) if nwrite else b""
        err, out = 0, b""
        try:
            out = handle(buses, names, op, b, addr, mem, nread, data)
        except OSError as e:
            err = e.args[0] if e.args else 5
        conn.write(struct.pack(wire.REPLY, err, len(out)) + out)


def main(cfg_path):
    with open(cfg_path) as f:
        cfg = json.load(f)
    with open(cfg["board"]) as f:
        board = json.load(f)
    srv = socket.socket(wire.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(wire.sockaddr(cfg["sim"]["socket"]))
    srv.listen(1)
    print("street for %s on @%s" % (cfg["id"], cfg["sim"]["socket"]))
    while True:
        conn, _ = srv.accept()
        if not hasattr(conn, "read"):  # CPython
            conn = conn.makefile("rwb", buffering=0)
        try:
            serve_connection(conn, board, cfg)
        except Exception as e:  # noqa: BLE001 - report, and wait for the node to come back
            print("street: %r" % (e,))
        conn.close()


if __name__ == "__main__":
    main(sys.argv[1])
