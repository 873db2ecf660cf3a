"""HAL of the simulated board on MicroPython's unix port: a pty as the UART, files as flash."""

import gc

# Linux termios c_cc indices (MicroPython's termios module does not export them)
_VTIME = 5
_VMIN = 6


def open_uart(port, baud):
    """The link device opened raw and non-blocking-ish: read(n) returns what is there."""
    import termios

    f = open(port, "r+b")
    fd = f.fileno()
    termios.setraw(fd)
    attrs = termios.tcgetattr(fd)
    attrs[6][_VMIN] = 0
    attrs[6][_VTIME] = 0
    termios.tcsetattr(fd, termios.TCSANOW, attrs)
    return f


def heap_free():
    gc.collect()
    return gc.mem_free()


def sensors(board, node_id):
    """Driver instances for the board's sensors, by name."""
    out = []
    for spec in board.get("sensors", []):
        if spec["driver"] == "sim_climate":
            from node.drivers.sim_climate import SimClimate

            seed = 0
            for ch in node_id:
                seed = (seed * 31 + ord(ch)) & 0xFFFF
            out.append(SimClimate(seed))
    return out
